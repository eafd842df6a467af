"""`kernel.backward` for the Triton backend (the contract is in ssmc/backends/base.py).

Three steps, after the derive_backward pass (sympy.diff of the elementwise parts, on
`Program.backward`):

1. Epilogue: dy = grad_out * dE/dy. Where dE/dy or dE/d input depends on y, y (before the
   epilogue, summed over directions) is recomputed by the lowering's forward kernels first.
2. Recurrence: the lowering's backward kernels turn dy (and grad_final) into the gradients of
   the recurrence operands, per direction, and dL/d initial_state:
   scan -> lowerings/scan_bwd.py, launched by scan_bwd_launch.py (every decay kind: d decay
   from checkpointed states);
   chunked -> lowerings/chunked_bwd.py, launched by chunked_run.py (d log_decay by
   the q dq - k dk identity; y itself for decays without n, where dy does not need it);
   quadratic -> the chunked backward (the same mathematics).
3. Chain rule: d input = sum over operands of d operand * d operand/d input (+ grad_out *
   dE/d input), summed over the axes the input lacks and over the heads of a group for `g`
   inputs, and cast to the input's dtype. The terms on (b, t, h, p) rows (value and
   epilogue) run in one generated kernel (chain_rows.py); the rest as vectorised torch ops on
   canonical (b, t, h, n, p) broadcast tensors in the compute type. A cross2d program with
   per-order inputs (axis k) runs its row terms once per order (each order's d value and input
   slices, summed in the kernel) and the rest as torch ops, once, over a leading order axis.

Steps 1 and 3 are backend-neutral and live in ssmc/backends/chain_rule.py (shared with the TVM
backend); this module runs the Triton kernels of step 2 between them.

Everything is linear in t in memory; nothing loops over t in Python.
"""
from __future__ import annotations

import dataclasses

import torch

from ...ir import Program, Y
from ...plan import Plan
from ...ir.orders import has_order_axis
from ..chain_rule import ChainRule, initial_state_grad, stack_orders, sum_directions
from . import chain_rows
from .common import compute_dtype
from .lowerings import LOWERINGS, scan_bwd
from .lowerings import scan_bwd_launch as scan_run
from .lowerings import chunked_bwd_launch as chunked_run


#: the backward kernels per backward lowering (a lowering names its own in `backward`)
BACKWARD_RENDER = {"scan": scan_bwd.render, "chunked": chunked_run.render}


def backward_lowering(plan: Plan) -> str:
    """Which backward implements a plan: the one its lowering names (quadratic uses chunked's).
    A decay that may be zero or negative (not `decay_log_safe`) takes the scan's: its gradient
    is d decay from the states, where the chunked form gives d log|decay|, and turning that
    into d decay divides by the decay (0 at a reset)."""
    if not plan.program.decay_log_safe:
        return "scan"
    return LOWERINGS[plan.lowering].backward


def load_backward_module(backend, plan: Plan):
    """The generated backward kernels of `plan` (a plan of a backward lowering), cached on disk
    beside the forward's."""
    render = BACKWARD_RENDER[plan.lowering]
    return backend.load_generated(plan.cache_key(backend.cache_tag()) + "_bwd",
                                  lambda: render(plan))


def reads_kept(plan: Plan) -> bool:
    """Whether the backward of `plan` reads what its forward kept: per-key decays' chunk
    scores (the chunked backward forms them again otherwise: ~8% of a GLA training step)."""
    return backward_lowering(plan) == "chunked" and chunked_run.per_key_decay(plan)


def residual_of(kept: list, device) -> torch.Tensor:
    """What a forward kept (`launch(..., keep=kept)`), as the flat bytes the custom op carries
    (a view, no copy); empty if nothing."""
    if not kept:
        return torch.empty(0, dtype=torch.uint8, device=device)
    (scores,) = kept
    return scores.view(-1).view(torch.uint8)


def make_backward(backend, plan: Plan):
    """The `backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final)` of one
    compiled Triton kernel."""
    prog: Program = plan.program
    rule = ChainRule(prog)
    lowering = backward_lowering(plan)
    bplan = plan
    if lowering != plan.lowering:   # a forward lowering's tiles do not apply to another's
        bplan = dataclasses.replace(plan, lowering=lowering, tile=None)
    use_scan = bplan.lowering == "scan"
    state = {}

    def modules():
        if "bwd" not in state:
            state["bwd"] = load_backward_module(backend, bplan)
        return state["bwd"]

    def backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final,
                 residual=None):
        module = modules()
        cdt = compute_dtype(plan)
        want_y = rule.needs_y
        # y after the recurrence's backward (its kernels have y's parts at hand) where dy
        # does not need it
        late_y = (want_y and not use_scan and chunked_run.computes_y(bplan)
                  and not rule.dy_needs_y)
        if use_scan:
            saved, y = scan_run.forward_pass(module, bplan, tensors, sizes, initial_state,
                                             cu_seqlens, want_y)
        else:
            saved, y = chunked_run.forward_pass(module, bplan, tensors, sizes, initial_state,
                                                cu_seqlens, want_y and not late_y, residual)
        # dy stored like the chunk states: the chunked kernels round it to the matmul type
        dy_dtype = None if use_scan else chunked_run.state_dtype(bplan)
        dy = chain_rows.epilogue_dy(backend, plan, rule, tensors, sizes, y, grad_out, dy_dtype)
        env, g_out, dy_host = rule.epilogue(tensors, sizes, y, grad_out, cdt, dy is None)
        dy = dy_host if dy is None else dy
        if use_scan:
            per_dir = scan_run.backward_pass(module, bplan, tensors, sizes, saved, dy,
                                             grad_final, cu_seqlens)
        else:
            per_dir, y_late = chunked_run.backward_pass(module, bplan, tensors, sizes, saved,
                                                        dy, grad_final, cu_seqlens, late_y)
            if late_y:
                y = y_late
                env[Y.name] = y.unsqueeze(3)
        del saved, dy    # the chunk states are the largest buffers: gone before the chain rule
        grouped = (scan_run if use_scan else chunked_run).grouped_operands(bplan, sizes)
        grad_h0 = initial_state_grad([dh0 for _, dh0 in per_dir], initial_state)
        if has_order_axis(prog):
            # each order's operands read its own slices: the row terms per order (one launch
            # each, summed in the kernel), the rest one chain rule over a leading order axis;
            # d value is stacked only if a term outside the row terms reads it
            rows = chain_rows.row_parts_per_order(backend, plan, rule, tensors, sizes, y,
                                                  grad_out, per_dir)
            value_done = set(rule.exprs.operands.get("value", {})) <= set(rows)
            op_grads = stack_orders(per_dir, skip={"value"} if value_done else ())
        else:
            op_grads = sum_directions(per_dir)
            rows = chain_rows.row_parts(backend, plan, rule, tensors, sizes, y, grad_out,
                                        op_grads)
        del per_dir     # each order's own tensors (stacked above): gone before the chain rule
        # the per-key dq/dk kernel zeroes the log-decay gradient at reset steps itself
        zeroed = not use_scan and chunked_run.per_key_decay(bplan)
        result = rule.input_grads(env, g_out, op_grads, tensors, sizes, rows, grouped,
                                  resets_zeroed=zeroed)
        return result, grad_h0

    return backward
