"""The symbolic backward of a program's elementwise parts, as the `derive_backward` pass
leaves it on the Program (`Program.backward`) for every backend's chain rule."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy as sp

from .nodes import Y

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


@dataclass(frozen=True)
class Underivable:
    """What the derive_backward pass leaves when a derivative has no closed form: the forward
    runs; differentiating raises an UnsupportedError with `reason`."""

    reason: str


def cse(exprs, prefix: str = "bwd_cse"):
    """sympy.cse with real-valued temporaries named `prefix<i>`: (replacements, reduced), as
    tuples. Memoised per expression tuple: the chain rule asks for the same few on every
    backward call, and sympy.cse costs about as much as the rest of the call's host work."""
    return _cse(tuple(exprs), prefix)


@functools.lru_cache(maxsize=1024)
def _cse(exprs: tuple, prefix: str):
    def names():
        i = 0
        while True:
            yield sp.Symbol(f"{prefix}{i}", real=True)
            i += 1
    replacements, reduced = sp.cse(list(exprs), symbols=names())
    return tuple(replacements), tuple(reduced)
