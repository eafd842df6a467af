"""Causal linear attention: no decay, the state accumulates."""
from __future__ import annotations

from .. import api
from .. import dsl as S
from ._variants import call


def build(scale: float):
    @api.ssm
    def linear_attention(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q * scale)
    return linear_attention


def linear_attention(q, k, v, scale=None, initial_state=None, return_final_state=False,
                     cu_seqlens=None, backend="auto", lowering="auto"):
    """q, k: (b, t, h, n); v: (b, t, h, p)."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return call(build, dict(scale=scale), (q, k, v), backend=backend, lowering=lowering,
                initial_state=initial_state, return_final_state=return_final_state,
                cu_seqlens=cu_seqlens)


#: the definition of `linear_attention` for ssmc.compile, explain, tune and export. It uses q
#: as given: the function's default scale n ** -0.5 depends on a size, which a definition
#: cannot; scale q first, or take `build(scale)` for a fixed scale.
definition = linear_attention.definition = build(scale=1)
