"""The chunked backward's launch (kernels rendered by chunked_bwd.py): tile sizes, the forward
pass that saves the chunk states, and the backward pass over them, per direction."""
from __future__ import annotations

import torch
import triton

from ....ir.orders import grid_step_positions
from ....plan import Plan
from ..common import (chunk_layout, compute_dtype, direction_slices, dot_type, input_args,
                      next_pow2, num_sequences)
from .chunked_bwd import decay_mode, head_free, per_key_decay


def tiles(plan: Plan, sizes: dict) -> dict:
    """BT 64 (16 for per-key decays, as the forward: their chunk-local work is elementwise,
    BT^2 * BN per chunk); all of n; p in blocks of up to 64; WARPS for the per-chunk kernels
    (a dozen (BT, BN|BP) tiles live at once) and WARPS_DV for the dv kernel, whose loop over
    n in blocks of BK keeps fewer (H100: 2.6 ms with 4 warps, 3.2 ms with 8 at b=8 t=4096
    h=80 n=128 p=64)."""
    tile = plan.tile_dict()
    return dict(BT=tile.get("BT_bwd", 16 if per_key_decay(plan) else 64),
                BN=max(next_pow2(sizes["n"]), 16),
                BP=tile.get("BP_bwd", max(min(next_pow2(sizes["p"]), 64), 16)),
                WARPS=tile.get("WARPS_bwd", 8), WARPS_DV=tile.get("WARPS_DV_bwd", 4),
                BK=tile.get("BK_bwd", 64))


def state_dtype(plan: Plan) -> torch.dtype:
    """The stored chunk states and their gradients: the matmul operand type (every kernel
    rounds them to it before its products; bf16 halves their traffic and memory, the largest
    of the backward) except for per-key decays, whose host-side decay gradient sums them."""
    if per_key_decay(plan):
        return compute_dtype(plan)
    return {"tl.bfloat16": torch.bfloat16, "tl.float16": torch.float16,
            "tl.float32": torch.float32, "tl.float64": torch.float64}[dot_type(plan)]


def computes_y(plan: Plan) -> bool:
    """Whether `backward_pass` can produce y (decays without n: the dv kernel has its parts)."""
    return not per_key_decay(plan)


