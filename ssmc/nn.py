"""nn.Module layers on ssmc ops.

`Mamba2` is the Mamba-2 mixer (in_proj, depthwise causal conv1d, SSD through ssmc, gated
RMSNorm, out_proj) with the parameter names and shapes of mamba_ssm's `Mamba2`, so a state dict
of one loads into the other. Its conv1d and gated RMSNorm are written in torch here.
`SSMLayer(definition, ...)` wraps any definition: its inputs without batch and time axes become
parameters, the others are the layer's arguments. `SS2D` (VMamba's 2-D selective scan on images,
one cross2d op) lives in `ssmc.nn_vision` and is exported here.

Incremental decoding follows mamba_ssm: pass an `InferenceParams` (same fields) with a
`layer_idx` on the layer; the first call (seqlen_offset == 0) runs the whole prompt and fills the
cache, later calls take one token each (or several: speculative decoding) and step the state in
place. One difference: the cached
SSM state has ssmc's shape (b, h, n, p) and is float32 (float64 for float64 models), what
`CompiledOp.step` updates in place; mamba_ssm keeps (b, h, p, n) in the model dtype. The conv
state is mamba_ssm's: (b, conv_dim, d_conv).

The layers allocate their decode states with n as the contiguous axis (a transposed view of (b,
h, p, n) memory, `decode_state`): the step kernel sums y over n, and with n contiguous that sum
stays within a warp (compiled for sm_90a: 2 barriers and 128 bytes of shared memory a program
against 5 and 2 KiB with p contiguous); on an H100 the same step kernel took 10-15% less
time so (benchmarks/RESULTS.md: the shim's rows, on that memory, against op.step's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import api
from .errors import ArgumentError, ConfigError, ShapeError, UnsupportedError
from .api import compiled_variant as compiled
from .nn_vision import SS2D
from .ops.ssd import build as ssd_build

__all__ = ["InferenceParams", "RMSNormGated", "Mamba2", "SS2D", "SSMLayer", "causal_conv1d",
           "decode_state", "seq_idx_from_cu_seqlens"]


@dataclass
class InferenceParams:
    """The decoding cache, with mamba_ssm's fields (mamba_ssm.utils.generation)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


# ------------------------------------------------------------------------------ building blocks

