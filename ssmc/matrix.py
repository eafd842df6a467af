"""The mixing matrix M of a definition (y = M value, before the epilogue) as a differentiable
tensor, and a loss that matches it to a softmax-attention teacher without materialising either.

    M = ssmc.attention_matrix(op, *inputs, reduce=None, window=None)
    loss = ssmc.mixing_loss(op, *inputs, q=q, k=k, scale=None, norm="fro", reduction="sum")

Both are custom ops (`ssmc.torch.matrix_ops`): gradients reach every input through the
prologue, and both trace under torch.compile. Distillation in the MOHAWK style (match the
matrices, then the outputs) is `examples/distill_attention.py`.
"""
from __future__ import annotations

import math

import torch

from .api import CompiledOp, Definition
from .errors import ArgumentError, DeviceError, DTypeError, ShapeError, UnsupportedError
from .torch import matrix_ops
from .torch.matrix_ops import attention_matrix_op, route_for
from .validate import Bound, bind

REDUCE = {None: "none", "none": "none", "sum": "sum", "mean": "mean"}
REDUCTIONS = ("sum", "mean", "none")


def _bound(fn: str, op, args, kwargs) -> tuple[Definition, str, Bound]:
    definition = op.definition if isinstance(op, CompiledOp) else op
    if not isinstance(definition, Definition):
        raise ArgumentError(f"{fn} expects an ssmc definition or compiled op, got "
                            f"{type(op).__name__}")
    backend = op.backend_name if isinstance(op, CompiledOp) else "auto"
    if definition.program.on_grid:
        raise UnsupportedError(f"{fn}: a cross2d recurrence (four scan orders over a grid) has "
                               "no single hidden attention matrix here; not supported")
    bound = bind(definition.program, args, kwargs)
    if bound.cu_seqlens is not None or bound.initial_state is not None:
        raise UnsupportedError(f"{fn}: 'cu_seqlens' and 'initial_state' are not supported; "
                               "pass one unpacked batch")
    return definition, backend, bound


def _span(fn: str, name: str, value, T: int) -> tuple[int, int]:
    """A window side: a (start, stop) pair or a slice with unit step, inside [0, t]."""
    if isinstance(value, slice):
        if value.step not in (None, 1):
            raise ArgumentError(f"{fn}: window {name} {value} must have step 1")
        value = value.indices(T)[:2]
    try:
        start, stop = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ArgumentError(f"{fn}: window {name} must be a (start, stop) pair or a slice, "
                            f"got {value!r}") from None
    if not 0 <= start <= stop <= T:
        raise ArgumentError(f"{fn}: window {name} ({start}, {stop}) must satisfy 0 <= start <= "
                            f"stop <= t = {T}")
    return start, stop


def _window(program, bound: Bound, window, fn: str):
    """The inputs cut to the steps a (rows, columns) window needs, and the crop afterwards:
    M[t, s] reads only steps between s and t (either direction), and the prologue is
    elementwise, so the window is the matrix of the cut sequence, cropped."""
    if window is None:
        return bound.tensors, None
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ArgumentError(f"{fn}: window must be (rows, columns), each a (start, stop) pair "
                            f"or a slice; got {window!r}")
    T = bound.sizes["t"]
    (r0, r1), (c0, c1) = _span(fn, "rows", window[0], T), _span(fn, "columns", window[1], T)
    lo, hi = min(r0, c0), max(r1, c1)
    tensors = {}
    for inp in program.inputs:
        x = bound.tensors[inp.name]
        tensors[inp.name] = x.narrow(inp.axes.index("t"), lo, hi - lo) if "t" in inp.axes else x
    return tensors, (slice(r0 - lo, r1 - lo), slice(c0 - lo, c1 - lo))


