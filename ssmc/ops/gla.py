"""Gated linear attention: a per-key decay given as log-gates (FLA's `gk`)."""
from __future__ import annotations

from .. import api
from .. import dsl as S
from ._variants import call


def build(scale: float):
    @api.ssm
    def gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], g: S.In["b t h n"]):
        return S.recurrence(decay=S.exp(g), key=k, value=v, query=q * scale)
    return gla


def gla(q, k, v, g, scale=None, initial_state=None, return_final_state=False, cu_seqlens=None,
        backend="auto", lowering="auto"):
    """q, k, g: (b, t, h, n), g the log of the per-key decay; v: (b, t, h, p)."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return call(build, dict(scale=scale), (q, k, v, g), backend=backend, lowering=lowering,
                initial_state=initial_state, return_final_state=return_final_state,
                cu_seqlens=cu_seqlens)


#: the definition of `gla` for ssmc.compile, explain, tune and export. It uses q as given:
#: the function's default scale n ** -0.5 depends on a size, which a definition cannot; scale q
#: first, or take `build(scale)` for a fixed scale.
definition = gla.definition = build(scale=1)
