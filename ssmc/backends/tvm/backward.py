"""`kernel.backward` for the TVM backend (the contract is in ssmc/backends/base.py).

1. Epilogue (ssmc/backends/chain_rule.py, shared with Triton): dy = grad_out * dE/dy on the
   host. Where the epilogue's derivatives need y, the backward's first function recomputes it.
2. Recurrence: TIR functions compiled by TVM for the LLVM target, one backward for every
   forward lowering (scan, chunked, quadratic compute the same function, so they have the
   same gradient), chosen by the decay (`backward_kind`):
   - chunked (lowerings/chunked_bwd.py) where the decay is positive with an exact log and has
     no n or p axis (or there is none): the states entering every chunk of CHUNK steps, then
     the chunks in reverse giving d query, d key, d value and d log_decay (summed over the
     pairs of steps each decay sits between; handed to the chain rule as is, never divided by
     the decay);
   - scan (lowerings/scan_bwd.py) otherwise (decays that may be 0 or negative, per-key and
     per-element decays): the forward with a checkpoint every 16 steps, then the reverse
     adjoint pass recomputing each segment, giving d decay over the decay's own axes.
   Both sum over the directions and give dL/d initial_state; they are compiled and cached once
   per program, call features and specialisation. Where inputs have the order axis k
   (cross2d), they keep each direction's operand gradients apart instead (a leading axis D).
3. Chain rule (chain_rule.py): operand gradients -> input gradients; with the directions'
   operand gradients on a leading order axis where inputs have the order axis k (one chain
   rule over all orders, each order's terms reading its own slices).

At b=1 t=2048 h=8 n=p=64 (fp32, one thread) `kernel.backward` of ssd takes ~22 ms with the
chunked backward and ~110 ms with the scan's: the chunked products vectorise with the output
row in registers, where the scan's sums over p and n run one lane at a time
(benchmarks/RESULTS.md).

CUDA tensors: the TVM backend compiles forward kernels for CUDA, but its backward is CPU
(LLVM) code only; for CUDA tensors it runs on host copies and the gradients are copied back
(correct, not fast: on a GPU the Triton backend, first in the auto order, has device kernels).
"""
from __future__ import annotations

import dataclasses

import torch

from ...ir import Program, Y
from ...ir.orders import has_order_axis
from ...plan import Plan
from ..base import compute_dtype
from ..chain_rule import ChainRule, initial_state_grad
from .build import cached_function
from .lowerings import chunked_bwd, grid_args, scan_bwd

#: steps per chunk of the chunked backward: both passes at t=2048 h=8 n=p=64, one thread, took
#: 17.7 ms with 32, 18.4 with 64, ~19 with 16 and 21.6-24 with 24, 40, 48 (not multiples of
#: 16: partial vectors); shorter chunks do less intra-chunk work, longer ones less per chunk
CHUNK = 32

CPU = torch.device("cpu")


def backward_plan(plan: Plan, initial_state, cu_seqlens) -> Plan:
    """The plan the scan backward's functions are generated from (for every forward lowering
    whose decay `backward_kind` leaves to the scan); the call decides the initial state and
    packing."""
    return dataclasses.replace(plan, lowering="scan", has_initial_state=initial_state is not None,
                               return_final_state=False, varlen=cu_seqlens is not None,
                               chunk_size=64, tile=None)


def make_backward(kernel):
    """The `backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final)` of one
    TVMKernel."""
    plan: Plan = kernel.plan
    rule = ChainRule(plan.program)

    def backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final):
        device = grad_out.device
        if device.type != "cpu":
            def host(x):
                return None if x is None else x.detach().to(CPU)
            grads, g_h0 = _backward_cpu(kernel, rule, {k: host(v) for k, v in tensors.items()},
                                        sizes, host(initial_state), host(cu_seqlens),
                                        host(grad_out), host(grad_final))
            return ({k: None if v is None else v.to(device) for k, v in grads.items()},
                    None if g_h0 is None else g_h0.to(device))
        return _backward_cpu(kernel, rule, tensors, sizes, initial_state, cu_seqlens, grad_out,
                             grad_final)

    return backward


def _contig(x):
    return x if x is None or x.is_contiguous() else x.contiguous()


def backward_kind(plan: Plan) -> str:
    """"chunked" where lowerings/chunked_bwd.py applies (decays positive with an exact log and
    without n or p axes, or none), whatever the forward lowering (they compute the same
    function, and on the CPU the chunked backward is the faster one: its products vectorise,
    where the scan's sums over p and n run one lane at a time); "scan" otherwise."""
    return "chunked" if chunked_bwd.unsupported(plan) is None else "scan"


def _functions(kernel, memo, build) -> dict:
    """The compiled backward functions kept on the kernel under `memo`, built once (`build()`
    compiles or loads them through the on-disk cache)."""
    fns = kernel._bwd_functions.get(memo)
    if fns is None:
        with kernel._lock:
            fns = kernel._bwd_functions.get(memo)
            if fns is None:
                fns = kernel._bwd_functions[memo] = build()
    return fns


