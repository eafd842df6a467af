"""`torch.library` custom ops for the hidden attention matrix and the matrix-matching loss.

    ssmc::attention_matrix(Tensor[] inputs, int route, str reduce) -> Tensor
    ssmc::attention_matrix_bwd(Tensor[] inputs, Tensor grad, int route, str reduce) -> Tensor[]
    ssmc::mixing_loss(Tensor[] inputs, Tensor q, Tensor k, float scale, int route) -> Tensor
    ssmc::mixing_loss_bwd(Tensor[] inputs, Tensor q, Tensor k, float scale, Tensor grad,
                          int route) -> (Tensor[], Tensor, Tensor)

`route` names a (program, backend) pair registered once per pair (programs are small and a
traced graph holds only the integer, so routes are kept for the process). The implementations
ask the first backend of the route (for `auto`: the device's auto order) that has the method
and supports the program's quadratic plan; the reference backend serves every program.

The fake implementations compute shapes from the IR's axes: the matrix is (b, h, t, t),
(b, h, p, t, t) for a decay over p, or (b, t, t) reduced; the loss is (b, h); both in the
compute dtype (float32, float64 for float64 inputs).

An eager mixing loss that records a graph (`mixing_loss`) lets a backend whose method takes
`keep` hand the host-side operands of its forward to its backward (`prepared`) through the
autograd node: the implementation leaves them in a thread-local slot, setup_context (which
torch runs next, in the same thread) moves them into ctx, and the backward formula passes them
to the backward's implementation around its call. Under torch.compile nothing is kept (the
compiled graphs run the implementations without setup_context).
"""
from __future__ import annotations

import functools
import inspect
import threading

import torch

from ..backends.base import AUTO_ORDER, registered
from ..errors import UnsupportedError
from ..ir import DecayKind, Program
from ..plan import Plan
from ..validate import _output_dtype
from .ops import _fresh as _fresh_of, _storages, sizes_of, state_dtype

_ROUTES: list[tuple[Program, str]] = []
_ROUTE_IDS: dict[tuple, int] = {}
_LOCK = threading.Lock()


@torch.compiler.assume_constant_result
def route_for(program: Program, backend: str) -> int:
    """The route id of (program, backend name or "auto"); a constant to torch.compile, which
    calls it while tracing instead of tracing into the program's structural key. A hit is a
    dict lookup (the program keeps its structural key once made)."""
    key = (program.name, program.structural_key(), backend)
    route = _ROUTE_IDS.get(key)
    if route is None:
        with _LOCK:
            if key not in _ROUTE_IDS:
                _ROUTES.append((program, backend))
                _ROUTE_IDS[key] = len(_ROUTES) - 1
            route = _ROUTE_IDS[key]
    return route


def _plan(program: Program, inputs) -> Plan:
    dtype = _output_dtype(program, dict(zip(program.input_names, inputs)))
    return Plan(program=program, lowering="quadratic", dtype=str(dtype).split(".")[1])


#: (route, method, device type, dtype) -> (backend method, plan): `_serve`'s choice, which
#: depends on nothing else
_SERVED: dict[tuple, tuple] = {}


def _serve(route: int, inputs, method: str):
    """(backend method, plan, tensors, sizes) for a call on `inputs`."""
    program, name = _ROUTES[route]
    tensors = dict(zip(program.input_names, inputs))
    device_type = inputs[0].device.type
    key = (route, method, device_type, _output_dtype(program, tensors))
    served = _SERVED.get(key)
    if served is None:
        plan = _plan(program, inputs)
        names = AUTO_ORDER.get(device_type, ()) if name == "auto" else (name,)
        for candidate in tuple(names) + ("reference",):
            backend = registered().get(candidate)
            fn = getattr(backend, method, None)
            if fn is not None and backend.is_available() and backend.supports(plan) is None:
                break
        else:  # pragma: no cover - the reference backend has every method
            raise UnsupportedError(f"{program.name}: no backend has {method}")
        served = _SERVED[key] = (fn, plan)
    fn, plan = served
    return fn, plan, tensors, sizes_of(program, inputs)


def _compute_dtype(program: Program, inputs) -> torch.dtype:
    return state_dtype(_output_dtype(program, dict(zip(program.input_names, inputs))))


def matrix_shape(program: Program, sizes: dict, reduce: str) -> tuple:
    b, h, t, p = sizes["b"], sizes["h"], sizes["t"], sizes["p"]
    if reduce != "none":
        return (b, t, t)
    return (b, h, p, t, t) if program.decay_kind is DecayKind.FULL and p > 1 else (b, h, t, t)


# The backward ops are plain library definitions without an autograd kernel (as in ops.py):
# their implementations differentiate one row block at a time with torch.autograd, which a
# `custom_op` (whose autograd kernel runs the implementation below autograd) would not allow.
_LIB = torch.library.Library("ssmc", "FRAGMENT")
_LIB.define("attention_matrix_bwd(Tensor[] inputs, Tensor grad, int route, str reduce) "
            "-> Tensor[]")