def forward_pass(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens, want_y):
    """States entering every chunk (`state_dtype`) and fp32 final states, per direction; y
    (summed over directions, before the epilogue) when `want_y`."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = tensors[prog.inputs[0].name].device
    cdt = compute_dtype(plan)
    S = num_sequences(sizes, cu_seqlens)
    m = tiles(plan, sizes)
    n_chunks, chunk_off, chunk_seq = chunk_layout(sizes, cu_seqlens, m["BT"], device)
    dummy = torch.zeros(1, dtype=cdt, device=device)
    y = torch.zeros(B, T, H, P, dtype=cdt, device=device) if want_y else None
    cu = dummy if cu_seqlens is None else cu_seqlens
    off = dummy if chunk_off is None else chunk_off
    npb = triton.cdiv(P, m["BP"])
    GH = sizes.get("grid_h", 1)
    states, finals = [], []
    for i, (direction, h0) in enumerate(zip(prog.recurrence.directions,
                                            direction_slices(plan, initial_state))):
        args = input_args(prog, tensors, i)   # per-order inputs: this order's slice
        order = dict(REVERSE=direction.reversed, COLUMN=direction.column)
        h0 = None if h0 is None else h0.to(cdt).contiguous()
        st = torch.empty(max(n_chunks, 1), H, N, P, dtype=state_dtype(plan), device=device)
        final = torch.empty(S, H, N, P, dtype=cdt, device=device)
        module.ssmc_chunked_bwd_states[(S, H, npb)](
            *args, st, dummy if h0 is None else h0, final, cu, off, T, H // G, N, P, GH,
            BT=m["BT"], BN=m["BN"], BP=m["BP"], **order,
            IS_VARLEN=cu_seqlens is not None, HAS_H0=h0 is not None)
        if want_y and n_chunks > 0:
            module.ssmc_chunked_bwd_y[(n_chunks, H, npb)](
                *args, y, st, cu, off, dummy if chunk_seq is None else chunk_seq,
                B, T, H // G, N, P, GH, BT=m["BT"], BN=m["BN"], BP=m["BP"], **order,
                IS_VARLEN=cu_seqlens is not None, ACCUM_IN=i > 0)
        states.append(st)
        finals.append(final)
    layout = dict(n_chunks=n_chunks, chunk_off=chunk_off, chunk_seq=chunk_seq, m=m)
    return dict(states=states, finals=finals, layout=layout), y


def _chunk_bounds(sizes, cu_seqlens, BT: int, reverse: bool, layout, device):
    """For every (b, t): its chunk's index and the real-time range [lo, hi) of the steps u >= t
    of that chunk in the direction's own order. Shapes (b, t); chunks numbered as the kernels
    number them."""
    B, T = sizes["b"], sizes["t"]
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        start = torch.zeros(T, dtype=torch.int64, device=device)
        end = torch.full((T,), T, dtype=torch.int64, device=device)
        first_chunk = torch.zeros(T, dtype=torch.int64, device=device)
    else:
        bounds = cu_seqlens.to(device=device, dtype=torch.int64)
        seq = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=device),
                                      bounds[1:] - bounds[:-1], output_size=T)
        start, end = bounds[seq], bounds[seq + 1]
        first_chunk = layout["chunk_off"].to(torch.int64)[seq]
    i = end - 1 - t if reverse else t - start              # step within the sequence
    cl = i // BT
    chunk_len = torch.minimum((cl + 1) * BT, end - start)  # steps up to the chunk's end
    if reverse:
        lo, hi = end - chunk_len, t + 1
    else:
        lo, hi = t, start + chunk_len
    chunk = first_chunk + cl
    if cu_seqlens is None:
        chunk = chunk[None] + torch.arange(B, device=device)[:, None] * triton.cdiv(T, BT)
    return chunk, lo, hi


def _chunk_end_term(dstates, states, finals, layout, sizes, cu_seqlens):
    """sum_p G_c * S_c per chunk, (chunks, h, n): S_c is the next chunk's entering state, or
    the sequence's final state for its last chunk."""
    n_chunks = layout["n_chunks"]
    term = torch.zeros(n_chunks, *states.shape[1:3], dtype=states.dtype, device=states.device)
    if n_chunks > 1:
        term[:-1] = (dstates[:n_chunks - 1] * states[1:n_chunks]).sum(-1)
    if cu_seqlens is None:
        per_seq = triton.cdiv(sizes["t"], layout["m"]["BT"])
        last = torch.arange(1, sizes["b"] + 1, device=states.device) * per_seq - 1
        seqs = torch.arange(sizes["b"], device=states.device)
    else:
        off = layout["chunk_off"].to(torch.int64)
        nonempty = off[1:] > off[:-1]
        last, seqs = (off[1:] - 1)[nonempty], torch.nonzero(nonempty)[:, 0]
    if len(last):
        term[last] = (dstates[last] * finals[seqs]).sum(-1)
    return term


def _decay_grad(w, dstates, saved, i, sizes, cu_seqlens, direction):
    """Per-key decays: dL/dl (b, t, h, n) from w (b, t, h, n): chunk-local reverse sums
    (float64 differences of one running sum) plus each chunk's end term. A grid's column order
    (cross2d; never packed) sums its steps in its own order: w gathered by their positions, the
    result put back."""
    lay = saved["layout"]
    reverse, positions = direction.reversed, None
    w64 = w.double()
    if direction.column:
        positions = grid_step_positions(direction, sizes["grid_h"], sizes["grid_w"], w.device)
        w64, reverse = w64[:, positions], False
    chunk, lo, hi = _chunk_bounds(sizes, cu_seqlens, lay["m"]["BT"], reverse, lay, w.device)
    # cs[:, i] = sum of w[:, :i]; the running sum runs over the innermost axis (CUDA scans a
    # middle axis one thread per column, serially: 1.3 ms for (8, 4096, 80) on an H100)
    w64 = w64.movedim(1, -1).contiguous()
    cs = torch.cat([torch.zeros_like(w64[..., :1]), w64.cumsum(-1)], -1).movedim(-1, 1)
    local = (cs[:, hi] - cs[:, lo]).to(w.dtype)
    term = _chunk_end_term(dstates, saved["states"][i], saved["finals"][i], lay, sizes,
                           cu_seqlens)
    if cu_seqlens is not None:
        return local + term[chunk][None]
    dlog = local + term[chunk]                                         # (b, t, h, n)
    if positions is not None:    # step s of the order is time step positions[s]
        dlog = torch.empty_like(dlog).index_copy_(1, positions, dlog)
    return dlog


