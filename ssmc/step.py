"""One decode step: `op.step(state, *inputs_at_t)` advances a state by one time step in place.

The inputs are the definition's inputs with the `t` axis removed (x (b, h, p), dt (b, h),
B (b, g, n) for Mamba-2); inputs without `t` (A, D) are passed as they are. Each is checked by
`validate.bind` after a size-1 `t` axis is inserted (a view), so every error a full call would
report is reported here in the same words. `state` is (b, h, n, p) in the compute dtype
(float32; float64 for float64 inputs), contiguous and on the inputs' device; it is read and
overwritten. The result is y_t with the output's axes minus `t`: (b, h, p) in the output dtype.

The step is the scan lowering with T = 1 whose initial and final state are one buffer, which
every backend computes exactly as the full-sequence scan does, so a decode loop reproduces the
forward pass. It is inference only: no autograd graph is recorded.
"""
from __future__ import annotations

import torch

from .backends import resolve_backend
from .errors import (ArgumentError, BackendUnavailableError, ConfigError, DeviceError, DTypeError,
                     ShapeError, UnsupportedError)
from .ir import Direction
from .plan import Plan
from .validate import EXTRA_ARGS, bind

_STEP_KEY = "step"


def _state_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _insert_t(fn: str, program, values: dict) -> dict:
    """Give every input annotated with `t` a size-1 `t` axis at its annotated position."""
    out = {}
    for name, x in values.items():
        try:
            inp = program.input(name)
        except KeyError:
            out[name] = x  # bind reports the unknown argument
            continue
        if "t" not in inp.axes or not isinstance(x, torch.Tensor):
            out[name] = x  # bind reports non-tensors with its own message
            continue
        at_step = tuple(a for a in inp.axes if a != "t")
        if x.dim() != len(at_step):
            raise ShapeError(
                f'{fn}: {name!r} is annotated "{" ".join(inp.axes)}"; one step takes it without '
                f'the time axis, "{" ".join(at_step)}" ({len(at_step)} axes), but it has shape '
                f"{tuple(x.shape)} ({x.dim()} dims)")
        out[name] = x.unsqueeze(inp.axes.index("t"))
    return out


def _check_state(fn: str, state, bound) -> None:
    s = bound.sizes
    want = (s["b"], s["h"], s["n"], s["p"])
    dtype = _state_dtype(bound.dtype)
    if not isinstance(state, torch.Tensor):
        raise DTypeError(f"{fn}: 'state' must be a torch.Tensor of shape (b, h, n, p) = {want}, "
                         f"got {type(state).__name__}")
    if tuple(state.shape) != want:
        raise ShapeError(f"{fn}: 'state' has shape {tuple(state.shape)}; expected (b, h, n, p) "
                         f"= {want}")
    if state.dtype != dtype:
        raise DTypeError(f"{fn}: 'state' has dtype {state.dtype}; expected {dtype} (the state "
                         f"is kept in {dtype} for {bound.dtype} inputs)")
    if state.device != bound.device:
        raise DeviceError(f"{fn}: 'state' is on {state.device} but the inputs are on "
                          f"{bound.device}")
    if not state.is_contiguous():
        raise ShapeError(f"{fn}: 'state' must be contiguous (it is updated in place), got strides "
                         f"{tuple(state.stride())}; expected {_contiguous_strides(want)}")
    if state.requires_grad:
        raise ConfigError(f"{fn}: 'state' requires grad; a decode step updates it in place and "
                          "is inference only (pass state.detach())")


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def _launcher(op, plan: Plan, device: torch.device):
    """A callable (tensors, sizes, state) -> output (b, 1, h, p) that updates `state`,
    cached on the op per plan and device type: the backend's `compile_step(plan)` where it has
    one, else its kernel with the final state copied back."""
    key = (_STEP_KEY, plan, device.type)
    launcher = op._kernels.get(key)
    if launcher is not None:
        return launcher
    try:
        backend = resolve_backend(op.backend_name, device, plan)
    except (BackendUnavailableError, UnsupportedError) as e:
        raise type(e)(f"{op.program.name}.step(): {e}") from None

    compile_step = getattr(backend, "compile_step", None)
    if compile_step is not None:   # the backend updates the state in place itself
        launcher = compile_step(plan)
    else:
        kernel = backend.compile(plan)

        def launcher(tensors, sizes, state):
            out, final = kernel(tensors, sizes, state, None)
            state.copy_(final)
            return out

    op._kernels[key] = launcher
    return launcher


