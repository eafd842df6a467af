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

It is a pure function of the Program (memoised), not a registered pass, because the Program
node has no slot for it and the forward pipeline does not need it. `cse` gives the common
subexpressions of all derivatives one operand or input needs, for evaluators that want them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy as sp

from ..ir import Y, Program

#: the recurrence operands whose gradients the backends produce
OPERANDS = ("key", "value", "query", "decay", "log_decay")


@dataclass(frozen=True)
class BackwardExprs:
    """Symbolic derivatives of one program's elementwise parts.

    epilogue_dy:  dE/dy (may contain `y` and inputs).
    epilogue:     input name -> dE/d input, for inputs the epilogue uses (nonzero only).
    operands:     operand name -> {input name -> d operand / d input} (nonzero only); operand
                  names are OPERANDS; "decay"/"log_decay" are absent where there is no decay.
    """

    epilogue_dy: sp.Expr
    epilogue: dict
    operands: dict

    @property
    def needs_y(self) -> bool:
        """Whether any epilogue derivative depends on the recurrence output itself."""
        return Y in self.epilogue_dy.free_symbols or any(
            Y in e.free_symbols for e in self.epilogue.values())

    def inputs_with_gradient(self) -> set[str]:
        names = set(self.epilogue)
        for d in self.operands.values():
            names |= set(d)
        return names


def _diff(expr: sp.Expr, sym: sp.Symbol) -> sp.Expr:
    d = sp.diff(expr, sym)
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


def cse(exprs: list[sp.Expr], prefix: str = "bwd_cse"):
    """sympy.cse with real-valued temporaries named `prefix<i>`: (replacements, reduced)."""
    def names():
        i = 0
        while True:
            yield sp.Symbol(f"{prefix}{i}", real=True)
            i += 1
    return sp.cse(exprs, symbols=names())
