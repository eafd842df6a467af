"""The float64 reference as a backend: always available, exact, slow; differentiable by torch."""
from __future__ import annotations

import torch

from .. import reference
from ..plan import Plan
from .base import register_backend


class ReferenceBackend:
    name = "reference"

    def is_available(self) -> bool:
        return True

    def supports(self, plan: Plan) -> str | None:
        return None

    def cache_tag(self) -> str:
        return "reference"

    def compile(self, plan: Plan, config=None):
        fn = reference.matrix if plan.lowering == "quadratic" else reference.scan
        out_dtype = getattr(torch, plan.dtype)

        def kernel(tensors, sizes, initial_state=None, cu_seqlens=None):
            out, final = fn(plan.program, tensors, sizes, initial_state, cu_seqlens,
                            plan.return_final_state)
            if final is not None:
                final = final.to(torch.float32 if plan.dtype != "float64" else torch.float64)
            return out.to(out_dtype), final

        return kernel


register_backend(ReferenceBackend())
