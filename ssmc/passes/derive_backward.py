"""Derive the elementwise parts of the backward pass by `sympy.diff`.

A program is  inputs -> prologue (decay, key, value, query) -> recurrence -> epilogue E(y, inputs).
Its backward splits the same way:

* epilogue:   dy = grad_out * dE/dy, and grad_out * dE/dx for every input x used in E;
* recurrence: the adjoint (reverse-time) recurrence turns dy into gradients of the operands
  (d key, d value, d query, and d decay or d log_decay), computed by the backends;
* prologue:   the chain rule, d x = sum over operands o of  d o * (do/dx), summed over the axes
  that x does not have (and over the heads of a group for `g` inputs).

This module produces the symbolic derivatives of the first and last step. They are derived, not
written: a user's own discretisation, gate or epilogue gets its gradient with no extra code.
The derivatives of the opaque functions (Softplus, Sigmoid, Silu) come from their `fdiff`.

The pass stores the result on the program (`Program.backward`, an `ssmc.ir.backward.
BackwardExprs`), where the backends' chain rule reads it; `derive_backward` is the same
derivation as a memoised function.
"""
from __future__ import annotations

import functools

import sympy as sp

from ..ir import Y, Program
from ..ir.backward import BackwardExprs, Underivable
from ..ir.functions import Sigmoid
from .base import PassContext, register_pass

class _Tanh(sp.Function):
    """tanh while differentiating: sympy's tanh' = 1 - tanh^2 loses the derivative, about
    4 e^-2|u|, to cancellation in fp32 (all of it where tanh rounds to +-1, |u| > 9; 1e-4
    relative at u = 4.8), and sympy spreads that difference through the product rule
    ((tanh^2 - 1) exp(-tanh), 3 - 3 tanh^2), where no pattern on the result finds it. Its
    own derivative 4 s(2u) s(-2u) keeps the value (as Sigmoid's)."""

    def fdiff(self, argindex=1):
        u = self.args[0]
        return 4 * Sigmoid(2 * u) * Sigmoid(-2 * u)


def _diff(expr: sp.Expr, sym: sp.Symbol) -> sp.Expr:
    d = sp.diff(expr.replace(sp.tanh, _Tanh), sym).replace(_Tanh, sp.tanh)
    # Max/Min differentiate to Heaviside; keep derivatives free of unevaluated Derivative nodes
    if d.has(sp.Derivative):
        raise NotImplementedError(f"cannot differentiate {expr} w.r.t. {sym}: got {d}")
    return d


@functools.lru_cache(maxsize=None)
def derive_backward(program: Program) -> BackwardExprs:
    """dE/dy, dE/d input and d operand/d input for every input, by sympy.diff."""
    syms = {inp.name: inp.symbol for inp in program.inputs}
    out = program.output.expr
    epilogue = {}
    for name, s in syms.items():
        if s in out.free_symbols:
            d = _diff(out, s)
            if d != 0:
                epilogue[name] = d
    rec = program.recurrence
    nodes = {"key": rec.key, "value": rec.value, "query": rec.query, "decay": rec.decay,
             "log_decay": program.log_decay}
    operands = {}
    for op, node in nodes.items():
        if node is None:
            continue
        grads = {}
        for name, s in syms.items():
            if s in node.expr.free_symbols:
                d = _diff(node.expr, s)
                if d != 0:
                    grads[name] = d
        operands[op] = grads
    return BackwardExprs(_diff(out, Y), epilogue, operands)


@register_pass("derive_backward", requires=("log_space_decay",))
def derive_backward_pass(program: Program, ctx: PassContext) -> Program:
    """Attach the derivatives (the log-space decay must exist: it is one of the operands)."""
    try:
        return program.replace(backward=derive_backward(program))
    except NotImplementedError as e:
        return program.replace(backward=Underivable(str(e)))