_LIB.define("mixing_loss_bwd(Tensor[] inputs, Tensor q, Tensor k, float scale, Tensor grad, "
            "int route) -> (Tensor[], Tensor, Tensor)")


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: an output must not alias an input, and its layout must be the one
    the fake implementation promises (a gradient of a strided view comes back contiguous)."""
    return x.clone(memory_format=torch.contiguous_format)


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _register_backward(name: str, impl, fake):
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"ssmc::{name}", fake, lib=_LIB)
    return getattr(torch.ops.ssmc, name).default


# --------------------------------------------------------------------------- attention matrix

@torch.library.custom_op("ssmc::attention_matrix", mutates_args=())
def attention_matrix_op(inputs: list[torch.Tensor], route: int, reduce: str) -> torch.Tensor:
    fn, plan, tensors, sizes = _serve(route, inputs, "attention_matrix")
    return fn(plan, tensors, sizes, reduce=reduce).contiguous()


@attention_matrix_op.register_fake
def _(inputs, route, reduce):
    program = _ROUTES[route][0]
    shape = matrix_shape(program, sizes_of(program, inputs), reduce)
    return inputs[0].new_empty(shape, dtype=_compute_dtype(program, inputs))


def _attention_matrix_bwd(inputs, grad, route, reduce):
    fn, plan, tensors, sizes = _serve(route, inputs, "attention_matrix_backward")
    grads = fn(plan, tensors, sizes, grad.contiguous(), reduce=reduce)
    return [_fresh(grads[n]) for n in plan.program.input_names]


def _attention_matrix_bwd_fake(inputs, grad, route, reduce):
    return [_empty_like(x) for x in inputs]


attention_matrix_bwd_op = _register_backward("attention_matrix_bwd", _attention_matrix_bwd,
                                             _attention_matrix_bwd_fake)


def _matrix_setup(ctx, inputs, output):
    tensors, route, reduce = inputs
    ctx.route, ctx.reduce = route, reduce
    ctx.save_for_backward(*tensors)


def _matrix_backward(ctx, grad):
    grads = attention_matrix_bwd_op(list(ctx.saved_tensors), grad, ctx.route, ctx.reduce)
    return list(grads), None, None


attention_matrix_op.register_autograd(_matrix_backward, setup_context=_matrix_setup)


# --------------------------------------------------------------------------- mixing loss

class _Kept(threading.local):
    """The host-side operands a mixing loss's forward keeps for its backward (module doc)."""

    want = False        # set by `mixing_loss` around an eager call that records a graph
    forward = None      # (the loss tensor, what its forward kept), until setup_context
    backward = None     # what the backward formula hands to the backward's implementation


_KEPT = _Kept()


@functools.lru_cache(maxsize=None)
def _takes(method, keyword: str) -> bool:
    return keyword in inspect.signature(method).parameters


def mixing_loss(inputs: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, scale: float,
                route: int) -> torch.Tensor:
    """`mixing_loss_op`; an eager call that records a graph (grad enabled, some tensor
    requiring it: torch's own condition) lets the forward keep its operands for the
    backward."""
    if torch.compiler.is_compiling() or not (
            torch.is_grad_enabled() and any(x.requires_grad for x in (*inputs, q, k))):
        return mixing_loss_op(inputs, q, k, scale, route)
    _KEPT.want = True
    try:
        return mixing_loss_op(inputs, q, k, scale, route)
    finally:
        _KEPT.want, _KEPT.forward = False, None


@torch.library.custom_op("ssmc::mixing_loss", mutates_args=())
def mixing_loss_op(inputs: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, scale: float,
                   route: int) -> torch.Tensor:
    fn, plan, tensors, sizes = _serve(route, inputs, "mixing_loss")
    if not (_KEPT.want and _takes(fn, "keep")):
        return _contiguous(fn(plan, tensors, sizes, q, k, scale))
    kept: list = []
    loss = _contiguous(fn(plan, tensors, sizes, q, k, scale, keep=kept))
    _KEPT.forward = (loss, kept[0]) if kept else None
    return loss


@mixing_loss_op.register_fake
def _(inputs, q, k, scale, route):
    program = _ROUTES[route][0]
    sizes = sizes_of(program, inputs)
    return q.new_empty((sizes["b"], sizes["h"]), dtype=_compute_dtype(program, inputs))


def _mixing_loss_bwd(inputs, q, k, scale, grad, route):
    fn, plan, tensors, sizes = _serve(route, inputs, "mixing_loss_backward")
    prepared, _KEPT.backward = _KEPT.backward, None
    extra = {"prepared": prepared} if prepared is not None and _takes(fn, "prepared") else {}
    # grad as it comes (the loss's sum hands an expanded one): the backends read it by strides
    grads, dq, dk = fn(plan, tensors, sizes, q, k, scale, grad, **extra)
    # copied only where a backend hands back a view of an input or another output's storage,
    # or a strided tensor (the fused kernels' gradients are fresh and contiguous already)
    taken = _storages([*inputs, q, k, grad])
    return ([_fresh_of(grads[n], taken) for n in plan.program.input_names],
            _fresh_of(dq, taken), _fresh_of(dk, taken))


def _mixing_loss_bwd_fake(inputs, q, k, scale, grad, route):
    return [_empty_like(x) for x in inputs], _empty_like(q), _empty_like(k)


mixing_loss_bwd_op = _register_backward("mixing_loss_bwd", _mixing_loss_bwd,
                                        _mixing_loss_bwd_fake)


def _loss_setup(ctx, inputs, output):
    tensors, q, k, scale, route = inputs
    ctx.scale, ctx.route, ctx.count = scale, route, len(tensors)
    ctx.save_for_backward(*tensors, q, k)
    # what this very call's forward kept (the slot holds the last forward's, in this thread)
    kept, _KEPT.forward = _KEPT.forward, None
    ctx.prepared = kept[1] if kept is not None and kept[0] is output else None


def _loss_backward(ctx, grad):
    saved = ctx.saved_tensors
    tensors, q, k = list(saved[:ctx.count]), saved[ctx.count], saved[ctx.count + 1]
    _KEPT.backward = getattr(ctx, "prepared", None)
    try:
        grads, dq, dk = mixing_loss_bwd_op(tensors, q, k, ctx.scale, grad, ctx.route)
    finally:
        _KEPT.backward = None
    return list(grads), dq, dk, None, None


mixing_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)
