"""Decode steps: `op.step(state, *inputs_at_t)` advances a state by one token in place;
`op.decode(state, *inputs)` by the k tokens of inputs that keep their `t` axis (speculative
decoding: k draft tokens checked in one call).

The inputs of `step` are the definition's inputs with the `t` axis removed (x (b, h, p), dt
(b, h), B (b, g, n) for Mamba-2); inputs without `t` (A, D) are passed as they are. Each is
checked by `validate.bind` (after a size-1 `t` axis is inserted, a view), so every error a full
call would report is reported here in the same words. `state` is (b, h, n, p), or a cache of
slots (slots, h, n, p) with `state_batch_indices` (b,) naming the slot of each sequence (a
negative index is padding: skipped, its outputs are zeros); float32, bfloat16 or float16 (float64
for float64 inputs), any strides that do not overlap, on the inputs' device. The math is float32
whatever the state's dtype. `state_out_indices` ((b,) for `step`, (b, k) for `decode`) names
the slot the state after each token is written to (negative: not written); the state is then
not updated in place, so every accepted prefix's state stays recoverable. The result is y with
the output's axes: (b, h, p) for `step`, (b, k, h, p) for `decode`, in the output dtype.

The first call with given shapes, strides and dtypes checks everything and caches the launch;
later calls with the same metadata go straight to it (no planning, checks or host sync), which
keeps a decode loop cheap and capturable in a CUDA graph. Backends with `compile_step` (Triton)
run a generated kernel that reads and writes each state element once; the others run their scan
kernel on gathered rows, then scatter the state back. It is inference only: no autograd graph.
"""
from __future__ import annotations

import dataclasses

import torch

from .backends import resolve_backend
from .errors import (ArgumentError, BackendUnavailableError, ConfigError, DeviceError, DTypeError,
                     ShapeError, UnsupportedError)
from .ir import Direction
from .plan import Plan
from .planner import base_plan
from .validate import EXTRA_ARGS, bind

_STEP_KEY = "step"
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _compute_dtype(input_dtype: torch.dtype) -> torch.dtype:
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
                f"{tuple(x.shape)} ({x.dim()} dims); op.decode takes several tokens with it")
        out[name] = x.unsqueeze(inp.axes.index("t"))
    return out


def _check_state(fn: str, state, bound, slotted: bool) -> None:
    s = bound.sizes
    rows = "slots" if slotted else s["b"]
    want = (rows, s["h"], s["n"], s["p"])
    if not isinstance(state, torch.Tensor):
        raise DTypeError(f"{fn}: 'state' must be a torch.Tensor of shape (b, h, n, p) = {want}, "
                         f"got {type(state).__name__}")
    shape = tuple(state.shape)
    if len(shape) != 4 or shape[1:] != want[1:] or (not slotted and shape[0] != want[0]):
        what = "(slots, h, n, p)" if slotted else "(b, h, n, p)"
        raise ShapeError(f"{fn}: 'state' has shape {shape}; expected {what} = {want}")
    allowed = (torch.float64,) if bound.dtype == torch.float64 else _STATE_DTYPES
    if state.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise DTypeError(f"{fn}: 'state' has dtype {state.dtype}; expected one of {names} for "
                         f"{bound.dtype} inputs (the math is {_compute_dtype(bound.dtype)})")
    if state.device != bound.device:
        raise DeviceError(f"{fn}: 'state' is on {state.device} but the inputs are on "
                          f"{bound.device}")
    if any(st == 0 and n > 1 for st, n in zip(state.stride(), shape)):
        raise ShapeError(f"{fn}: 'state' has overlapping elements (strides {state.stride()} for "
                         f"shape {shape}); it is written in place, so each element needs its "
                         "own memory (pass a contiguous or transposed tensor, not an expand)")
    if state.requires_grad:
        raise ConfigError(f"{fn}: 'state' requires grad; a decode step updates it in place and "
                          "is inference only (pass state.detach())")


def _check_indices(fn: str, name: str, idx, want: tuple, bound, meaning: str) -> None:
    if idx is None:
        return
    if not isinstance(idx, torch.Tensor):
        raise DTypeError(f"{fn}: {name!r} must be a torch.Tensor of shape {want} ({meaning}), "
                         f"got {type(idx).__name__}")
    if idx.dtype not in _INDEX_DTYPES:
        raise DTypeError(f"{fn}: {name!r} has dtype {idx.dtype}; expected int32 or int64")
    if tuple(idx.shape) != want:
        raise ShapeError(f"{fn}: {name!r} has shape {tuple(idx.shape)}; expected {want} "
                         f"({meaning})")
    if idx.device != bound.device:
        raise DeviceError(f"{fn}: {name!r} is on {idx.device} but the inputs are on "
                          f"{bound.device}")


