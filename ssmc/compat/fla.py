"""flash-linear-attention's entry points (fla 0.6) on ssmc ops.

FLA's layout is time-major like ssmc's: q, k (B, T, H, K), v (B, T, H, V); its state
(N, H, K, V) is ssmc's (b, h, n, p) (or (N, H, V, K) with `state_v_first=True`, transposed
here). Gates are logs: `g` (B, T, H) per head (simple GLA), `gk`-style `g` (B, T, H, K) per key
(GLA), `g_gamma` (H,) a fixed per-head log decay. `scale` defaults to K ** -0.5. Every function
returns (o, final_state), final_state None unless `output_final_state`. With `cu_seqlens` the
batch is 1 and there are len(cu_seqlens) - 1 states.

`chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
    output_final_state=False, state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None)`
`fused_recurrent_simple_gla(..., reverse=False, ...)`: the same recurrence, `reverse` runs it
    from the last step to the first (ssmc's direction="reverse").
`chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
    state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None)`
"""
from __future__ import annotations

from .. import api
from .. import dsl as S
from ..errors import UnsupportedError
from ..api import compiled_variant as compiled
from ..ops.gla import build as gla_build


def build_simple_gla(scale: float, gate: str, direction: str = "forward"):
    """state_t = exp(g_t) state_{t-1} + k_t (x) v_t;  o_t = (scale q_t) . state_t, with g
    per step and head ("g"), a fixed per-head g_gamma ("g_gamma") or no decay ("none")."""
    if gate == "g":
        def simple_gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                       g: S.In["b t h"]):
            return S.recurrence(decay=S.exp(g), key=k, value=v, query=q * scale,
                                direction=direction)
    elif gate == "g_gamma":
        def simple_gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                       g_gamma: S.In["h"]):
            return S.recurrence(decay=S.exp(g_gamma), key=k, value=v, query=q * scale,
                                direction=direction)
    else:
        def simple_gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
            return S.recurrence(key=k, value=v, query=q * scale, direction=direction)
    return api.ssm(simple_gla, name="simple_gla")


def _gla_build(scale: float):
    return gla_build(scale)


def _check_kwargs(fn: str, kwargs: dict, allowed=("chunk_size",)):
    if "head_first" in kwargs:
        raise UnsupportedError(f"{fn}: 'head_first' is not supported (removed in FLA, too); "
                               "inputs are [B, T, H, ...]")
    for name in kwargs:
        if name not in allowed:
            raise UnsupportedError(f"{fn}: argument {name!r} is not supported")


def _scale(k, scale) -> float:
    return float(k.shape[-1] ** -0.5 if scale is None else scale)


def _run(op, tensors, initial_state, output_final_state, state_v_first, cu_seqlens):
    h0 = initial_state
    if h0 is not None and state_v_first:
        h0 = h0.transpose(-1, -2)
    result = op(*tensors, initial_state=h0, cu_seqlens=cu_seqlens,
                return_final_state=bool(output_final_state))
    if not output_final_state:
        return result, None
    o, ht = result
    return o, (ht.transpose(-1, -2) if state_v_first else ht)


def _simple_gla(fn, q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                state_v_first, cu_seqlens, direction, backend, lowering):
    if g is not None and g_gamma is not None:
        raise UnsupportedError(f"{fn}: 'g' and 'g_gamma' together are not supported; give one")
    gate = "g" if g is not None else ("g_gamma" if g_gamma is not None else "none")
    options = (("direction", direction), ("gate", gate), ("scale", _scale(k, scale)))
    op = compiled(build_simple_gla, options, backend, lowering)
    tensors = [q, k, v] + [t for t in (g, g_gamma) if t is not None]
    return _run(op, tensors, initial_state, output_final_state, state_v_first, cu_seqlens)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                     output_final_state=False, state_v_first=False, cu_seqlens=None,
                     cu_seqlens_cpu=None, *, backend="auto", lowering="auto", **kwargs):
    """Simple GLA (per-head scalar gates). q, k: (B, T, H, K); v: (B, T, H, V); g: (B, T, H)
    log gates or g_gamma: (H,). Returns (o (B, T, H, V), final_state (N, H, K, V) or None)."""
    _check_kwargs("chunk_simple_gla()", kwargs)
    return _simple_gla("chunk_simple_gla()", q, k, v, g, g_gamma, scale, initial_state,
                       output_final_state, state_v_first, cu_seqlens, "forward", backend,
                       lowering)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, state_v_first=False,
                               cu_seqlens=None, *, backend="auto", lowering="auto", **kwargs):
    """As `chunk_simple_gla`; `reverse=True` runs the recurrence from t = T-1 down to 0."""
    _check_kwargs("fused_recurrent_simple_gla()", kwargs, allowed=())
    return _simple_gla("fused_recurrent_simple_gla()", q, k, v, g, g_gamma, scale,
                       initial_state, output_final_state, state_v_first, cu_seqlens,
                       "reverse" if reverse else "forward", backend, lowering)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, *, backend="auto",
              lowering="auto", **kwargs):
    """GLA (per-key gates). q, k, g: (B, T, H, K), g the log of the decay; v: (B, T, H, V).
    Returns (o (B, T, H, V), final_state (N, H, K, V) or None)."""
    _check_kwargs("chunk_gla()", kwargs)
    op = compiled(_gla_build, (("scale", _scale(k, scale)),), backend, lowering)
    return _run(op, [q, k, v, g], initial_state, output_final_state, state_v_first, cu_seqlens)
