"""The backend protocol and its explicit registry."""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch

from ..errors import BackendUnavailableError, UnsupportedError
from ..plan import Plan

#: why a lowering that sums log-decays without their sign refuses a decay that may reach 0 or
#: go negative (`Program.decay_log_safe`); `auto` then picks a lowering that computes it
SIGNED_DECAY_REASON = ("the decay may be zero or negative (it is not provably positive with a "
                       "closed-form log, as exp(u) or sigmoid(x) are), and this lowering sums "
                       "log-decays without their sign; the scan lowering (and the Triton "
                       "chunked lowering) compute such decays")

#: a log-decay below this is an exact reset, in every backend: the decay is under fp32's smallest
#: normal number (exp(-87) ~ 1.6e-38, which a GPU's exp flushes to 0) or exactly 0 (-inf)
RESET_BELOW = -87.0


def compute_dtype(plan: Plan) -> torch.dtype:
    """What every backend computes and accumulates in: float64 for float64 plans, else fp32."""
    return torch.float64 if plan.dtype == "float64" else torch.float32

#: kernel(tensors: dict[name, Tensor], sizes: dict[axis, int], initial_state, cu_seqlens)
#:   -> (output (b, t, h, p) in the output dtype, final state or None)
#:
#: A kernel that can be differentiated also carries
#: kernel.backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final)
#:   -> (grads: dict[input name, Tensor | None], grad_initial_state: Tensor | None)
#: computed by the backend itself (grad_final may be None; gradients have the inputs' shapes and
#: dtypes). The torch integration wraps forward and backward into one custom op.
#:
#: Such a kernel may also carry
#: kernel.forward_keep(tensors, sizes, initial_state, cu_seqlens)
#:   -> (output, final state or None, residual: a flat uint8 tensor)
#: the forward that also keeps what its own backward would otherwise form again, for
#: kernel.backward(..., residual=residual); an empty residual keeps nothing. A backward given a
#: residual it cannot use (another plan's) forms everything again.
Kernel = Callable[..., tuple]


class Backend(Protocol):
    name: str

    def is_available(self) -> bool: ...
    def supports(self, plan: Plan) -> str | None: ...
    def cache_tag(self) -> str: ...
    def compile(self, plan: Plan, config: dict | None = None) -> Kernel: ...


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def registered() -> dict[str, Backend]:
    return dict(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is not valid; valid values: auto, "
                         f"{', '.join(sorted(_BACKENDS))}")
    backend = _BACKENDS[name]
    if not backend.is_available():
        raise BackendUnavailableError(f"backend {name!r} is not available here: "
                                      f"{getattr(backend, 'unavailable_reason', lambda: '')()}")
    return backend


#: the order `backend="auto"` tries, per device type
AUTO_ORDER = {"cuda": ("triton", "tvm", "reference"), "cpu": ("tvm", "reference")}


def auto_candidates(device) -> list[Backend]:
    """The available backends `backend="auto"` tries on `device`, in order."""
    order = AUTO_ORDER.get(torch.device(device).type, ("reference",))
    return [b for b in (_BACKENDS.get(n) for n in order) if b is not None and b.is_available()]


def resolve_backend(name: str, device: torch.device, plan: Plan | None = None) -> Backend:
    """`auto` -> the first available backend for the device that supports the plan."""
    if name != "auto":
        backend = get_backend(name)
        why = backend.supports(plan) if plan is not None else None
        if why is not None:
            raise UnsupportedError(f"backend {name!r} cannot run {plan.describe()}: {why}")
        return backend
    reasons = []
    for backend in auto_candidates(device):
        why = backend.supports(plan) if plan is not None else None
        if why is None:
            return backend
        reasons.append(f"{backend.name}: {why}")
    raise BackendUnavailableError(f"no backend can run this on {device}: " + "; ".join(reasons))


def first_available(name: str, device: torch.device) -> str:
    """The backend `name` stands for on `device` before any plan is known: itself, or for
    `auto` the first available one of the device's auto order."""
    if name != "auto":
        return name
    available = auto_candidates(device)
    return available[0].name if available else "reference"


def implementing_lowerings(lowerings, name: str, device: torch.device, base: Plan) -> list[str]:
    """Those of `lowerings` that backend `name` (or, for `auto`, some backend of the device's
    auto order) can run, as `base` with that lowering."""
    out = []
    for lowering in lowerings:
        try:
            resolve_backend(name, device, dataclasses.replace(base, lowering=lowering))
        except (BackendUnavailableError, UnsupportedError):
            continue
        out.append(lowering)
    return out


def compile_plan(name: str, device: torch.device, plan: Plan) -> Kernel:
    """The kernel of `plan` from backend `name` (`auto`: the device's first that supports it)."""
    return resolve_backend(name, device, plan).compile(plan)


def backward_for(name: str, device: torch.device, plan: Plan, kernel: Kernel):
    """`kernel.backward`, or with `auto` the backward of the first backend in the device's auto
    order whose kernel has one (a backend whose kernels carry no backward still runs the
    forward; both compute the same function). None when there is none."""
    backward = getattr(kernel, "backward", None)
    if backward is not None or name != "auto":
        return backward
    for backend in auto_candidates(device):
        if backend.supports(plan) is not None:
            continue
        backward = getattr(backend.compile(plan), "backward", None)
        if backward is not None:
            return backward
    return None