def _fallback(kernel, plan: Plan, t_axis: dict):
    """A step from a backend's scan kernel: gather the rows of the state, run, scatter back
    (and, for per-token states, one kernel call per token). Host-synchronising; CPU backends.
    Takes what `compile_step`'s launchers take: with t = 1, inputs without their `t` axis and
    `out_slots` (b,)."""
    cdt = _compute_dtype(getattr(torch, plan.dtype))
    rank = {i.name: len(i.axes) for i in plan.program.inputs}

    def launcher(tensors, sizes, state, slots=None, out_slots=None):
        tensors = {n: x.unsqueeze(t_axis[n]) if n in t_axis and x.dim() < rank[n] else x
                   for n, x in tensors.items()}
        if out_slots is not None and out_slots.dim() == 1:
            out_slots = out_slots.unsqueeze(1)
        with torch.no_grad():
            return run(tensors, sizes, state, slots, out_slots)

    def run(tensors, sizes, state, slots, out_slots):
        B, T, S = sizes["b"], sizes["t"], state.shape[0]
        rows = torch.arange(B, device=state.device) if slots is None else slots.long()
        valid = (rows >= 0) & (rows < S)
        h = state[rows.clamp(0, max(S - 1, 0))].to(cdt).contiguous()

        def write(values, dst):
            dst = dst.long()
            keep = valid & (dst >= 0) & (dst < S)
            state[dst[keep]] = values[keep].to(state.dtype)

        if out_slots is None:
            out, final = kernel(tensors, sizes, h, None)
            write(final, rows)
        else:
            outs = []
            for t in range(T):
                one = {n: x.narrow(t_axis[n], t, 1) if n in t_axis else x
                       for n, x in tensors.items()}
                y, h = kernel(one, dict(sizes, t=1), h, None)
                outs.append(y)
                write(h, out_slots[:, t])
            out = torch.cat(outs, 1) if outs else kernel(tensors, sizes, h, None)[0]
        return out.masked_fill(~valid.view(B, 1, 1, 1), 0)

    return launcher


def _launcher(op, plan: Plan, device: torch.device, t_axis: dict):
    """A callable (tensors, sizes, state, slots, out_slots) -> output (b, t, h, p) that updates
    `state`, cached on the op per plan and device type: the backend's `compile_step(plan)` where
    it has one, else its scan kernel around gathered rows (`_fallback`). Launchers make no
    autograd graph: the Triton one runs no torch op but the output's allocation."""
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
        launcher = _fallback(backend.compile(plan), plan, t_axis)
    op._kernels[key] = launcher
    return launcher


def _signature(tokens, state, args, kwargs, slots, out_slots):
    """Everything the checks look at (shapes, strides, dtypes, devices, the state's
    requires_grad), so that a repeated call with tensors of the same metadata can skip straight
    to the launch (decode loops call this once per token and layer, where microseconds of Python
    are a visible share of the time); None where an argument is not a tensor: such a call is
    checked in full every time."""
    Tensor = torch.Tensor
    metas = tuple([(a.shape, a.stride(), a.dtype, a.device) for a in args
                   if isinstance(a, Tensor)])
    if len(metas) != len(args) or not isinstance(state, Tensor):
        return None
    sig = (_STEP_KEY, tokens, state.shape, state.stride(), state.dtype, state.device,
           state.requires_grad, metas)
    for idx in (slots, out_slots):
        if idx is None:
            sig += (None,)
        elif isinstance(idx, Tensor):
            sig += ((idx.shape, idx.stride(), idx.dtype, idx.device),)
        else:
            return None
    if kwargs:
        for k, v in sorted(kwargs.items()):
            if not isinstance(v, Tensor):
                return None
            sig += ((k, v.shape, v.stride(), v.dtype, v.device),)
    return sig


def step(op, state, *args, state_batch_indices=None, state_out_indices=None,
         **kwargs) -> torch.Tensor:
    """Advance `state` by one token of compiled op `op`'s recurrence; return y_t
    (`CompiledOp.step`)."""
    return _run(op, False, state, args, kwargs, state_batch_indices, state_out_indices)


def decode(op, state, *args, state_batch_indices=None, state_out_indices=None,
           **kwargs) -> torch.Tensor:
    """Advance `state` by the k tokens of inputs with their `t` axis; return y (b, k, h, p)
    (`CompiledOp.decode`)."""
    return _run(op, True, state, args, kwargs, state_batch_indices, state_out_indices)


