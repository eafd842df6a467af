"""Elementwise functions that sympy lacks, with derivatives so that `sympy.diff` works.

Backends render these by name (`Softplus` -> a numerically stable softplus), so they are
kept as opaque functions rather than expanded into `log(1 + exp(x))`.
"""
from __future__ import annotations

import sympy as sp


class Sigmoid(sp.Function):
    nargs = 1

    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Softplus(sp.Function):
    nargs = 1

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])


class Silu(sp.Function):
    nargs = 1

    def fdiff(self, argindex=1):
        x = self.args[0]
        s = Sigmoid(x)
        return s * (1 + x * (1 - s))


CUSTOM_FUNCTIONS = {"Sigmoid": Sigmoid, "Softplus": Softplus, "Silu": Silu}