def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, total) int32: the index of the sequence each packed token belongs to."""
    pos = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], pos, right=True).to(torch.int32).unsqueeze(0)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  seq_idx: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """Depthwise causal convolution, channels-last: x (b, t, d), weight (d, w), bias (d,).
    out[t] = bias + sum_k weight[:, k] * x[t - (w - 1) + k]; with `seq_idx` (b, t), taps that
    reach into another sequence of a packed batch read zero (causal_conv1d's seq_idx)."""
    b, t, d = x.shape
    w = weight.shape[-1]
    if seq_idx is None:
        out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=w - 1, groups=d)
        out = out[..., :t].transpose(1, 2)
    else:
        xp = F.pad(x, (0, 0, w - 1, 0))
        sp = F.pad(seq_idx, (w - 1, 0), value=-1)
        out = x.new_zeros(b, t, d) if bias is None else bias.to(x.dtype).expand(b, t, d).clone()
        for k in range(w):
            same = (sp[:, k:k + t] == seq_idx).unsqueeze(-1).to(x.dtype)
            out = out + xp[:, k:k + t] * weight[:, k] * same
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise UnsupportedError(f"causal_conv1d: activation={activation!r} is not supported; "
                               "expected None, 'silu' or 'swish'")
    return out


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMSNorm (ops/triton/layernorm_gated.py RMSNorm), in torch: with z,
    norm(x) * silu(z) if norm_before_gate else norm(x * silu(z)); group_size splits the last
    dim into groups normalised separately. Computed in float32, returned in x's dtype."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True,
                 device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        dtype = x.dtype
        x = x.float() if dtype != torch.float64 else x
        if z is not None:
            z = z.to(x.dtype)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z)
        n = x.shape[-1]
        g = self.group_size or n
        xg = x.unflatten(-1, (n // g, g))
        rstd = torch.rsqrt(xg.square().mean(-1, keepdim=True) + self.eps)
        out = (xg * rstd).flatten(-2) * self.weight.to(x.dtype)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z)
        return out.to(dtype)


def decode_state(b: int, h: int, n: int, p: int, dtype=torch.float32, device=None) -> Tensor:
    """A zero (b, h, n, p) decode state in (b, h, p, n) memory (n contiguous), which the step
    kernel reads fastest (see the module's docstring)."""
    return torch.zeros(b, h, p, n, dtype=dtype, device=device).transpose(-1, -2)


# ---------------------------------------------------------------------------------- Mamba2

class Mamba2(nn.Module):
    """The Mamba-2 mixer of mamba_ssm (modules/mamba2.py), its SSD run by ssmc.

    Same constructor arguments and parameters (in_proj, conv1d, dt_bias, A_log, D, norm,
    out_proj). mamba_ssm's fused-kernel and sharding options are accepted where they change no
    result (use_mem_eff_path: the computation is the same; layer_idx); process_group is not
    supported. `backend`/`lowering` choose the ssmc op."""

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64,
                 d_ssm=None, ngroups=1, A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True,
                 norm_before_gate=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, chunk_size=256,
                 use_mem_eff_path=True, layer_idx=None, process_group=None,
                 sequence_parallel=True, device=None, dtype=None, backend="auto",
                 lowering="auto"):
        super().__init__()
        if process_group is not None:
            raise UnsupportedError("ssmc.nn.Mamba2: 'process_group' (tensor parallelism) is not "
                                   "supported")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.conv_init, self.expand = conv_init, expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        if self.d_ssm % headdim:
            raise ShapeError(f"Mamba2: d_ssm={self.d_ssm} is not a multiple of "
                             f"headdim={headdim}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ShapeError(f"Mamba2: nheads={self.nheads} is not a multiple of "
                             f"ngroups={ngroups}")
        self.D_has_hdim, self.rmsnorm = D_has_hdim, rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx

        # order: [z, x, B, C, dt] (plus [z0, x0] of the gated MLP when d_ssm < d_inner)
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()

        dt = torch.exp(torch.rand(self.nheads, **factory) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.dt_bias._no_weight_decay = True
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ConfigError(f"Mamba2: A_init_range={A_init_range} must be 0 < lo <= hi")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads,
                                         device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        options = dict(has_D=True, D_per_channel=D_has_hdim, has_z=not rmsnorm,
                       has_dt_bias=True, dt_softplus=True, dt_min=float(self.dt_limit[0]),
                       dt_max=float(self.dt_limit[1]))
        self._ssd_key = (ssd_build, tuple(sorted(options.items())), backend, lowering)
        compiled(*self._ssd_key)  # built now: a first call may be under torch.compile

    @property
    def ssd_op(self) -> api.CompiledOp:
        return compiled(*self._ssd_key)

    # -------------------------------------------------------------------------- pieces

    def _split(self, zxbcdt: Tensor):
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state
                 - self.nheads) // 2
        return torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm,
                                    self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads],
                           dim=-1)

    def _ssd_args(self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor):
        """The ssmc ssd inputs in the definition's order: x dt A B C D [z] dt_bias."""
        # at least float32 (mamba_ssm: in fp16, A might be -inf); float64 stays float64
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))
        D = self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D
        args = [x, dt, A, B, C, D]
        if not self.rmsnorm:
            args.append(z)
        args.append(self.dt_bias)
        return args

    def _heads(self, t: Tensor, size: int) -> Tensor:
        return t.unflatten(-1, (-1, size))

    def _finish(self, y: Tensor, z: Tensor, z0: Tensor, x0: Tensor) -> Tensor:
        y = y.flatten(-2)
        if self.rmsnorm:
            y = self.norm(y, z)
        if z0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (conv_dim, d_conv)

    # -------------------------------------------------------------------------- forward

    def forward(self, u: Tensor, seqlen=None, seq_idx=None, cu_seqlens=None,
                inference_params=None) -> Tensor:
        """u: (batch, seqlen, d_model), or (batch * seqlen, d_model) with `seqlen` given.
        `cu_seqlens` (with batch 1) packs sequences; `seq_idx` (b, t) is accepted with it
        (derived from it when omitted). Returns u's shape."""
        seqlen_og = seqlen
        if seqlen is None:
            batch, seqlen, _ = u.shape
        else:
            batch = u.shape[0] // seqlen
            u = u.view(batch, seqlen, -1)

        conv_state = ssm_state = None
        if inference_params is not None:
            states = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
            conv_state, ssm_state = self._get_states_from_cache(inference_params, states)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(u, conv_state, ssm_state)
                return out if seqlen_og is None else out.flatten(0, 1)

        zxbcdt = self.in_proj(u)
        z0, x0, z, xBC, dt = self._split(zxbcdt)
        if cu_seqlens is not None and seq_idx is None:
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)
        if conv_state is not None:
            conv_state.copy_(self._conv_states(xBC, cu_seqlens))
        xBC = causal_conv1d(xBC, self._conv_weight(), self.conv1d.bias, seq_idx=seq_idx,
                            activation=self.activation)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state,
                                    self.ngroups * self.d_state], dim=-1)
        args = self._ssd_args(self._heads(x, self.headdim), dt, self._heads(B, self.d_state),
                              self._heads(C, self.d_state), self._heads(z, self.headdim))
        if seq_idx is not None and cu_seqlens is None:
            raise UnsupportedError("ssmc.nn.Mamba2: 'seq_idx' without 'cu_seqlens' is not "
                                   "supported; pass cu_seqlens (b == 1) for packed sequences")
        if ssm_state is not None:
            y, final = self.ssd_op(*args, cu_seqlens=cu_seqlens, return_final_state=True)
            ssm_state.copy_(final)
        else:
            y = self.ssd_op(*args, cu_seqlens=cu_seqlens)
        out = self._finish(y, z, z0, x0)
        return out if seqlen_og is None else out.flatten(0, 1)

    def _conv_states(self, xBC: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
        """The last d_conv inputs of the conv per sequence, (states, conv_dim, d_conv), zero
        padded on the left for sequences shorter than d_conv."""
        w = self.d_conv
        if cu_seqlens is None:
            xt = xBC.transpose(1, 2)
            return F.pad(xt, (w - xt.shape[-1], 0))
        x = xBC[0]  # (total, conv_dim)
        ends = cu_seqlens[1:].long()
        starts = cu_seqlens[:-1].long()
        idx = ends.unsqueeze(1) - w + torch.arange(w, device=x.device)  # (states, w)
        valid = idx >= starts.unsqueeze(1)
        gathered = x[idx.clamp(min=0)] * valid.unsqueeze(-1).to(x.dtype)
        return gathered.transpose(1, 2)

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """k tokens (usually 1; more for speculative decoding): hidden_states (b, k, d_model);
        conv_state (b, conv_dim, d_conv) and ssm_state (b, h, n, p) (float32, bfloat16 or
        float16) are updated in place to their values after the k tokens. Returns
        (out (b, k, d_model), conv_state, ssm_state)."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] < 1:
            raise ShapeError(f"Mamba2.step: hidden_states must be (b, k, d_model) with k >= 1 "
                             f"tokens, got shape {tuple(hidden_states.shape)}")
        dtype = hidden_states.dtype
        zxbcdt = self.in_proj(hidden_states)
        z0, x0, z, xBC, dt = self._split(zxbcdt)
        xBC = self.act(self._conv_step(xBC, conv_state)).to(dtype)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state,
                                    self.ngroups * self.d_state], dim=-1)
        args = self._ssd_args(self._heads(x, self.headdim), dt, self._heads(B, self.d_state),
                              self._heads(C, self.d_state), self._heads(z, self.headdim))
        y = self.ssd_op.decode(ssm_state, *args)
        return self._finish(y, z, z0, x0), conv_state, ssm_state

    def _conv_step(self, xBC: Tensor, conv_state: Tensor) -> Tensor:
        """The conv's outputs for k new inputs xBC (b, k, conv_dim) from conv_state, the last
        d_conv inputs (b, conv_dim, d_conv), which then holds the last d_conv inputs again."""
        k, w = xBC.shape[1], self.d_conv
        if k == 1:
            conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
            conv_state[:, :, -1] = xBC[:, 0]
            out = (conv_state * self._conv_weight()).sum(-1, keepdim=True)
        else:
            window = torch.cat([conv_state, xBC.transpose(1, 2).to(conv_state.dtype)], -1)
            out = F.conv1d(window[..., 1:], self._conv_weight().unsqueeze(1),
                           groups=window.shape[1])
            conv_state.copy_(window[..., -w:])
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias[:, None]
        return out.transpose(1, 2)

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        """(conv_state (b, conv_dim, d_conv) in the conv's dtype, ssm_state (b, h, n, p) in
        float32, float64 for a float64 model; n contiguous, `decode_state`)."""
        w = self.conv1d.weight
        conv_dtype = w.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_conv, w.shape[0], device=w.device,
                                 dtype=conv_dtype).transpose(1, 2)
        model_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        state_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
        ssm_state = decode_state(batch_size, self.nheads, self.d_state, self.headdim,
                                 dtype=state_dtype, device=w.device)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ConfigError("Mamba2: decoding with inference_params needs layer_idx set on the "
                              "layer (the key of its cache entry)")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size)
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state


# --------------------------------------------------------------------------------- SSMLayer

class SSMLayer(nn.Module):
    """A layer around any definition.

    Inputs whose axes include neither `b` nor `t` (A, D, gamma, ...) become parameters, shaped
    by `sizes` (axis letter -> size) or given by `init` (name -> tensor); the layer is called
    with the remaining inputs, positionally or by name, plus the op's `initial_state`,
    `return_final_state` and `cu_seqlens`. `step(state, *inputs_at_t)` and
    `allocate_inference_cache(batch)` decode one token at a time (forward definitions).

        layer = SSMLayer(ssmc.ops.mamba2, sizes=dict(h=8), init={"A": -torch.ones(8)})
        y = layer(x, dt, B, C, z)
    """

    def __init__(self, definition, sizes: Optional[dict] = None, init: Optional[dict] = None,
                 backend: str = "auto", lowering: str = "auto", device=None, dtype=None):
        super().__init__()
        if isinstance(definition, api.CompiledOp):
            self.op = definition
        elif isinstance(definition, api.Definition):
            self.op = api.compile(definition, backend=backend, lowering=lowering)
        else:
            raise ArgumentError(f"SSMLayer expects an ssmc definition or compiled op, got "
                                f"{type(definition).__name__}")
        program = self.op.program
        sizes, init = dict(sizes or {}), dict(init or {})
        self.param_names = tuple(i.name for i in program.inputs
                                 if "b" not in i.axes and "t" not in i.axes)
        self.input_names = tuple(n for n in program.input_names if n not in self.param_names)
        unknown = set(init) - set(self.param_names)
        if unknown:
            raise ArgumentError(f"SSMLayer({program.name}): init got {sorted(unknown)}, which are "
                                f"not parameters; parameters are {list(self.param_names)}")
        for name in self.param_names:
            axes = program.input(name).axes
            if name in init:
                value = torch.as_tensor(init[name], device=device, dtype=dtype).clone()
                if value.dim() != len(axes):
                    raise ShapeError(f"SSMLayer({program.name}): init[{name!r}] has shape "
                                     f"{tuple(value.shape)}; {name!r} is annotated "
                                     f"\"{' '.join(axes)}\"")
            else:
                missing = [a for a in axes if a not in sizes]
                if missing:
                    raise ShapeError(f"SSMLayer({program.name}): parameter {name!r} "
                                     f"(\"{' '.join(axes)}\") needs sizes for "
                                     f"{', '.join(missing)}, or init[{name!r}]")
                value = torch.randn(*(sizes[a] for a in axes), device=device, dtype=dtype)
                value = value * 0.1
            setattr(self, name, nn.Parameter(value))

    def _arguments(self, args, kwargs) -> tuple[dict, dict]:
        """(the definition's tensors by name, the op's extra keyword arguments)."""
        name = self.op.program.name
        if len(args) > len(self.input_names):
            raise ArgumentError(f"SSMLayer({name}) takes {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}), got {len(args)}")
        values = dict(zip(self.input_names, args))
        extras = {}
        for k, v in kwargs.items():
            if k in values:
                raise ArgumentError(f"SSMLayer({name}) got multiple values for {k!r}")
            if k in self.param_names:
                raise ArgumentError(f"SSMLayer({name}): {k!r} is a parameter of the layer")
            (values if k in self.input_names else extras)[k] = v
        for p in self.param_names:
            values[p] = getattr(self, p)
        return values, extras

    def forward(self, *args, **kwargs):
        values, extras = self._arguments(args, kwargs)
        return self.op(**values, **extras)

    def step(self, state: Tensor, *args, **kwargs) -> Tensor:
        """One decode step (inputs without their t axis); `state` is updated in place."""
        values, extras = self._arguments(args, kwargs)
        if extras:
            raise ArgumentError(f"SSMLayer.step got {sorted(extras)}; it takes the state and the "
                                "inputs at one time step")
        return self.op.step(state, **values)

    def allocate_inference_cache(self, batch_size: int, dtype=torch.float32, device=None):
        """A zero state (b, h, n, p) for `step`, n contiguous (`decode_state`)."""
        ref = next(iter(self.parameters()), None)
        device = device if device is not None else (ref.device if ref is not None else "cpu")
        sizes = {}
        for name in self.param_names:
            for axis, size in zip(self.op.program.input(name).axes, getattr(self, name).shape):
                sizes[axis] = size
        missing = [a for a in ("h", "n", "p") if a not in sizes]
        if missing:
            raise ShapeError(f"SSMLayer({self.op.program.name}): the state size needs "
                             f"{', '.join(missing)}, which no parameter fixes; allocate "
                             "ssmc.nn.decode_state(b, h, n, p) yourself")
        return decode_state(batch_size, sizes["h"], sizes["n"], sizes["p"], dtype=dtype,
                            device=device)
