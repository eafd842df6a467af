"""mamba_ssm's entry points (2.3.x) on ssmc ops.

- `mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
  initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
  dt_limit=(0.0, inf), return_final_states=False, return_varlen_states=False)`: Mamba-2 SSD.
  States are mamba_ssm's (b, h, p, n) (ssmc's are (b, h, n, p)). Returns out, or
  (out, final_states), (out, varlen_states) or (out, final_states, varlen_states).
  `chunk_size` is accepted and ignored: ssmc picks its own lowering and tiles. Packed sequences
  (`seq_idx`, `cu_seqlens`) need batch 1; the state restarts at each sequence.
- `selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
  dt_softplus=False, state_batch_indices=None)`: one decode step, `state` (b, [h,] dim, n)
  updated in place (fp32, bf16 or fp16; a cache of slots with `state_batch_indices`, negative
  indices skipped as padding); per-channel dt and A as in mamba_ssm, Mamba-2's tied values run
  as ssmc's SSD step.
- `selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
  delta_softplus=False, return_last_state=False)`: Mamba-1's S6 in mamba_ssm's channel-major
  (b, d, l) layout; B, C (b, n, l), (b, g, n, l) or time-invariant (d, n). Returns out, or
  (out, last_state (b, d, n)). Complex A is not supported.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, ShapeError, UnsupportedError
from ..api import compiled_variant as compiled
from ..step import fixed_launch
from ..ops.selective_scan import build as s6_build
from ..ops.ssd import build as ssd_build

_INF = float("inf")


def _ssd_build():
    return ssd_build


def _s6_build():
    return s6_build


def _options(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def _seq_cu(seq_idx: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens from a (1, t) seq_idx of consecutive indices 0, 0, 1, 1, 1, 2, ..."""
    nseq = int(seq_idx[0, -1].item()) + 1 if total else 0
    bounds = torch.arange(nseq + 1, device=seq_idx.device, dtype=seq_idx.dtype)
    return torch.searchsorted(seq_idx[0].contiguous(), bounds).to(torch.int32)


# ---------------------------------------------------------------------------- Mamba-2 SSD

def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, _INF),
                              return_final_states=False, return_varlen_states=False, *,
                              backend="auto", lowering="auto"):
    """x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h, p) or (h,);
    z: (b, l, h, p); dt_bias: (h,); initial_states: (b, h, p, n); seq_idx: (b, l)."""
    fn = "mamba_chunk_scan_combined()"
    if return_varlen_states and cu_seqlens is None:
        raise ConfigError(f"{fn}: return_varlen_states=True needs 'cu_seqlens' (as in mamba_ssm)")
    packed = seq_idx is not None or (cu_seqlens is not None and return_varlen_states)
    cu = None
    if packed:
        if x.shape[0] != 1:
            name = "seq_idx" if seq_idx is not None else "cu_seqlens"
            raise UnsupportedError(f"{fn}: {name!r} with batch {x.shape[0]} is not supported; "
                                   "ssmc packs sequences into batch 1")
        if initial_states is not None:
            raise UnsupportedError(f"{fn}: 'initial_states' together with packed sequences "
                                   "('seq_idx'/'cu_seqlens') is not supported")
        cu = cu_seqlens if cu_seqlens is not None else _seq_cu(seq_idx, x.shape[1])
    options = _options(has_D=D is not None, D_per_channel=D is not None and D.dim() == 2,
                       has_z=z is not None, has_dt_bias=dt_bias is not None,
                       dt_softplus=bool(dt_softplus), dt_min=float(dt_limit[0]),
                       dt_max=float(dt_limit[1]))
    op = compiled(_ssd_build(), options, backend, lowering)
    tensors = [x, dt, A, B, C] + [t for t in (D, z, dt_bias) if t is not None]
    h0 = None if initial_states is None else initial_states.transpose(-1, -2)
    want_state = bool(return_final_states or return_varlen_states)
    result = op(*tensors, initial_state=h0, cu_seqlens=cu, return_final_state=want_state)
    if not want_state:
        return result
    out, states = result
    states = states.transpose(-1, -2)  # (.., n, p) -> mamba_ssm's (.., p, n)
    final = states
    if packed:
        final = states[-1:]  # the state at the end of the packed batch: its last sequence's
    if return_final_states and return_varlen_states:
        return out, final, states
    if return_varlen_states:
        return out, states
    return out, final


