"""The float64 reference as a backend: always available, exact, slow; differentiable by torch."""
from __future__ import annotations

import torch

from .. import reference
from ..plan import Plan
from . import matrix_rows
from .base import compute_dtype, register_backend


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

        def backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final):
            """Autograd through the float64 reference (exact, slow: a Python loop over t)."""
            names = list(tensors)
            leaves = {n: tensors[n].detach().to(torch.float64).requires_grad_(True)
                      for n in names}
            h0 = None
            if initial_state is not None:
                h0 = initial_state.detach().to(torch.float64).requires_grad_(True)
            with torch.enable_grad():
                out, final = fn(plan.program, leaves, sizes, h0, cu_seqlens,
                                grad_final is not None)
                outputs, grads_in = [out], [grad_out.to(torch.float64)]
                if grad_final is not None:
                    outputs.append(final)
                    grads_in.append(grad_final.to(torch.float64))
                wrt = [leaves[n] for n in names] + ([h0] if h0 is not None else [])
                # an empty sequence's output is a fresh tensor, outside the graph
                pairs = [(o, g) for o, g in zip(outputs, grads_in) if o.requires_grad]
                grads = (torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                             allow_unused=True)
                         if pairs else [None] * len(wrt))
            result = {n: None if g is None else g.to(tensors[n].dtype)
                      for n, g in zip(names, grads)}
            grad_h0 = None
            if h0 is not None and grads[-1] is not None:
                grad_h0 = grads[-1].to(initial_state.dtype)
            return result, grad_h0

        kernel.backward = backward
        return kernel

    # the hidden attention matrix and the matrix-matching loss, in float64 (matrix_rows.py)

    def attention_matrix(self, plan: Plan, tensors, sizes, reduce: str = "none"):
        M = matrix_rows.matrix(plan.program, tensors, sizes, torch.float64, reduce)
        return M.to(compute_dtype(plan))

    def attention_matrix_backward(self, plan: Plan, tensors, sizes, grad, reduce: str = "none"):
        return matrix_rows.matrix_backward(plan.program, tensors, sizes, torch.float64, grad,
                                           reduce)

    def mixing_loss(self, plan: Plan, tensors, sizes, q, k, scale: float):
        loss = matrix_rows.mixing_loss(plan.program, tensors, sizes, q, k, scale, torch.float64)
        return loss.to(compute_dtype(plan))

    def mixing_loss_backward(self, plan: Plan, tensors, sizes, q, k, scale: float, grad):
        return matrix_rows.mixing_loss_backward(plan.program, tensors, sizes, q, k, scale,
                                                torch.float64, grad)


register_backend(ReferenceBackend())
