"""Evaluate IR expressions with torch, on tensors laid out in the canonical (b, t, h, n, p) form.

Shared by both references: they differ in how they apply the recurrence, not in how they
compute its operands.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as TF

from ..ir import Y, Program
from ..ir.functions import Sigmoid, Silu, Softplus

CANON = ("b", "t", "h", "n", "p")

_UNARY = {
    sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, sp.Abs: torch.abs,
    Sigmoid: torch.sigmoid, Softplus: TF.softplus, Silu: TF.silu, sp.sign: torch.sign,
}


def evaluate(expr: sp.Expr, env: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Evaluate a sympy expression; symbols are looked up in `env` by name."""
    def const(v):
        return torch.tensor(float(v), dtype=like.dtype, device=like.device)

    def ev(e):
        if e.is_Symbol:
            return env[e.name]
        if e.is_Number:
            return const(e)
        if isinstance(e, sp.Add):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
            return out
        if isinstance(e, sp.Mul):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
            return out
        if isinstance(e, sp.Pow):
            base, ex = ev(e.base), e.exp
            if ex == -1:
                return 1 / base
            if ex == sp.Rational(1, 2):
                return torch.sqrt(base)
            if ex == sp.Rational(-1, 2):
                return torch.rsqrt(base)
            return torch.pow(base, ev(ex))
        if isinstance(e, (sp.Max, sp.Min)):
            fn = torch.maximum if isinstance(e, sp.Max) else torch.minimum
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = fn(out, ev(a))
            return out
        if isinstance(e, sp.Heaviside):
            return (ev(e.args[0]) > 0).to(like.dtype)
        fn = _UNARY.get(type(e))
        if fn is None:
            raise NotImplementedError(f"cannot evaluate {type(e).__name__} in {e}")
        return fn(ev(e.args[0]))

    return ev(expr)


def to_canonical(x: torch.Tensor, axes: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
    """View `x` (laid out as `axes`) as a 5-d (b, t, h, n, p) tensor; absent axes have size 1
    and a groups axis g is repeated to heads."""
    slot = {a: CANON.index("h" if a == "g" else a) for a in axes}
    order = sorted(range(len(axes)), key=lambda i: slot[axes[i]])
    y = x.permute(order)
    shape = [1] * 5
    for i in order:
        shape[slot[axes[i]]] = x.shape[i]
    y = y.reshape(shape)
    if "g" in axes and sizes["h"] != sizes["g"]:
        y = y.repeat_interleave(sizes["h"] // sizes["g"], dim=2)
    return y


def canonical_inputs(program: Program, tensors: dict, sizes: dict, dtype=torch.float64) -> dict:
    return {i.name: to_canonical(tensors[i.name].to(dtype), i.axes, sizes) for i in program.inputs}


def prologue(program: Program, env: dict) -> dict[str, torch.Tensor | None]:
    """decay, key, value, query as canonical tensors (decay None where the program has none)."""
    like = next(iter(env.values()))
    r = program.recurrence
    return {
        "decay": None if r.decay is None else evaluate(r.decay.expr, env, like),
        "key": evaluate(r.key.expr, env, like),
        "value": evaluate(r.value.expr, env, like),
        "query": evaluate(r.query.expr, env, like),
    }


def epilogue(program: Program, y: torch.Tensor, env: dict) -> torch.Tensor:
    """y: (b, t, h, p). Returns the output as (b, t, h, p)."""
    env = dict(env)
    env[Y.name] = y.unsqueeze(3)  # canonical (b, t, h, 1, p)
    out = evaluate(program.output.expr, env, y)
    b, t, h, p = y.shape
    return out.expand(b, t, h, 1, p).squeeze(3)