def _run(op, tokens, state, args, kwargs, slots, out_slots):
    sig = _signature(tokens, state, args, kwargs, slots, out_slots)
    if sig is not None:
        fast = op._kernels.get(sig)
        if fast is not None:
            return fast(state, args, kwargs, slots, out_slots)
        out, fast = _checked(op, tokens, state, args, kwargs, slots, out_slots)
        op._kernels[sig] = fast
        return out
    return _checked(op, tokens, state, args, kwargs, slots, out_slots)[0]


def fixed_launch(op, tokens: bool, state, args, slots=None, out_slots=None):
    """After a call `op.step(state, *args, state_batch_indices=slots, state_out_indices=
    out_slots)` (`op.decode` with `tokens`): the launch for calls whose tensors have the same
    metadata, `fixed(inputs, state, slots, out_slots, out=None)` with the inputs in the program's
    order (see `launch.bind` in backends/triton/lowerings/step.py), which callers that check
    their own arguments (ssmc.compat) call directly; None where the backend has none."""
    sig = _signature(tokens, state, args, {}, slots, out_slots)
    fast = None if sig is None else op._kernels.get(sig)
    return getattr(fast, "fixed", None)


def _checked(op, tokens, state, args, kwargs, slots, out_slots):
    """Every check of a step call, then the launch; returns (y, the launch alone for calls
    with the same metadata)."""
    program = op.program
    fn = f"{program.name}.{'decode' if tokens else 'step'}()"
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
    positional, keywords = dict(zip(names, args)), kwargs
    if not tokens:
        positional, keywords = _insert_t(fn, program, positional), _insert_t(fn, program, kwargs)
    try:
        bound = bind(program, tuple(positional[n] for n in names[:len(args)]), keywords)
    except (ShapeError, DTypeError, TypeError) as e:
        # the same check as a full call, reported as the step's (shapes show the t=1 axis)
        msg = str(e)
        if msg.startswith(f"{program.name}()"):
            msg = fn + msg[len(program.name) + 2:]
        if isinstance(e, ShapeError) and not tokens:
            msg += " (shapes include the inserted time axis t=1)"
        raise type(e)(msg) from None
    sizes = bound.sizes
    B, T = sizes["b"], sizes["t"]
    _check_state(fn, state, bound, slots is not None)
    _check_indices(fn, "state_batch_indices", slots, (B,), bound, "the state slot of each "
                   "sequence; negative: padding")
    out_want = (B, T) if tokens else (B,)
    _check_indices(fn, "state_out_indices", out_slots, out_want, bound, "the slot the state "
                   "after each token is written to; negative: not written")

    # a step is the scan over t=1 (or the k tokens) from the state, returning the state after
    plan = dataclasses.replace(base_plan(program, bound, "scan"), has_initial_state=True,
                               return_final_state=True)
    t_axis = {i.name: i.axes.index("t") for i in program.inputs if "t" in i.axes}
    launcher = _launcher(op, plan, bound.device, t_axis)
    bind_launch = getattr(launcher, "bind", None)
    if bind_launch is None:
        def fast(state, args, kwargs, slots, out_slots):
            """The launch alone, for a call whose tensors match this one's metadata (a step's
            inputs go without their `t` axis: the launcher reads them as one time step)."""
            tensors = dict(zip(names, args))
            tensors.update(kwargs)
            y = launcher(tensors, sizes, state, slots, out_slots)
            return y if tokens else y.select(1, 0)

        return fast(state, args, kwargs, slots, out_slots), fast

    # the backend's launch with every argument but the tensors fixed by this call's metadata
    tensors = dict(zip(names, args))
    tensors.update(kwargs)
    fixed = bind_launch(tensors, sizes, state, slots, out_slots)
    out_shape = (B, T, sizes["h"], sizes["p"]) if tokens else (B, sizes["h"], sizes["p"])
    out_dtype = getattr(torch, plan.dtype)
    device = bound.device
    if len(args) == len(names):          # positional: the inputs in order already
        def fast(state, args, kwargs, slots, out_slots):
            """The launch alone, for a call whose tensors match this one's metadata."""
            out = torch.empty(out_shape, dtype=out_dtype, device=device)
            return fixed(args, state, slots, out_slots, out)
    else:
        def fast(state, args, kwargs, slots, out_slots):
            """The launch alone, for a call whose tensors match this one's metadata."""
            out = torch.empty(out_shape, dtype=out_dtype, device=device)
            return fixed(args + tuple(kwargs[n] for n in names[len(args):]), state, slots,
                         out_slots, out)

    fast.fixed = fixed
    return fast(state, args, kwargs, slots, out_slots), fast
