"""Whether the recurrence's value splits into a bare input and a per-step factor, which both
parallel passes then evaluate once a step instead of once an element."""
from __future__ import annotations

import sympy as sp


def value_split(program):
    """(input symbol, row scale) where the recurrence's value is a bare input carrying p times a
    factor free of p and n (Mamba-2's x * softplus(dt + dt_bias): x, softplus(dt + dt_bias)),
    else None. The kernels evaluate the factor once a step (a row of the value tile) instead of
    once an element."""
    expr = program.recurrence.value.expr
    axes = {inp.name: inp.axes for inp in program.inputs}

    def carries(f, ax):
        return any(ax in axes.get(x.name, ("n", "p")) for x in f.free_symbols)
    factors = sp.Mul.make_args(expr)
    base = [f for f in factors if carries(f, "p")]
    if len(base) != 1 or not isinstance(base[0], sp.Symbol) or base[0].name not in axes:
        return None
    rest = [f for f in factors if f is not base[0]]
    scale = sp.Mul(*rest)
    if scale == 1 or carries(scale, "n") or carries(scale, "p"):
        return None
    return base[0], scale
