"""The forwards that a patched `transformers` Mamba2Mixer or MambaMixer runs.

They call the mixer's own submodules (in_proj, conv1d, act, norm, x_proj, out_proj) and read
its parameters (A_log, D, dt_bias, dt_proj), so the state dict, weight tying and hooks on those
submodules stay as they were; only the recurrence moves to an ssmc op, and the causal conv's
cache handling is written here once for prefill and decode alike.

Which path runs:
- no cache (training, plain forward): the op over the whole sequence, differentiable;
- a cache without state yet (prefill): the same, also returning the final state;
- a cache with state: the op continues from it (`initial_state`); a single token with
  autograd off, outside `torch.compile`, takes the op's decode step (`CompiledOp.step`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..api import CompiledOp, compile as compile_op
from ..ops.selective_scan import build as s6_build
from ..ops.ssd import build as ssd_build
from .hf_cache import LayerCache, layer_cache


# ------------------------------------------------------------------------------ ops

# (builder, options, backend, lowering) -> its CompiledOp. Mixers keep the key, not the op: a
# deep-copied model shares the op, and torch.compile traces the lookup as a dict access
_OPS: dict[tuple, CompiledOp] = {}


def op_for(key: tuple) -> CompiledOp:
    """The compiled op of `key`, built on first use (`patch` builds it: a first call may be
    under torch.compile, which must not trace a build)."""
    op = _OPS.get(key)
    if op is None:
        builder, options, backend, lowering = key
        op = _OPS[key] = compile_op(builder(**dict(options)), backend=backend,
                                    lowering=lowering)
    return op


def mamba2_op_key(mixer, backend: str, lowering: str) -> tuple:
    """The key of the SSD variant a Mamba2Mixer needs: D per head, dt_bias, softplus, the
    clamp of `time_step_limit`; the gate is in the mixer's norm."""
    lo, hi = mixer.time_step_limit
    options = dict(has_D=True, D_per_channel=False, has_z=False, has_dt_bias=True,
                   dt_softplus=True, dt_min=float(lo), dt_max=float(hi))
    return (ssd_build, tuple(sorted(options.items())), backend, lowering)


def mamba_op_key(mixer, backend: str, lowering: str) -> tuple:
    """The key of the selective-scan variant a MambaMixer needs: D, the gate z, the bias of
    dt_proj (where it has one) and softplus."""
    options = dict(has_D=True, has_z=True, has_delta_bias=mixer.dt_proj.bias is not None,
                   delta_softplus=True)
    return (s6_build, tuple(sorted(options.items())), backend, lowering)


# ---------------------------------------------------------------------------- pieces

