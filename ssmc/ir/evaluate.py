"""Evaluate IR expressions with torch, on tensors laid out in the canonical (b, t, h, n, p) form.

Shared by the float64 references (which compute the operands with it), the chain rule of the
backends' backward (which evaluates the derived derivatives with it) and the distributed
decay: one meaning of every IR function.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as TF

from .functions import Sigmoid, Silu, Softplus

CANON = ("b", "t", "h", "n", "p")

def _with_derivative(fn, derivative):
    """`fn` whose backward multiplies by `derivative(x)` instead of torch's own: torch's
    backward of tanh (1 - tanh^2) and of sigmoid (s (1 - s)) is 0 once the value rounds to
    +-1 (float64: tanh past 19, 4% off at 18; sigmoid past 37), which made the float64
    reference's gradients wrong where the kernels' were right."""
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return fn(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * derivative(x)
    return Function.apply


_tanh = _with_derivative(torch.tanh, lambda x: 4 * torch.sigmoid(2 * x) * torch.sigmoid(-2 * x))
_sigmoid = _with_derivative(torch.sigmoid, lambda x: torch.sigmoid(x) * torch.sigmoid(-x))


_UNARY = {
    sp.exp: torch.exp, sp.log: torch.log, sp.tanh: _tanh, sp.Abs: torch.abs,
    Sigmoid: _sigmoid, Softplus: TF.softplus, Silu: TF.silu, sp.sign: torch.sign,
}


def evaluate(expr: sp.Expr, env: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Evaluate a sympy expression; symbols are looked up in `env` by name."""
    def const(v):
        # filled on the device: torch.tensor(v, device=cuda) copies from the host and waits
        # for the stream, which left the GPU idle ~2 ms a training step (user Mamba-2, H100)
        return torch.full((), float(v), dtype=like.dtype, device=like.device)

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