def _spec(kernel, bplan: Plan, tensors, sizes, initial_state, cu_seqlens):
    spec = kernel.spec_for(tensors, sizes, initial_state, cu_seqlens)
    return dataclasses.replace(spec, plan=bplan)


def scan_functions(kernel, tensors, sizes, initial_state, cu_seqlens, want_y: bool) -> dict:
    """{"ckpt": ..., "bwd": ...}: the scan backward's functions (LLVM) for this call's
    specialisation."""
    bplan = backward_plan(kernel.plan, initial_state, cu_seqlens)
    spec = _spec(kernel, bplan, tensors, sizes, initial_state, cu_seqlens)
    key = bplan.cache_key(kernel.backend_tag) + "_bwd"
    return _functions(kernel, ("scan", spec, want_y), lambda: {
        "ckpt": cached_function(key, spec.tag() + ("_ckpt_y" if want_y else "_ckpt"),
                                scan_bwd.render_ckpt(spec, want_y), "ssmc_scan_bwd_ckpt"),
        "bwd": cached_function(key, spec.tag() + "_bwd", scan_bwd.render_bwd(spec),
                               "ssmc_scan_bwd"),
    })


def chunked_functions(kernel, tensors, sizes, initial_state, cu_seqlens, want_y: bool) -> dict:
    """{"states": ..., "bwd": ...}: the chunked backward's functions (LLVM) for this call's
    specialisation."""
    bplan = dataclasses.replace(kernel.plan, lowering="chunked",
                                has_initial_state=initial_state is not None,
                                return_final_state=False, varlen=cu_seqlens is not None,
                                chunk_size=CHUNK, tile=None)
    spec = _spec(kernel, bplan, tensors, sizes, initial_state, cu_seqlens)
    key = bplan.cache_key(kernel.backend_tag) + "_bwd"
    return _functions(kernel, ("chunked", spec, want_y), lambda: {
        "states": cached_function(key, spec.tag() + ("_states_y" if want_y else "_states"),
                                  chunked_bwd.render_states(spec, want_y),
                                  "ssmc_chunked_bwd_states"),
        "bwd": cached_function(key, spec.tag() + "_bwd", chunked_bwd.render_bwd(spec),
                               "ssmc_chunked_bwd"),
    })


def _backward_cpu(kernel, rule: ChainRule, tensors, sizes, initial_state, cu_seqlens, grad_out,
                  grad_final):
    plan = kernel.plan
    tensors = {k: _contig(v) for k, v in tensors.items()}
    initial_state, cu_seqlens = _contig(initial_state), _contig(cu_seqlens)
    if backward_kind(plan) == "chunked":
        return _chunked_cpu(kernel, rule, tensors, sizes, initial_state, cu_seqlens, grad_out,
                            grad_final)
    return _scan_cpu(kernel, rule, tensors, sizes, initial_state, cu_seqlens, grad_out,
                     grad_final)


def _state_grads(D, S, H, N, P, cdt, initial_state, grad_final):
    """(gT, dh0): the final states' gradient as the backward functions take it (D, S, H, N,
    P), and the initial state's buffer, which already holds what an empty input gives."""
    gT = torch.zeros(D, S, H, N, P, dtype=cdt)
    if grad_final is not None:
        gT.copy_(grad_final if D > 1 else grad_final.unsqueeze(0))
    return gT, (gT.clone() if initial_state is not None else None)


def _input_args(prog, tensors, cu_seqlens) -> list:
    args = [tensors[i.name] for i in prog.inputs]
    return args if cu_seqlens is None else args + [cu_seqlens]


def _directions_state(initial_state, D: int) -> list:
    """The initial state as the functions take it, (D, S, H, N, P), or nothing."""
    if initial_state is None:
        return []
    return [initial_state if D > 1 else initial_state.unsqueeze(0)]


def _grad_lead(program: Program, D: int) -> tuple:
    """The operand gradients' leading axes: one entry per direction where inputs have the order
    axis k (the chain rule's order axis: each order's terms read its own slices), none where
    the directions are summed."""
    return (D,) if has_order_axis(program) else ()


