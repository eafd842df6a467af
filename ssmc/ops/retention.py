"""RetNet's retention: a fixed per-head decay (time-invariant)."""
from __future__ import annotations

import math

import torch

from .. import api
from .. import dsl as S
from ..errors import ConfigError
from ._variants import call


def build(scale: float):
    @api.ssm
    def retention(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                  gamma: S.In["h"]):
        return S.recurrence(decay=gamma, key=k, value=v, query=q * scale)
    return retention


def default_gamma(h: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RetNet's schedule (Sun et al. 2023, torchscale): gamma_h = 1 - 2^(-5 - h), h = 0..H-1."""
    return 1.0 - torch.pow(2.0, -5.0 - torch.arange(h, dtype=dtype, device=device))


def retention(q, k, v, gamma=None, scale=None, initial_state=None, return_final_state=False,
              cu_seqlens=None, backend="auto", lowering="auto"):
    """q, k: (b, t, h, n); v: (b, t, h, p); gamma: (h,) decays in (0, 1) (RetNet's by default);
    scale defaults to n ** -0.5."""
    if gamma is None:
        # at least float32: in bf16/fp16, 1 - 2^-9 and closer decays round to exactly 1
        gamma = default_gamma(q.shape[2], q.device, torch.promote_types(q.dtype, torch.float32))
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not math.isfinite(scale):
        raise ConfigError(f"retention(): scale must be finite, got {scale}")
    return call(build, dict(scale=scale), (q, k, v, gamma), backend=backend, lowering=lowering,
                initial_state=initial_state, return_final_state=return_final_state,
                cu_seqlens=cu_seqlens)


#: the definition of `retention` for ssmc.compile, explain, tune and export. It uses q as given:
#: the function's default scale n ** -0.5 depends on a size, which a definition cannot; scale q
#: first, or take `build(scale)` for a fixed scale.
definition = retention.definition = build(scale=1)