def attention_matrix(op, *args, reduce: str | None = None, window=None,
                     **kwargs) -> torch.Tensor:
    """The hidden attention matrix of a definition on these inputs: y = M value before the
    epilogue, summed over directions; differentiable with respect to every input.

    Shape (b, h, t, t); (b, h, p, t, t) where the decay varies over p and p > 1 (one matrix
    per value channel); (b, t, t) with `reduce="sum"` or `"mean"` over heads (and channels), reduced
    a block of rows at a time. `window=(rows, columns)`, each a (start, stop) pair or slice,
    returns only M[..., rows, columns], computed from the steps between them. In float32
    (float64 for float64 inputs). On CUDA the Triton kernel builds it where the quadratic
    lowering applies, and Triton kernels give its gradient for forward definitions whose decay
    is positive with an exact log and does not vary over p; on the CPU a TVM kernel (LLVM)
    builds it; otherwise, and for the CPU's gradients, a block-row torch evaluation does."""
    fn = "attention_matrix"
    if reduce not in REDUCE:
        raise ArgumentError(f"{fn}: reduce={reduce!r} is not valid; valid values: None, "
                            "'sum', 'mean'")
    definition, backend, bound = _bound(fn, op, args, kwargs)
    program = definition.program
    tensors, crop = _window(program, bound, window, fn)
    inputs = [tensors[n] for n in program.input_names]
    M = attention_matrix_op(inputs, route_for(program, backend), REDUCE[reduce])
    return M if crop is None else M[..., crop[0], crop[1]]


def _check_teacher(fn: str, q, k, sizes: dict, device) -> None:
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise DTypeError(f"{fn}: '{name}' must be a floating-point tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4:
            raise ShapeError(f"{fn}: '{name}' must be (b, t, heads, d), got {tuple(x.shape)}")
        if x.device != device:
            raise DeviceError(f"{fn}: '{name}' is on {x.device} but the inputs are on {device}")
    b, t, h = sizes["b"], sizes["t"], sizes["h"]
    if tuple(q.shape[:3]) != (b, t, h):
        raise ShapeError(f"{fn}: 'q' must be (b, t, h, d) = ({b}, {t}, {h}, d) like the "
                         f"definition's inputs, got {tuple(q.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or h % k.shape[2]:
        raise ShapeError(f"{fn}: 'k' must be (b, t, heads dividing h={h}, d) = ({b}, {t}, "
                         f"*, {q.shape[3]}), got {tuple(k.shape)}")


def mixing_loss(op, *args, q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                norm: str = "fro", reduction: str = "sum", **kwargs) -> torch.Tensor:
    """The matrix-matching (MOHAWK "matrix orientation") loss between a definition's hidden
    attention matrix M (`attention_matrix`) and a causal softmax-attention teacher:

        loss[b, h] = || M[b, h] - softmax(q[b, :, h] k[b, :, h']^T * scale, causal) ||_F^2

    `q` (b, t, h, d) per head of the definition, `k` (b, t, hk, d) with hk dividing h (heads
    share a key head in groups of h / hk, as in GQA); `scale` defaults to 1 / sqrt(d). Where
    M is per value channel, the channels' losses add. `reduction`: "sum" (a scalar), "mean"
    (over b and h) or "none" ((b, h)). Differentiable with respect to the definition's inputs
    and to q and k. Pass inputs named q or k positionally (the keywords are the teacher's).
    On CUDA, forward definitions whose decay is positive with an exact log and does not vary
    over p run fused Triton kernels that never store either matrix; others go a block of rows
    at a time (each block's memory linear in t)."""
    fn = "mixing_loss"
    if norm != "fro":
        raise ArgumentError(f"{fn}: norm={norm!r} is not valid; valid values: 'fro'")
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"{fn}: reduction={reduction!r} is not valid; valid values: "
                            f"{', '.join(map(repr, REDUCTIONS))}")
    definition, backend, bound = _bound(fn, op, args, kwargs)
    program = definition.program
    _check_teacher(fn, q, k, bound.sizes, bound.device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    inputs = [bound.tensors[n] for n in program.input_names]
    loss = matrix_ops.mixing_loss(inputs, q, k, scale, route_for(program, backend))
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if reduction == "mean" else loss