def _chunked_cpu(kernel, rule: ChainRule, tensors, sizes, initial_state, cu_seqlens, grad_out,
                 grad_final):
    plan = kernel.plan
    prog = plan.program
    cdt = compute_dtype(plan)
    B, T, H, N, P = (int(sizes[a]) for a in "bthnp")
    D = len(prog.recurrence.directions)
    S = B if cu_seqlens is None else cu_seqlens.numel() - 1
    has_decay = prog.recurrence.decay is not None
    want_y = rule.needs_y
    # every row is written by the first direction, except rows outside cu_seqlens' range
    new = torch.empty if cu_seqlens is None else torch.zeros
    lead = _grad_lead(prog, D)
    y = torch.zeros(B, T, H, P, dtype=cdt) if want_y else None
    dq, dk = new(*lead, B, T, H, N, dtype=cdt), new(*lead, B, T, H, N, dtype=cdt)
    dv = new(*lead, B, T, H, P, dtype=cdt)
    dl = new(*lead, B, T, H, dtype=cdt) if has_decay else None
    gT, dh0 = _state_grads(D, S, H, N, P, cdt, initial_state, grad_final)

    if B * T > 0 and S > 0:
        fns = chunked_functions(kernel, tensors, sizes, initial_state, cu_seqlens, want_y)
        args = _input_args(prog, tensors, cu_seqlens)
        C = chunked_bwd.num_slots(B, T, S, cu_seqlens is not None, CHUNK)
        ws = torch.empty(D, C, H, P, N, dtype=cdt)
        fargs = args + _directions_state(initial_state, D)
        fargs.append(ws)
        if want_y:
            fargs.append(y)
        # dy first where it does not need y: the two calls then run back to back (TVM's
        # workers spin-wait after a call, slowing the torch ops that come next on 2 cores)
        early = not rule.dy_needs_y
        if early:
            env, g_out, dy = rule.epilogue(tensors, sizes, None, grad_out, cdt)
        fns["states"](*fargs, *grid_args(prog, sizes))
        if not early:
            env, g_out, dy = rule.epilogue(tensors, sizes, y, grad_out, cdt)
        elif want_y:
            env[Y.name] = y.unsqueeze(3)
        bargs = args + [dy, ws, gT, dq, dk, dv]
        if has_decay:
            bargs.append(dl)
        if dh0 is not None:
            bargs.append(dh0)
        fns["bwd"](*bargs, *grid_args(prog, sizes))
    else:
        env, g_out, dy = rule.epilogue(tensors, sizes, y, grad_out, cdt)
        for g in (dq, dk, dv, dl):
            if g is not None:
                g.zero_()

    op_grads = {"query": dq.unsqueeze(-1), "key": dk.unsqueeze(-1), "value": dv.unsqueeze(-2)}
    if has_decay:
        op_grads["log_decay"] = dl[..., None, None]
    result = rule.input_grads(env, g_out, op_grads, tensors, sizes)
    grad_h0 = None if dh0 is None else initial_state_grad(list(dh0), initial_state)
    return result, grad_h0


def _scan_cpu(kernel, rule: ChainRule, tensors, sizes, initial_state, cu_seqlens, grad_out,
              grad_final):
    plan = kernel.plan
    prog = plan.program
    cdt = compute_dtype(plan)
    B, T, H, N, P = (int(sizes[a]) for a in "bthnp")
    rec = prog.recurrence
    D = len(rec.directions)
    S = B if cu_seqlens is None else cu_seqlens.numel() - 1
    has_decay = rec.decay is not None
    dax = set(rec.decay.axes) if has_decay else set()
    Nd, Pd = (N if "n" in dax else 1), (P if "p" in dax else 1)

    want_y = rule.needs_y
    lead = _grad_lead(prog, D)
    y = torch.zeros(B, T, H, P, dtype=cdt) if want_y else None
    dq = torch.zeros(*lead, B, T, H, N, dtype=cdt)
    dk = torch.zeros(*lead, B, T, H, N, dtype=cdt)
    dv = torch.zeros(*lead, B, T, H, P, dtype=cdt)
    da = torch.zeros(*lead, B, T, H, Nd, Pd, dtype=cdt) if has_decay else None
    gT, dh0 = _state_grads(D, S, H, N, P, cdt, initial_state, grad_final)

    if B * T > 0 and S > 0:
        fns = scan_functions(kernel, tensors, sizes, initial_state, cu_seqlens, want_y)
        args = _input_args(prog, tensors, cu_seqlens)
        C = scan_bwd.num_checkpoints(B, T, S, cu_seqlens is not None)
        ck = torch.empty(D, C, H, N, P, dtype=cdt)
        fargs = args + _directions_state(initial_state, D)
        fargs.append(ck)
        if want_y:
            fargs.append(y)
        fns["ckpt"](*fargs, *grid_args(prog, sizes))
        env, g_out, dy = rule.epilogue(tensors, sizes, y, grad_out, cdt)
        bargs = args + [dy, ck, gT, dq, dk, dv]
        if has_decay:
            bargs.append(da)
        if dh0 is not None:
            bargs.append(dh0)
        fns["bwd"](*bargs, *grid_args(prog, sizes))
    else:
        env, g_out, dy = rule.epilogue(tensors, sizes, y, grad_out, cdt)

    op_grads = {"query": dq.unsqueeze(-1), "key": dk.unsqueeze(-1), "value": dv.unsqueeze(-2)}
    if has_decay:
        op_grads["decay"] = da
    result = rule.input_grads(env, g_out, op_grads, tensors, sizes)
    grad_h0 = None if dh0 is None else initial_state_grad(list(dh0), initial_state)
    return result, grad_h0