# ------------------------------------------------------------------------------ decode step

def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, state_batch_indices=None, *, backend="auto"):
    """state: (b, dim, n) or (b, h, dim, n), updated in place; x, dt, z: (b, [h,] dim);
    A: ([h,] dim, n); B, C: (b, [g,] n); D, dt_bias: ([h,] dim). Returns (b, [h,] dim).

    `state_batch_indices` (b,) names the row of `state` (a cache of slots) each sequence reads
    and updates; a negative index is padding, skipped (its output is zeros). Mamba-2's tied
    values (dt, A, D and dt_bias repeated over dim and n by expand, as mamba_ssm's Mamba2.step
    passes them) run ssmc's SSD step on the state in its own layout; otherwise each (head,
    channel) pair is a head of ssmc's Mamba-1 definition with value size 1 (the state
    (b, h, dim, n) is then ssmc's (b, h * dim, n, 1)).

    The first call with given shapes, strides, dtypes and devices checks everything; later
    calls with the same metadata launch the step kernel straight away, on the tensors as given
    (a decode loop calls this once per token per layer)."""
    key = _update_key(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                      backend)
    if key is not None:
        fast = _FAST_UPDATES.get(key)
        if fast is not None:
            return fast(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    y, fast = _checked_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                              state_batch_indices, backend)
    if key is not None and fast is not None:
        _FAST_UPDATES[key] = fast
    return y


#: (metadata of a selective_state_update call) -> its launch alone; see _update_key
_FAST_UPDATES: dict = {}


def _update_key(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx, backend):
    """Everything the checks and the choice of step look at: shapes, strides (the tied test,
    the views), dtypes, devices, the state's requires_grad, the options; None where an argument
    is not a tensor or None."""
    Tensor = torch.Tensor
    tensors = (state, x, dt, A, B, C, D, z, dt_bias, idx)
    metas = tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device)
                   for t in tensors if t is None or isinstance(t, Tensor)])
    if len(metas) != len(tensors) or state is None:
        return None
    return (backend, bool(dt_softplus), state.requires_grad, metas)


def _checked_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                    backend):
    """Every check of a selective_state_update call, then the step; returns (y, the launch
    alone for calls with the same metadata, or None where there is none)."""
    fn = "selective_state_update()"
    given = (x, dt, A, B, C, D, z, dt_bias)
    state_arg = state
    has_heads = state.dim() > 3
    if not has_heads:
        state = state.unsqueeze(1)
    args = tuple(None if t is None else _with_heads(i, t) for i, t in enumerate(given))
    x, dt, A, B, C, D, z, dt_bias = args
    _, h, dim, n = state.shape
    batch = x.shape[0]
    if state_batch_indices is None and state.shape[0] != batch:
        raise ShapeError(f"{fn}: the state has batch {state.shape[0]} but x has {batch}; pass "
                         "state_batch_indices to update some rows of a larger state")
    for name, t, want in (("x", x, (batch, h, dim)), ("dt", dt, (batch, h, dim)),
                          ("z", z, (batch, h, dim)), ("A", A, (h, dim, n)),
                          ("D", D, (h, dim)), ("dt_bias", dt_bias, (h, dim))):
        if t is not None and tuple(t.shape) != want:
            raise ShapeError(f"{fn}: {name!r} has shape {tuple(t.shape)} (heads added where "
                             f"missing); expected {want} for a state of shape "
                             f"{tuple(state.shape)}")
    build = _ssd_step if _tied(dt, A, dt_bias) else _s6_step
    op, picks, to_work = build(*args, dt_softplus, backend)
    tensors = [f(args[i]) for i, f in picks]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    in_place = (torch.float64,) if compute == torch.float64 else _STATE_DTYPES
    work = _view(to_work, state) if state.dtype in in_place else None
    with torch.no_grad():
        if work is not None:
            y = op.step(work, *tensors, state_batch_indices=state_batch_indices)
        else:
            y = _step_on_copy(op, tensors, state, state_batch_indices, to_work, compute)
    fast = None
    if work is not None and work.data_ptr() == state_arg.data_ptr():
        out_shape = (batch, h, dim) if has_heads else (batch, dim)
        fast = _fast_update(op, work, tensors, state_batch_indices, given, picks, out_shape,
                            y.dtype, x.dtype)
    y = y.reshape(batch, h, dim).to(x.dtype)
    return (y if has_heads else y.squeeze(1)), fast


