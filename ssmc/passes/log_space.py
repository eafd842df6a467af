"""Rewrite the decay into log space: kernels accumulate sums of log|decay|, not products.

Factors whose log has a closed form are rewritten exactly (`exp(u)` -> `u`, `sigmoid(x)` ->
`-softplus(-x)`, positive constants, powers), so a gate that underflows in the decay's own
dtype (sigmoid(-200) in fp32) keeps its exact log. Any other factor f becomes `log(Abs(f))`:
its sign is carried apart by the kernels (`Program.decay_signed`) and a zero is log 0 = -inf,
which the kernels sum without ever subtracting two such sums.
"""
from __future__ import annotations

import sympy as sp

from ..ir import Elementwise, Program
from ..ir.functions import Sigmoid, Softplus
from .base import PassContext, register_pass


def _exact_log(f: sp.Expr) -> sp.Expr | None:
    """log(f) in closed form for a factor that is positive by construction, else None."""
    if isinstance(f, sp.exp):
        return f.args[0]
    if isinstance(f, Sigmoid):
        return -Softplus(-f.args[0])
    if f.is_number and f.is_positive:
        return sp.log(f)
    if isinstance(f, sp.Pow) and f.exp.is_real:
        inner = _exact_log(f.base)
        if inner is not None:
            return inner * f.exp
    return None


def log_of(decay: sp.Expr) -> sp.Expr:
    """log|decay|: a sum over the decay's factors, each in closed form where it has one and
    `log(Abs(factor))` otherwise (one such term for all the remaining factors)."""
    factors = decay.args if isinstance(decay, sp.Mul) else (decay,)
    exact, rest = [], []
    for f in factors:
        e = _exact_log(f)
        if e is None:
            rest.append(f)
        else:
            exact.append(e)
    terms = list(exact)
    if rest:
        terms.append(sp.log(sp.Abs(sp.Mul(*rest))))
    return sp.Add(*terms)


@register_pass("log_space_decay", requires=("classify_decay",))
def log_space_decay(program: Program, ctx: PassContext) -> Program:
    decay = program.recurrence.decay
    if decay is None:
        return program
    return program.replace(log_decay=Elementwise(log_of(decay.expr), decay.axes))
