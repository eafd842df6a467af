"""Elementwise functions that sympy lacks, with derivatives so that `sympy.diff` works.

Backends render these by name (`Softplus` -> a numerically stable softplus), so they are
kept as opaque functions rather than expanded into `log(1 + exp(x))`. They declare what sympy
needs to simplify around them: real for a real argument (else `abs(softplus(c))` expands into
re/im parts), positive where they are, and a number for a number (so `maximum(0.5,
sigmoid(1.0))` can be compared).
"""
from __future__ import annotations

import math

import sympy as sp


class _RealFunction(sp.Function):
    nargs = 1
    _numeric = None  # float -> float

    @classmethod
    def eval(cls, x):
        if x.is_Number and x.is_real:
            return sp.Float(cls._numeric(float(x)))
        return None

    def _eval_is_real(self):
        return self.args[0].is_real


class Sigmoid(_RealFunction):
    _numeric = staticmethod(lambda v: 1.0 / (1.0 + math.exp(-v)) if v >= 0
                            else math.exp(v) / (1.0 + math.exp(v)))

    def _eval_is_positive(self):
        return self.args[0].is_real

    def fdiff(self, argindex=1):
        # s(x) s(-x), not s (1 - s): where s rounds to 1 (x > 17 in fp32) 1 - s is 0, while
        # s(-x) keeps the derivative's own value (e^-x)
        x = self.args[0]
        return Sigmoid(x) * Sigmoid(-x)


class Softplus(_RealFunction):
    _numeric = staticmethod(lambda v: max(v, 0.0) + math.log1p(math.exp(-abs(v))))

    def _eval_is_positive(self):
        return self.args[0].is_real

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])


class Silu(_RealFunction):
    _numeric = staticmethod(lambda v: v * Sigmoid._numeric(v))

    def fdiff(self, argindex=1):
        x = self.args[0]
        return Sigmoid(x) * (1 + x * Sigmoid(-x))


CUSTOM_FUNCTIONS = {"Sigmoid": Sigmoid, "Softplus": Softplus, "Silu": Silu}