def _mask(x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero the padded positions of x (b, t, c). Releases pass the 2D mask of the whole
    sequence or of this call's tokens; its last t columns are this call's."""
    if attention_mask is None or attention_mask.dim() != 2:
        return x
    return (x * attention_mask[:, -x.shape[1]:, None]).to(x.dtype)


def causal_conv(conv1d: nn.Conv1d, x: torch.Tensor, prev: Optional[torch.Tensor]):
    """The depthwise causal conv of new inputs x (b, c, t) after earlier inputs `prev`
    (b, c, >= kernel - 1; None: zeros). Returns the outputs before the activation (b, c, t)
    and the window of the last `kernel` inputs (b, c, kernel), the next conv state.

    The module itself is called (hooks on it run, as they do unpatched); its own padding
    (kernel - 1 on both sides in transformers) adds outputs, of which the new inputs' are
    kept."""
    k, pad, t = conv1d.kernel_size[0], conv1d.padding[0], x.shape[-1]
    if prev is None:
        full = F.pad(x, (k - 1, 0))
    else:
        full = torch.cat([prev[..., prev.shape[-1] - (k - 1):].to(x.dtype), x], dim=-1)
    return conv1d(full)[..., pad:pad + t], full[..., -k:]


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_op(op, timed: dict, fixed: dict, h0: Optional[torch.Tensor], want_state: bool):
    """y (and the final state (b, h, n, p), else None) of `op` on `timed` inputs (axis 1 is t)
    and `fixed` ones, starting from h0 (b, h, n, p) or zeros. h0 is never written."""
    x = next(iter(timed.values()))
    if (h0 is not None and x.shape[1] == 1 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        state = h0.to(dtype=_state_dtype(x.dtype), memory_format=torch.contiguous_format,
                      copy=True)
        y = op.step(state, **{k: v.squeeze(1) for k, v in timed.items()}, **fixed)
        return y.unsqueeze(1), state
    if not want_state:
        return op(**timed, **fixed, initial_state=h0), None
    return op(**timed, **fixed, initial_state=h0, return_final_state=True)


def _cache_args(cache, cache_params):
    return cache if cache is not None else cache_params


# --------------------------------------------------------------------------- Mamba-2

def mamba2_forward(mixer, hidden_states: torch.Tensor, cache=None, attention_mask=None, *,
                   cache_params=None, cache_position=None, **kwargs) -> torch.Tensor:
    """Mamba2Mixer.forward on ssmc: in_proj -> [gate, xBC, dt]; causal conv and act on xBC;
    SSD of x, dt, B, C; the mixer's gated norm; out_proj."""
    state = layer_cache(_cache_args(cache, cache_params), mixer.layer_idx, cache_position)
    dtype = hidden_states.dtype
    h, p = mixer.num_heads, mixer.head_dim
    g, n = mixer.n_groups, mixer.ssm_state_size
    projected = mixer.in_proj(_mask(hidden_states, attention_mask))
    gate, xBC, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, h], dim=-1)
    conv_in = xBC.transpose(1, 2)
    xBC, window = causal_conv(mixer.conv1d, conv_in, None if state is None else state.conv)
    xBC = _mask(mixer.act(xBC).transpose(1, 2), attention_mask)
    x, B, C = xBC.split([h * p, g * n, g * n], dim=-1)
    timed = dict(x=x.unflatten(-1, (h, p)), dt=dt, B=B.unflatten(-1, (g, n)),
                 C=C.unflatten(-1, (g, n)))
    fixed = dict(A=-torch.exp(mixer.A_log.float()), D=mixer.D, dt_bias=mixer.dt_bias)
    h0 = None if state is None or state.ssm is None else state.ssm.transpose(-1, -2)
    y, final = run_op(op_for(mixer._ssmc_op_key), timed, fixed, h0, state is not None)
    if state is not None:  # the cache keeps (b, h, p, n)
        _write(state, conv_in, window, final.transpose(-1, -2).contiguous())
    y = mixer.norm(y.flatten(-2), gate)
    return mixer.out_proj(y.to(dtype))


# ----------------------------------------------------------------------------- Mamba

def mamba_forward(mixer, hidden_states: torch.Tensor, cache=None, attention_mask=None, *,
                  cache_params=None, cache_position=None, **kwargs) -> torch.Tensor:
    """MambaMixer.forward on ssmc: in_proj -> [x, z]; causal conv and act on x; x_proj ->
    [dt, B, C]; dt_proj's weight on dt (its bias is the scan's delta_bias); the selective scan
    with D and the gate silu(z); out_proj."""
    state = layer_cache(_cache_args(cache, cache_params), mixer.layer_idx, cache_position)
    dtype = hidden_states.dtype
    n, rank = mixer.ssm_state_size, mixer.time_step_rank
    x, z = mixer.in_proj(_mask(hidden_states, attention_mask)).chunk(2, dim=-1)
    conv_in = x.transpose(1, 2)
    x, window = causal_conv(mixer.conv1d, conv_in, None if state is None else state.conv)
    x = _mask(mixer.act(x).transpose(1, 2), attention_mask)
    dt, B, C = mixer.x_proj(x).split([rank, n, n], dim=-1)
    dt = F.linear(dt, mixer.dt_proj.weight)
    # one head per channel with value size 1: u, z (b, t, d, 1); B, C one group (b, t, 1, n)
    timed = dict(u=x.unsqueeze(-1), delta=dt, B=B.unsqueeze(2), C=C.unsqueeze(2),
                 z=z.unsqueeze(-1))
    fixed = dict(A=-torch.exp(mixer.A_log.float()), D=mixer.D)
    if mixer.dt_proj.bias is not None:
        fixed["delta_bias"] = mixer.dt_proj.bias
    h0 = None if state is None or state.ssm is None else state.ssm.unsqueeze(-1)
    y, final = run_op(op_for(mixer._ssmc_op_key), timed, fixed, h0, state is not None)
    if state is not None:  # the cache keeps (b, d, n)
        _write(state, conv_in, window, final.squeeze(-1))
    return mixer.out_proj(y.squeeze(-1).to(dtype))


def _write(state: LayerCache, conv_in, window, ssm) -> None:
    # the cache holds no autograd history (a decode step of a model being trained)
    state.write(conv_in.detach(), window.detach(), ssm.detach())
