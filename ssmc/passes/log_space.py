"""Rewrite the decay into log space: kernels accumulate sums of log-decays, not products."""
from __future__ import annotations

import sympy as sp

from ..ir import Elementwise, Program
from .base import PassContext, register_pass


def log_of(decay: sp.Expr) -> sp.Expr:
    """`exp(u)` -> `u` symbolically (also through products of exps); otherwise `log(decay)`."""
    if isinstance(decay, sp.exp):
        return decay.args[0]
    if isinstance(decay, sp.Mul):
        factors = decay.args
        if all(isinstance(f, sp.exp) or (f.is_number and f.is_positive) for f in factors):
            return sp.Add(*(f.args[0] if isinstance(f, sp.exp) else sp.log(f) for f in factors))
    if isinstance(decay, sp.Pow) and isinstance(decay.base, sp.exp):
        return decay.base.args[0] * decay.exp
    return sp.log(decay)


@register_pass("log_space_decay", requires=("classify_decay",))
def log_space_decay(program: Program, ctx: PassContext) -> Program:
    decay = program.recurrence.decay
    if decay is None:
        return program
    return program.replace(log_decay=Elementwise(log_of(decay.expr), decay.axes))