def _with_heads(i: int, t: torch.Tensor) -> torch.Tensor:
    """Argument i of (x, dt, A, B, C, D, z, dt_bias) with its head (or group) axis, a view."""
    at, without = ((1, 2), (1, 2), (0, 2), (1, 2), (1, 2), (0, 1), (1, 2), (0, 1))[i]
    return t.unsqueeze(at) if t.dim() == without else t


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _fast_update(op, work, tensors, idx, given, picks, out_shape, y_dtype, x_dtype):
    """The step's launch alone for calls with the metadata of this one (`ssmc.step.
    fixed_launch`), on the caller's tensors as given: the state the step wrote through is a
    view of the caller's at the same address, and so is, as a rule, every input it read (an
    unsqueeze, an index 0 of an expanded axis, a reshape that made no copy); the kernel reads
    nothing of a tensor but its address and dtype, its strides being fixed with the rest. An
    input that is a copy (the reshape of an expanded tensor) is made again on each call. None
    where the backend has no such launch."""
    fixed = fixed_launch(op, False, work, tensors, idx)
    if fixed is None:
        return None
    # (argument index, None where the caller's tensor goes to the kernel as it is, else the
    # function that makes the kernel's tensor from it)
    plan = []
    for (i, f), t in zip(picks, tensors):
        src = given[i]
        alias = t.data_ptr() == src.data_ptr() and t.dtype == src.dtype
        plan.append((i, None if alias else lambda t, i=i, f=f: f(_with_heads(i, t))))
    device = work.device
    convert = y_dtype != x_dtype

    def fast(state, x, dt, A, B, C, D, z, dt_bias, idx):
        args = (x, dt, A, B, C, D, z, dt_bias)
        out = torch.empty(out_shape, dtype=y_dtype, device=device)
        fixed([args[i] if f is None else f(args[i]) for i, f in plan], state, idx, None, out)
        return out.to(x_dtype) if convert else out

    return fast


#: the state dtypes a step updates in place for 16- and 32-bit inputs (float32 math)
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _same_over(t: torch.Tensor, dims) -> bool:
    """Whether t holds one value along `dims` (repeated by expand, stride 0, or size 1)."""
    return all(t.shape[d] == 1 or t.stride(d) == 0 for d in dims)


def _tied(dt, A, dt_bias) -> bool:
    """Mamba-2's call: dt and dt_bias per head, A per head, repeated by expand over dim, n."""
    return (_same_over(dt, (-1,)) and _same_over(A, (-1, -2))
            and (dt_bias is None or _same_over(dt_bias, (-1,))))


def _ssd_step(x, dt, A, B, C, D, z, dt_bias, dt_softplus, backend):
    """(op, picks, to_work) for ssmc's SSD: `picks` lists the op's inputs as (index into (x,
    dt, A, B, C, D, z, dt_bias), the view of it); state (b, h, dim, n) is the op's (b, h, n, p)
    when transposed (a view: the step writes through the strides)."""
    per_channel = D is not None and not _same_over(D, (-1,))
    options = _options(has_D=D is not None, D_per_channel=per_channel, has_z=z is not None,
                       has_dt_bias=dt_bias is not None, dt_softplus=bool(dt_softplus),
                       dt_min=0.0, dt_max=_INF)
    op = compiled(_ssd_build(), options, backend, "auto")
    per_head = _first_of_dim
    picks = [(0, _same), (1, per_head), (2, _first_of_dim_n), (3, _same), (4, _same)]
    if D is not None:
        picks.append((5, _same if per_channel else per_head))
    if z is not None:
        picks.append((6, _same))
    if dt_bias is not None:
        picks.append((7, per_head))
    return op, picks, _transposed


def _first_of_dim(t: torch.Tensor) -> torch.Tensor:
    return t[..., 0]


def _first_of_dim_n(t: torch.Tensor) -> torch.Tensor:
    return t[:, 0, 0]


def _transposed(state: torch.Tensor) -> torch.Tensor:
    return state.transpose(-1, -2)


