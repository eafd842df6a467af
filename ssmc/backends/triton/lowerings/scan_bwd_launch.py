"""The scan backward's launch: the checkpointing forward and the backward pass (kernels
rendered by scan_bwd.py)."""
from __future__ import annotations

import torch
import triton

from ....plan import Plan
from ..common import chunk_layout, compute_dtype, input_args, num_sequences
from .chunk_qk import head_free_operands as grouped_operands   # the backward's, as chunked's
from .decay_terms import (buffers as term_buffers, canonical as term_canonical, decay_terms,
                          summed_partials)
from .scan import STEPS
from .scan_launch import (MAX_BT, ONE_WARP_VALUES, block_tile, order_bits, order_launches,
                          scan_blocks, scan_warps)


#: values of a one-warp backward block (BT x n x BP): VMamba's measured best, 8 x 16 x 8
ONE_WARP_BLOCK = 1024


def backward_blocks(N: int, P: int) -> tuple[int, int, int, int]:
    """(BN, BP, BT, num_warps) of the backward pass; BT is also the forward's checkpoint
    interval. Its own blocks: the forward's tile is tuned for the forward. A state tile of one
    warp's ONE_WARP_VALUES (n from 5 to 16) runs in one warp on blocks of ONE_WARP_BLOCK
    values: measured on an H100 (VMamba's selective scan, b=32, d=192, bf16, n=16, four
    orders), the training step 31.3 -> 24.7 ms at 56x56 and 9.0 -> 7.1 ms at 28x28 with a
    16 x 8 x 8 block in one warp against 16 x 8 x 16 in four (16 x 8 x 16 in one warp: 74 ms,
    it spills; 8 x 4: 39 ms). The checkpoints double: (orders, t / 8, h, n, p) fp32. Mamba-1's
    16 x 1 state takes 16 steps a block (MAX_BT)."""
    BN, BP, BT = block_tile(N, P)
    if 8 <= BN <= 16 and BN * BP <= ONE_WARP_VALUES:
        return BN, BP, max(min(MAX_BT, ONE_WARP_BLOCK // (BN * BP)), 2), 1
    return BN, BP, BT, 4


def forward_pass(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens, want_y):
    """Checkpoints of every order, (orders, blocks, h, n, p), and y summed over the orders
    (fp32) when `want_y`."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = tensors[prog.inputs[0].name].device
    cdt = compute_dtype(plan)
    S = num_sequences(sizes, cu_seqlens)
    nd = len(prog.recurrence.directions)
    # checkpoints every CK steps (the backward's blocks); in between, the forward's own form
    # (a step at a time for large state tiles: `scan.scan_blocks`)
    CK = backward_blocks(N, P)[2]
    BN, BP, BT = scan_blocks(N, P)
    BT = min(BT, CK)    # a checkpoint ends a block: CK a multiple of BT (both powers of 2)
    NPB = triton.cdiv(P, BP)
    n_ck, ck_off, _ = chunk_layout(sizes, cu_seqlens, CK, device)
    NCK = max(n_ck, 1)
    y = torch.zeros(B, T, H, P, dtype=cdt, device=device) if want_y else None
    dummy = torch.zeros(1, dtype=cdt, device=device)
    ckpt = torch.empty(nd, NCK, H, N, P, dtype=cdt, device=device)
    h0_all = None if initial_state is None else initial_state.to(cdt).contiguous()
    rev, col = order_bits(plan)
    args = input_args(prog, tensors, None)
    for first, count in order_launches(plan, want_y):
        h0 = h0_all
        if h0 is not None and count < nd:
            h0 = h0[first]
        # a step at a time, each block of STEPS loaded a block ahead: the checkpointing
        # forward 38% faster than the loop on an H100 (VMamba's cross2d, n=16)
        kernel = (module.ssmc_scan_ckpt_fwd_steps if BT == 1 and CK % STEPS == 0
                  else module.ssmc_scan_ckpt_fwd)
        kernel[(S, H, NPB * count)](
            *args, dummy if y is None else y, ckpt[first:], dummy if h0 is None else h0,
            dummy if cu_seqlens is None else cu_seqlens, dummy if ck_off is None else ck_off,
            T, H // G, N, P, sizes.get("grid_h", 1), NCK, NPB, first, rev, col,
            BN=BN, BP=BP, BT=BT, CK=CK, HAS_H0=h0 is not None, IS_VARLEN=cu_seqlens is not None,
            EVEN_P=P % BP == 0,
            ACCUM_IN=first > 0, WRITE_Y=want_y, ATOMIC=want_y and count > 1,
            **({"num_warps": scan_warps(BN, BP, BT)} if device.type == "cuda" else {}))
    return dict(ckpt=ckpt, ck_off=ck_off, NCK=NCK), y


def backward_pass(module, plan: Plan, tensors, sizes, saved, dy, grad_final, cu_seqlens):
    """Operand gradients per direction as canonical (b, t, h, n, p) tensors, and dL/dS_0.

    Returns a list (one per direction) of (grads: {operand: tensor}, dh0 (S, H, N, P))."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = dy.device
    cdt = compute_dtype(plan)
    S = num_sequences(sizes, cu_seqlens)
    nd = len(prog.recurrence.directions)
    BN, BP, BT, warps = backward_blocks(N, P)
    NPB = triton.cdiv(P, BP)
    dummy = torch.zeros(1, dtype=cdt, device=device)
    terms = decay_terms(prog)
    # every entry is written (each order and p-block walks every row of every sequence, and
    # cu_seqlens ends at t): no zero fill (at VMamba's 56x56, b=32, n=16, 1.5 GB of them)
    dq = torch.empty(nd, NPB, B, T, H, N, dtype=cdt, device=device)
    dk = torch.empty(nd, NPB, B, T, H, N, dtype=cdt, device=device)
    dv = torch.empty(nd, B, T, H, P, dtype=cdt, device=device)
    bufs = term_buffers(terms, nd, NPB, sizes, S, cdt, device)
    dh0 = torch.empty(nd, S, H, N, P, dtype=cdt, device=device)
    gT = None if grad_final is None else grad_final.to(cdt).contiguous()
    rev, col = order_bits(plan)
    module.ssmc_scan_bwd[(S, H, NPB * nd)](
        *input_args(prog, tensors, None), dy, saved["ckpt"], dummy if gT is None else gT, dh0,
        dq, dk, dv, *bufs.values(),
        dummy if cu_seqlens is None else cu_seqlens,
        dummy if saved["ck_off"] is None else saved["ck_off"],
        B, T, H // G, N, P, sizes.get("grid_h", 1), saved["NCK"], NPB, 0, rev, col,
        BN=BN, BP=BP, BT=BT, CK=BT, HAS_GT=gT is not None, IS_VARLEN=cu_seqlens is not None,
        EVEN_P=P % BP == 0,
        **({"num_warps": warps} if device.type == "cuda" else {}))
    # one sum per operand for every order (VMamba's 56x56 n=16 step had 8 and their stacking
    # copies), over a group's heads too where query and key are a group's (VMamba's B and C,
    # Mamba-1's): at 56x56 n=16, b=32, d query's partials are 616 MB, and a sum over the
    # p-blocks alone another 154 MB to write and read again
    groups = G if grouped_operands(plan, sizes) else None
    dq, dk = summed_partials(dq, groups), summed_partials(dk, groups)
    done = {term.name: term_canonical(term, bufs[term.name], cu_seqlens is not None)
            for term in terms}
    results = []
    for i in range(nd):
        grads = {"query": dq[i].unsqueeze(-1), "key": dk[i].unsqueeze(-1),
                 "value": dv[i].unsqueeze(3)}
        for term in terms:    # the decay's terms, done: ("decay", input) -> canonical tensor
            grads[("decay", term.name)] = done[term.name][i]
        results.append((grads, dh0[i] if nd > 1 else dh0[0]))
    return results