def grouped_operands(plan: Plan, sizes: dict) -> frozenset:
    """The operands whose gradients `backward_pass` returns summed over each group's heads."""
    if per_key_decay(plan) or not head_free(plan) or sizes["h"] == sizes["g"]:
        return frozenset()
    return frozenset({"query", "key"})


#: programs a head block should still leave (about 8 waves of one program per SM on an H100)
PROGRAMS = 1024


def head_block(plan: Plan, sizes: dict, programs_per_head: int) -> int:
    """Heads one program walks: the largest divisor of a group's heads that still leaves about
    PROGRAMS programs (a block re-uses query, key and q k^T, and sums dq and dk in registers),
    where query and key are the same for every head of a group; else one."""
    hpg = sizes["h"] // sizes["g"]
    if not head_free(plan):
        return 1
    for d in range(hpg, 0, -1):
        if hpg % d == 0 and programs_per_head * sizes["h"] // d >= PROGRAMS:
            return d
    return 1


def backward_pass(module, plan: Plan, tensors, sizes, saved, dy, grad_final, cu_seqlens,
                  want_y: bool = False):
    """(per direction: (operand grads as canonical (b, t, h, n, p) tensors, dL/dS_0); y
    (summed over directions) when `want_y` (only where `computes_y`), else None). query and
    key grads may come summed over the heads of each group: their h axis is then g long."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = dy.device
    cdt = compute_dtype(plan)
    S = num_sequences(sizes, cu_seqlens)
    lay = saved["layout"]
    m = lay["m"]
    n_chunks = lay["n_chunks"]
    NPB = triton.cdiv(P, m["BP"])
    dummy = torch.zeros(1, dtype=cdt, device=device)
    cu = dummy if cu_seqlens is None else cu_seqlens
    off = dummy if lay["chunk_off"] is None else lay["chunk_off"]
    seq_of_chunk = dummy if lay["chunk_seq"] is None else lay["chunk_seq"]
    mode = decay_mode(plan)   # none / row (decay without n) / key (per-key decay)
    consts = dict(BT=m["BT"], BN=m["BN"], BP=m["BP"], IS_VARLEN=cu_seqlens is not None)
    # a dozen (BT, BN|BP) tiles live at once: 8 warps keep them in registers on a GPU
    launch = dict(num_warps=m["WARPS"]) if device.type == "cuda" else {}
    launch_dv = dict(num_warps=m["WARPS_DV"]) if device.type == "cuda" else {}
    # y for the epilogue's derivatives, stored like the states (bf16 for bf16 plans). With one
    # direction it takes dy's place: every dv program reads its own dy tile before writing y
    # over it, and dy has no reader after (the dq/dk kernel runs first); at b=8 t=4096 that is
    # 335 MB less at the backward's peak.
    in_place = (want_y and len(prog.recurrence.directions) == 1 and mode != "key"
                and dy.dtype == state_dtype(plan) and dy.is_contiguous())
    y = dy if in_place else (torch.empty(B, T, H, P, dtype=state_dtype(plan), device=device)
                             if want_y else None)
    GH = sizes.get("grid_h", 1)
    results = []
    for i, (direction, gT) in enumerate(zip(prog.recurrence.directions,
                                            direction_slices(plan, grad_final))):
        args = input_args(prog, tensors, i)   # per-order inputs: this order's slice
        order = dict(REVERSE=direction.reversed, COLUMN=direction.column)
        gT = None if gT is None else gT.to(cdt).contiguous()
        dstates = torch.empty(max(n_chunks, 1), H, N, P, dtype=state_dtype(plan),
                              device=device)
        dh0 = torch.empty(S, H, N, P, dtype=cdt, device=device)
        module.ssmc_chunked_bwd_dstates[(S, H, NPB)](
            *args, dy, dstates, dummy if gT is None else gT, dh0, cu, off, T, H // G, N, P,
            GH, **order, HAS_GT=gT is not None, **consts)
        chunk_args = (cu, off, seq_of_chunk, B, T, H // G, N, P, GH)
        if mode == "key":
            grads = _per_key_grads(module, plan, args, dy, saved, i, dstates, chunk_args,
                                   sizes, cu_seqlens, direction, consts, launch)
            results.append((grads, dh0))
            continue
        dv = torch.empty(B, T, H, P, dtype=state_dtype(plan), device=device)   # like dy
        dl = torch.empty(NPB, B, T, H, dtype=cdt, device=device) if mode == "row" else dummy
        bn = min(m["BN"], 64)
        nnb = triton.cdiv(N, bn)
        heads_qk = head_block(plan, sizes, n_chunks * nnb)
        dq = torch.empty(B, T, H // heads_qk, N, dtype=cdt, device=device)
        dk = torch.empty(B, T, H // heads_qk, N, dtype=cdt, device=device)
        if n_chunks > 0:
            module.ssmc_chunked_bwd_dqk[(n_chunks, H // heads_qk, nnb)](
                *args, dy, saved["states"][i], dstates, dq, dk, *chunk_args,
                **order, H=H, HEADS=heads_qk, NPBK=NPB, NPB=1,
                **dict(consts, BN=bn), **launch)
            module.ssmc_chunked_bwd_dv[(n_chunks, H, NPB)](
                *args, dy, saved["states"][i], dstates, dv, dl, dummy if y is None else y,
                *chunk_args, **order, WANT_Y=want_y, ACCUM_Y=i > 0,
                **dict(consts, BN=min(m["BK"], m["BN"])), **launch_dv)
        elif want_y:
            y.zero_()
        if grouped_operands(plan, sizes) and H // heads_qk != G:   # blocks -> groups
            per_group = H // heads_qk // G    # spelt out: -1 is ambiguous for an empty batch
            dq = dq.view(B, T, G, per_group, N).sum(3)
            dk = dk.view(B, T, G, per_group, N).sum(3)
        grads = {"query": dq.unsqueeze(-1), "key": dk.unsqueeze(-1), "value": dv.unsqueeze(3)}
        if mode == "row":   # (NPB, b, t, h) partials -> (b, t, h, 1, 1)
            grads["log_decay"] = (dl[0] if NPB == 1 else dl.sum(0))[..., None, None]
        results.append((grads, dh0))
    return results, y


def _per_key_grads(module, plan, args, dy, saved, i, dstates, chunk_args, sizes, cu_seqlens,
                   direction, consts, launch):
    """Operand grads of one direction for per-key decays: per-head dq and dk, and w summed
    into the decay gradient on the host (`_decay_grad`)."""
    B, T, H, N, P = (sizes[a] for a in "bthnp")
    cdt = compute_dtype(plan)
    device = dy.device
    NPB = triton.cdiv(P, consts["BP"])
    # every (b, t) row belongs to exactly one chunk: the kernel writes all of these
    dq = torch.empty(NPB, B, T, H, N, dtype=cdt, device=device)
    dk = torch.empty(NPB, B, T, H, N, dtype=cdt, device=device)
    w = torch.empty(NPB, B, T, H, N, dtype=cdt, device=device)
    dv = torch.empty(B, T, H, P, dtype=cdt, device=device)
    n_chunks = saved["layout"]["n_chunks"]
    if n_chunks > 0:
        module.ssmc_chunked_bwd[(n_chunks, H, NPB)](
            *args, dy, saved["states"][i], dstates, dq, dk, dv, w, *chunk_args,
            REVERSE=direction.reversed, COLUMN=direction.column, **consts, **launch)
    # sums over p-blocks (none to do for one block: these are the largest tensors here)
    grads = {"query": (dq[0] if NPB == 1 else dq.sum(0)).unsqueeze(-1),
             "key": (dk[0] if NPB == 1 else dk.sum(0)).unsqueeze(-1),
             "value": dv.unsqueeze(3)}
    w = w[0] if NPB == 1 else w.sum(0)
    dlog = _decay_grad(w, dstates, saved, i, sizes, cu_seqlens, direction)
    grads["log_decay"] = dlog.unsqueeze(-1)
    return grads