def _s6_step(x, dt, A, B, C, D, z, dt_bias, dt_softplus, backend):
    """(op, picks, to_work) for ssmc's Mamba-1 definition with a head per (head, channel) and
    value size 1 (`picks` as in _ssd_step): state (b, h, dim, n) viewed as (b, h * dim, n, 1)."""
    batch, h, dim = x.shape
    H, n = h * dim, A.shape[-1]
    options = _options(has_D=D is not None, has_z=z is not None,
                       has_delta_bias=dt_bias is not None, delta_softplus=bool(dt_softplus))
    op = compiled(_s6_build(), options, backend, "scan")

    def shaped(*shape):
        return lambda t: t.reshape(*shape)
    picks = [(0, shaped(batch, H, 1)), (1, shaped(batch, H)), (2, shaped(H, n)), (3, _same),
             (4, _same)]
    if D is not None:
        picks.append((5, shaped(H)))
    if z is not None:
        picks.append((6, shaped(batch, H, 1)))
    if dt_bias is not None:
        picks.append((7, shaped(H)))
    return op, picks, lambda s: s.view(s.shape[0], H, n, 1)


def _view(to_work, state):
    try:
        return to_work(state)
    except RuntimeError:   # strides that the (b, h * dim, n, 1) view cannot express
        return None


def _step_on_copy(op, tensors, state, idx, to_work, compute):
    """The step on a contiguous copy in the compute dtype, written back (a state dtype that
    the step does not update in place, float64 inputs with a float32 state, say)."""
    if idx is None:
        copy = state.to(compute).contiguous()
        y = op.step(to_work(copy), *tensors)
        state.copy_(copy)
        return y
    valid = (idx >= 0) & (idx < state.shape[0])
    copy = state[idx.clamp(0, state.shape[0] - 1)].to(compute).contiguous()
    y = op.step(to_work(copy), *tensors)
    state[idx[valid]] = copy[valid].to(state.dtype)
    return y.masked_fill(~valid.view(-1, *([1] * (y.dim() - 1))), 0)


# ------------------------------------------------------------------------- Mamba-1 (S6)

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, backend="auto", lowering="auto"):
    """u, delta, z: (b, d, l); A: (d, n) real; B, C: (b, n, l), (b, g, n, l) or (d, n);
    D, delta_bias: (d,). Returns out (b, d, l) [and last_state (b, d, n)]."""
    fn = "selective_scan_fn()"
    if A.is_complex():
        raise UnsupportedError(f"{fn}: complex 'A' is not supported (real SSMs only)")
    batch, d, length = u.shape

    def time_major(M, name):
        if M.is_complex():
            raise UnsupportedError(f"{fn}: complex {name!r} is not supported")
        if M.dim() == 2:  # time-invariant (d, n): one group per channel
            return M.unsqueeze(0).unsqueeze(0).expand(batch, length, d, M.shape[-1])
        if M.dim() == 3:  # (b, n, l)
            return M.transpose(1, 2).unsqueeze(2)
        if M.dim() == 4:  # (b, g, n, l)
            return M.permute(0, 3, 1, 2)
        raise ShapeError(f"{fn}: {name!r} has shape {tuple(M.shape)}; expected (d, n), "
                         "(b, n, l) or (b, g, n, l)")

    Bt, Ct = time_major(B, "B"), time_major(C, "C")
    if Bt.shape[2] != Ct.shape[2]:  # one of them time-invariant: give both per-channel groups
        Bt = Bt.expand(batch, length, d, Bt.shape[-1]) if Bt.shape[2] == 1 else Bt
        Ct = Ct.expand(batch, length, d, Ct.shape[-1]) if Ct.shape[2] == 1 else Ct
        if Bt.shape[2] != Ct.shape[2]:
            raise UnsupportedError(f"{fn}: 'B' and 'C' with different group counts "
                                   f"({B.shape} and {C.shape}) are not supported")
    options = _options(has_D=D is not None, has_z=z is not None,
                       has_delta_bias=delta_bias is not None,
                       delta_softplus=bool(delta_softplus))
    op = compiled(_s6_build(), options, backend, lowering)
    tensors = [u.transpose(1, 2).unsqueeze(-1), delta.transpose(1, 2), A, Bt, Ct]
    tensors += [t for t in (D, None if z is None else z.transpose(1, 2).unsqueeze(-1),
                            delta_bias) if t is not None]
    result = op(*tensors, return_final_state=bool(return_last_state))
    if return_last_state:
        out, last = result
        return out.squeeze(-1).transpose(1, 2), last.squeeze(-1)
    return result.squeeze(-1).transpose(1, 2)