def _signature(state, args, kwargs):
    """Everything the checks below look at, so that a repeated call with tensors of the same
    shapes, strides, dtypes and devices can skip straight to the launch (decode loops call
    this once per token, where microseconds of Python are a visible share of the time)."""
    def meta(x):
        if not isinstance(x, torch.Tensor):
            return None
        return (tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
    parts = [meta(state)] + [meta(a) for a in args]
    parts += [(k, meta(v)) for k, v in sorted(kwargs.items())]
    if any(p is None or (isinstance(p, tuple) and p[-1] is None) for p in parts):
        return None
    return tuple(parts)


def step(op, state, *args, **kwargs) -> torch.Tensor:
    """Advance `state` (b, h, n, p) by one step of compiled op `op`'s recurrence, in place;
    return y_t (`CompiledOp.step`)."""
    sig = _signature(state, args, kwargs)
    fast = op._kernels.get((_STEP_KEY, sig)) if sig is not None else None
    if fast is not None:
        return fast(state, args, kwargs)
    out, fast = _checked_step(op, state, args, kwargs)
    if sig is not None:
        op._kernels[(_STEP_KEY, sig)] = fast
    return out


def _checked_step(op, state, args, kwargs):
    program = op.program
    fn = f"{program.name}.step()"
    if program.recurrence.directions != (Direction.FORWARD,):
        raise UnsupportedError(
            f"{fn}: the definition runs direction={program.recurrence.direction_name!r}; a "
            "decode step needs a causal (forward) recurrence, since the output at t depends on "
            "later steps otherwise")
    extras = [k for k in EXTRA_ARGS if k in kwargs]
    if extras:
        raise ArgumentError(f"{fn} got {', '.join(repr(k) for k in extras)}; a step takes the "
                            "state as its first argument, updates it in place and takes no "
                            "'initial_state', 'return_final_state' or 'cu_seqlens'")
    names = program.input_names
    if len(args) > len(names):
        raise ArgumentError(f"{fn} takes the state and {len(names)} tensor arguments "
                            f"({', '.join(names)}) but {len(args)} tensors were given")
    positional = _insert_t(fn, program, dict(zip(names, args)))
    keywords = _insert_t(fn, program, kwargs)
    try:
        bound = bind(program, tuple(positional[n] for n in names[:len(args)]), keywords)
    except (ShapeError, DTypeError, TypeError) as e:
        # the same check as a full call, reported as the step's (shapes show the t=1 axis)
        msg = str(e)
        if msg.startswith(f"{program.name}()"):
            msg = fn + msg[len(program.name) + 2:]
        if isinstance(e, ShapeError):
            msg += " (shapes include the inserted time axis t=1)"
        raise type(e)(msg) from None
    _check_state(fn, state, bound)

    plan = Plan(program=program, lowering="scan", dtype=str(bound.dtype).split(".")[1],
                has_initial_state=True, return_final_state=True, varlen=False)
    launcher = _launcher(op, plan, bound.device)
    sizes = bound.sizes
    names = program.input_names
    t_axis = {i.name: i.axes.index("t") for i in program.inputs if "t" in i.axes}

    def fast(state, args, kwargs):
        """The launch alone, for a call whose tensors match this one's metadata."""
        values = dict(zip(names, args))
        values.update(kwargs)
        tensors = {n: (values[n].unsqueeze(t_axis[n]) if n in t_axis else values[n])
                   for n in names}
        with torch.no_grad():
            return launcher(tensors, sizes, state).select(1, 0)

    return fast(state, args, kwargs), fast
