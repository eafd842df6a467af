"""The chunked backward's launch (kernels rendered by chunked_bwd.py): tile sizes, the forward
pass that saves the chunk states, and the backward pass over them, per direction."""
from __future__ import annotations

import math

import torch
import triton

from ....devices import DeviceLimits
from ....plan import Plan
from ...chain_rule import OrderBuffers
from ..streams import SideStreams
from ..common import (HEADER, chunk_layout, compute_dtype, direction_slices, dot_type, input_args,
                      next_pow2, num_sequences)
from .chunk_qk import head_free_operands
from .chunked import render_state_kernel
from .chunked_launch import state_pass, tiles as forward_tiles, walk_stages
from .chunked_bwd import (CHUNKS_PER_PROGRAM, chunk_variants, decay_mode, head_free,
                          per_key_decay, render_dqk_kernel, render_dstate_kernel,
                          render_dv_kernel, render_y_kernel, variant_suffix)
from . import chunked_segments as seg
from .chunked_bwd_keys import (render_keys_dv_kernel, render_keys_kernel,
                               render_keys_prep_kernel, render_keys_y_kernel)
from .chunked_segments import Segments
from .chunked_prefix import PrefixSums, render_prefix_kernel
from .chunked_keys import launch_scores, render_scores_kernel, whole_chunk_warps


def tiles(plan: Plan, sizes: dict, n_programs: int = 1, limits: DeviceLimits | None = None
          ) -> dict:
    """BT 64, the chunk (per-key decays walk it in row blocks of RB = 16, their diagonal blocks
    elementwise: BT^2 * BN work each); all of n; p in blocks of up to 64 (BP_walk for the two
    sequential walks, as the forward's state pass splits it: `n_programs` walks per block of
    channels); WARPS for the per-chunk kernels and WARPS_DV for the dv kernel, whose loop over
    n in blocks of BK keeps fewer tiles live."""
    tile = plan.tile_dict()
    per_key = per_key_decay(plan)
    BN = max(next_pow2(sizes["n"]), 16)
    walk = forward_tiles(plan, sizes, n_programs, limits)   # the recompute is its state pass
    # per-key decays (H100, GLA b=8 t=2048 h=16 n=p=128): their dq/dk walk took 4.6 ms in
    # n-blocks of 32 with 4 warps, 6.2 ms in blocks of 64 with 8 and 8.7 with 4; their state
    # passes split n as the forward's does (chunked_launch.tiles), each n-block's recurrence
    # being its own. Decays without n (H100, ssd h=80 n=128 p=64, b*t = 32k): the training
    # step took 9.52 / 10.86 / 9.30 ms with 4 warps in the per-chunk kernels against 10.28 /
    # 11.64 / 10.00 with 8 (b=8 t=4096 / b=2 t=16384 / b=16 t=2048), and 2.6 ms in the dv
    # kernel with 4 warps against 3.2 with 8
    BT = tile.get("BT_bwd", 64)
    return dict(BT=BT, RB=16, BN=BN, BN_state=walk["BN_state"],
                BP=tile.get("BP_bwd", max(min(next_pow2(sizes["p"]), 64), 16)),
                BP_walk=walk["BP_state"],
                WARPS=tile.get("WARPS_bwd", 4),
                WARPS_DV=tile.get("WARPS_DV_bwd", 4),
                BK=tile.get("BK_bwd", 32 if per_key else 64), SEG=tile.get("SEG_bwd"),
                # decays without n: the dq/dk kernel's n-block (each forms dy v^T again;
                # at 64, Triton 3.6 spills 168 bytes on sm_90a, at 32 none)
                BNQK=min(tile.get("BNQK_bwd", 64), BN),
                # the two sequential walks (states, dstates): the forward state pass's warps;
                # its stages, but 3 for per-key decays too (their walks were measured so)
                WALK=dict(num_warps=walk["warps_state"],
                          num_stages=walk_stages(plan, BT, walk["BN_state"], walk["BP_state"],
                                                 limits, 3)))


def state_dtype(plan: Plan) -> torch.dtype:
    """The stored chunk states and their gradients: the matmul operand type (every kernel
    rounds them to it before its products; bf16 halves their traffic and memory, the largest
    of the backward) except for per-key decays, whose decay gradient sums G * S per chunk."""
    if per_key_decay(plan):
        return compute_dtype(plan)
    return {"tl.bfloat16": torch.bfloat16, "tl.float16": torch.float16,
            "tl.float32": torch.float32, "tl.float64": torch.float64}[dot_type(plan)]


def computes_y(plan: Plan) -> bool:
    """Whether `backward_pass` can produce y (decays without n: the dv kernel has its parts)."""
    return not per_key_decay(plan)


def variant_launches(module, name: str, plan: Plan, n_chunks: int, heads: int = 1):
    """[(kernel, grid axis 0, its variant arguments)] of a per-chunk kernel's variants
    (`chunk_variants`): a program per chunk, CHUNKS_PER_PROGRAM for the counting one."""
    extra = dict(NCHUNKS=n_chunks, CPP=CHUNKS_PER_PROGRAM, HP2=next_pow2(heads))
    return [(getattr(module, name + variant_suffix(resets)),
             triton.cdiv(n_chunks, CHUNKS_PER_PROGRAM) if resets == "count" else n_chunks, extra)
            for resets in chunk_variants(plan)]


def kept_scores(plan: Plan, residual, n_chunks: int, H: int, CS: int):
    """The per-key chunk scores the forward kept ((directions, chunks, H, CS, CS) in the
    compute type: chunked_launch.launch's `keep`), or None where `residual` holds none of this
    plan's chunk size (a forward with other tiles: no two chunk sizes give the same bytes)."""
    if residual is None or not per_key_decay(plan):
        return None
    cdt = compute_dtype(plan)
    shape = (len(plan.program.recurrence.directions), max(n_chunks, 1), H, CS, CS)
    if residual.numel() != math.prod(shape) * cdt.itemsize:
        return None
    return residual.view(cdt).view(shape)


def forward_pass(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens, want_y,
                 residual=None):
    """States entering every chunk (`state_dtype`) and fp32 final states, per direction; y
    (summed over directions, before the epilogue) when `want_y`. `residual`: what the
    forward kept (`kept_scores`). The directions' walks run side by side (streams.py), each
    with its own buffers, joined before y, summed over them, and before returning. (Left
    running past the return, beside the reverse walks, they gained about 1% of a training
    step, and the tensors they use had to be kept alive by hand.)"""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = tensors[prog.inputs[0].name].device
    cdt = compute_dtype(plan)
    S = num_sequences(sizes, cu_seqlens)
    dirs = prog.recurrence.directions
    m = tiles(plan, sizes, S * H * len(dirs), seg.device_limits(device))
    n_chunks, chunk_off, chunk_seq = chunk_layout(sizes, cu_seqlens, m["BT"], device)
    dummy = torch.zeros(1, dtype=cdt, device=device)
    # every token lies in a chunk whose output pass writes it (cu_seqlens ends at T)
    y = torch.empty(B, T, H, P, dtype=cdt, device=device) if want_y else None
    cu = dummy if cu_seqlens is None else cu_seqlens
    off = dummy if chunk_off is None else chunk_off
    seqs = dummy if chunk_seq is None else chunk_seq
    npb = triton.cdiv(P, m["BP"])
    npb_walk = triton.cdiv(P, m["BP_walk"])
    walks = triton.cdiv(N, m["BN_state"]) * npb_walk   # the state pass's programs per (seq, head)
    GH = sizes.get("grid_h", 1)
    variants = chunk_variants(plan)
    kept = kept_scores(plan, residual, n_chunks, H, m["BT"])

    def buffers(i):
        """Direction i's buffers, made before the walks start: a tensor made on a side stream
        and read on another after it is freed could be handed out again too early."""
        return dict(
            # per-key decays: their running sums, read here and by every per-key backward kernel
            sums=PrefixSums(plan, per_key_decay(plan), n_chunks, H, m["BT"], m["RB"], N,
                            device, block_suffix=True),
            st=torch.empty(max(n_chunks, 1), H, N, P, dtype=state_dtype(plan), device=device),
            final=torch.empty(S, H, N, P, dtype=cdt, device=device),
            # which chunks hold a reset (decays without n): the per-chunk kernels' variants
            fl=(torch.empty(max(n_chunks, 1), H, dtype=torch.int8, device=device)
                if len(variants) > 1 else dummy),
            sg=_segments(plan, sizes, m, S, walks * len(dirs), n_chunks, cu_seqlens, device,
                         dummy),
            sc=(kept[i] if kept is not None else
                torch.empty(max(n_chunks, 1), H, m["BT"], m["BT"], dtype=cdt, device=device))
            if per_key_decay(plan) else None)

    def walk(i, direction, h0, w):
        """Direction i's running sums (per-key decays), state pass and scores, into `w`."""
        args = input_args(prog, tensors, i)   # per-order inputs: this order's slice
        order = dict(REVERSE=direction.reversed, COLUMN=direction.column)
        w["sums"].fill(module, args, n_chunks, H, (cu, off, seqs), (T, H // G, N, P, GH), N,
                       order, cu_seqlens is not None)
        pargs = (*args, *w["sums"].args)   # per-key decays: their running sums after the inputs
        h0 = None if h0 is None else h0.to(cdt).contiguous()
        st, final, fl, sg = w["st"], w["final"], w["fl"], w["sg"]
        # the forward's state pass (chunked.py), storing every chunk's state and flag
        state_pass(module, pargs, st, fl, h0, final, (cu, off), sg, (S, T, H, G, N, P, GH),
                   dict(BT=m["BT"], BN=m["BN_state"], BP=m["BP_walk"]), order,
                   cu_seqlens is not None, _walk_launch(m, device))
        _join(module, sg, st, final, S, H, npb, n_chunks, sizes, m, reverse=False)
        if per_key_decay(plan) and kept is None:   # the chunk's scores: y and dv read them
            launch_scores(module, pargs, w["sc"], n_chunks, H, (cu, off, seqs),
                          (T, H // G, N, P, GH), m["RB"], m["BT"], m["BN"], order,
                          cu_seqlens is not None, device.type == "cuda")
        w.update(args=args, pargs=pargs, order=order)
        return w

    walked = [buffers(i) for i in range(len(dirs))]
    side = SideStreams(device, len(dirs))
    for i, (direction, h0) in enumerate(zip(dirs, direction_slices(plan, initial_state))):
        with side.on(i):
            walk(i, direction, h0, walked[i])
    side.join()
    for i, w in enumerate(walked):   # y summed over the directions, in order
        if not (want_y and n_chunks > 0):
            break
        order = w["order"]
        if per_key_decay(plan):   # whole chunks: BT = CS
            module.ssmc_chunked_bwd_y[(n_chunks, H, npb)](
                *w["pargs"], y, w["st"], w["sc"], cu, off, seqs, B, T, H // G, N, P, GH,
                BT=m["BT"], CS=m["BT"], BN=m["BN"], BP=m["BP"], **order,
                IS_VARLEN=cu_seqlens is not None, ACCUM_IN=i > 0, **_key_warps(m, device))
        else:
            for kernel, grid0, extra in variant_launches(module, "ssmc_chunked_bwd_y", plan,
                                                         n_chunks):
                kernel[(grid0, H, npb)](
                    *w["args"], y, w["st"], w["fl"], cu, off, seqs, B, T, H // G, N, P, GH,
                    BT=m["BT"], BN=m["BN"], BP=m["BP"], **order,
                    IS_VARLEN=cu_seqlens is not None, ACCUM_IN=i > 0, **extra)
    layout = dict(n_chunks=n_chunks, chunk_off=chunk_off, chunk_seq=chunk_seq, m=m)
    return dict(states=[w["st"] for w in walked], finals=[w["final"] for w in walked],
                scores=[w["sc"] for w in walked if w["sc"] is not None],
                flags=[w["fl"] for w in walked], prefixes=[w["sums"] for w in walked],
                layout=layout), y


def _walk_launch(m: dict, device) -> dict:
    return m["WALK"] if device.type == "cuda" else {}


def _key_warps(m: dict, device) -> dict:
    """The per-key whole-chunk kernels' warps, as the forward's output pass has them."""
    if device.type != "cuda":
        return {}
    return dict(num_warps=whole_chunk_warps(m["BN"], m["BT"]))


def _segments(plan: Plan, sizes: dict, m: dict, S: int, blocks: int, n_chunks: int,
              cu_seqlens, device, dummy) -> Segments:
    """The segments of a sequential pass of the backward (chunked_segments.py)."""
    per_seq = triton.cdiv(sizes["t"], m["BT"])
    chunks = seg.segment_chunks(m["SEG"], per_seq,
                                S * sizes["h"] * blocks, cu_seqlens is not None,
                                seg.program_target(device))
    return Segments(chunks, S, per_seq, n_chunks, sizes, per_key_decay(plan), device, dummy)


def _join(module, sg: Segments, states, out, S, H, blocks, n_chunks, sizes, m, reverse):
    """After a segmented pass: the segments' entering states and the sequence's end (`out`:
    h_T, or dL/dS_0 for the reverse pass), then every chunk's state made whole."""
    if not sg.seg:
        return
    N, P = sizes["n"], sizes["p"]
    module.ssmc_chunked_bwd_join[(S, H, blocks)](
        sg.seg_state, sg.seg_prod, out, sg.n_seg, N, P, BN=m["BN"], BP=m["BP"], NPB=blocks,
        STORE_OUT=True, REVERSE=reverse)
    if n_chunks:
        module.ssmc_chunked_bwd_fixup[(n_chunks, H, blocks)](
            states, sg.seg_state, sg.chunk_prod, triton.cdiv(sizes["t"], m["BT"]), sg.n_seg,
            sg.seg, N, P, BN=m["BN"], BP=m["BP"], NPB=blocks, REVERSE=reverse)


def grouped_operands(plan: Plan, sizes: dict) -> frozenset:
    """The operands whose gradients `backward_pass` returns summed over each group's heads."""
    return frozenset() if per_key_decay(plan) else head_free_operands(plan, sizes)


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
    # the dq/dk kernel's walk over heads pipelines its loads: 2 stages (82 KB of shared memory,
    # sm_90 as compiled by Triton 3.6) keep two programs on an SM, as without; 3 (114 KB) one
    launch_dqk = dict(launch, num_stages=2) if device.type == "cuda" else {}
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
    per_order = OrderBuffers(len(prog.recurrence.directions), device)
    dirs = prog.recurrence.directions
    npb_walk = triton.cdiv(P, m["BP_walk"])
    walks = triton.cdiv(N, m["BN_state"]) * npb_walk

    def reverse_walk(i, direction, gT, dstates, dh0, sg):
        """Direction i's reverse walk: the gradient of every chunk's entering state."""
        order = dict(REVERSE=direction.reversed, COLUMN=direction.column)
        args = (*input_args(prog, tensors, i), *saved["prefixes"][i].args)
        gT = None if gT is None else gT.to(cdt).contiguous()
        module.ssmc_chunked_bwd_dstates[(S * sg.n_seg, H, walks)](
            *args, dy, dstates, dummy if gT is None else gT, dh0, *sg.buffers, cu, off, T,
            H // G, N, P, GH, sg.n_seg, sg.seg or 1, **order, HAS_GT=gT is not None,
            SEGMENTED=bool(sg.seg), NPB=npb_walk,
            **dict(consts, BN=m["BN_state"], BP=m["BP_walk"]), **_walk_launch(m, device))
        _join(module, sg, dstates, dh0, S, H, NPB, n_chunks, sizes, m, reverse=True)

    # the directions' reverse walks side by side (streams.py; buffers made before), then each
    # direction's per-chunk gradients in order (y, when wanted, sums over them)
    walked = [(torch.empty(max(n_chunks, 1), H, N, P, dtype=state_dtype(plan), device=device),
               torch.empty(S, H, N, P, dtype=cdt, device=device),
               _segments(plan, sizes, m, S, walks * len(dirs), n_chunks, cu_seqlens, device,
                         dummy))
              for _ in dirs]
    side = SideStreams(device, len(dirs))
    for i, (direction, gT) in enumerate(zip(dirs, direction_slices(plan, grad_final))):
        with side.on(i):
            reverse_walk(i, direction, gT, *walked[i])
    side.join()
    for i, direction in enumerate(dirs):
        args = (*input_args(prog, tensors, i), *saved["prefixes"][i].args)
        order = dict(REVERSE=direction.reversed, COLUMN=direction.column)
        dstates, dh0, _ = walked[i]
        chunk_args = (cu, off, seq_of_chunk, B, T, H // G, N, P, GH)
        if mode == "key":
            grads = _per_key_grads(module, plan, args, dy, saved, i, dstates, chunk_args,
                                   sizes, direction, consts, launch)
            results.append((grads, dh0))
            continue
        dv = torch.empty(B, T, H, P, dtype=state_dtype(plan), device=device)   # like dy
        dl = per_order("dl", i, (NPB, B, T, H), cdt) if mode == "row" else dummy
        bn = m["BNQK"]
        nnb = triton.cdiv(N, bn)
        heads_qk = head_block(plan, sizes, n_chunks * nnb)
        dq = per_order("dq", i, (B, T, H // heads_qk, N), cdt)
        dk = per_order("dk", i, (B, T, H // heads_qk, N), cdt)
        fl = saved["flags"][i]
        # each variant takes its chunks (chunk_variants): the counting dq/dk one adds to the
        # first's sums, so it runs after it
        for kernel, grid0, extra in (variant_launches(module, "ssmc_chunked_bwd_dqk", plan,
                                                      n_chunks, heads_qk)
                                     if n_chunks > 0 else ()):
            kernel[(grid0, H // heads_qk, nnb)](
                *args, dy, saved["states"][i], dstates, dq, dk, fl, *chunk_args,
                **order, H=H, HEADS=heads_qk, NPBK=NPB, NPB=1,
                **dict(consts, BN=bn), **launch_dqk, **extra)
        for kernel, grid0, extra in (variant_launches(module, "ssmc_chunked_bwd_dv", plan,
                                                      n_chunks) if n_chunks > 0 else ()):
            kernel[(grid0, H, NPB)](
                *args, dy, saved["states"][i], dstates, dv, dl, dummy if y is None else y, fl,
                *chunk_args, **order, WANT_Y=want_y, ACCUM_Y=i > 0,
                **dict(consts, BN=min(m["BK"], m["BN"])), **launch_dv, **extra)
        if n_chunks == 0 and want_y:
            y.zero_()
        if grouped_operands(plan, sizes) and H // heads_qk != G:   # blocks -> groups
            per_group = H // heads_qk // G    # spelt out: -1 is ambiguous for an empty batch
            dq = torch.sum(dq.view(B, T, G, per_group, N), 3,
                           out=per_order("dq_g", i, (B, T, G, N), cdt))
            dk = torch.sum(dk.view(B, T, G, per_group, N), 3,
                           out=per_order("dk_g", i, (B, T, G, N), cdt))
        grads = {"query": dq.unsqueeze(-1), "key": dk.unsqueeze(-1), "value": dv.unsqueeze(3)}
        if mode == "row":   # (NPB, b, t, h) partials -> (b, t, h, 1, 1)
            grads["log_decay"] = (dl[0] if NPB == 1 else dl.sum(0))[..., None, None]
        results.append((grads, dh0))
    return results, y


def _per_key_grads(module, plan, args, dy, saved, i, dstates, chunk_args, sizes, direction,
                   consts, launch):
    """Operand grads of one direction for per-key decays, the decay's complete
    (chunked_bwd_keys.py): the products over p once per chunk, then dq, dk and the decay
    gradient per n-block, and dv per p-block."""
    B, T, H, N, P = (sizes[a] for a in "bthnp")
    cdt = compute_dtype(plan)
    device = dy.device
    # every (b, t) row belongs to exactly one chunk: the kernel writes all of these
    dq, dk, dl = (torch.empty(B, T, H, N, dtype=cdt, device=device) for _ in range(3))
    dv = torch.empty(B, T, H, P, dtype=cdt, device=device)
    m = saved["layout"]["m"]
    n_chunks = saved["layout"]["n_chunks"]
    if n_chunks > 0:
        order = dict(REVERSE=direction.reversed, COLUMN=direction.column,
                     IS_VARLEN=consts["IS_VARLEN"], BT=m["RB"], CS=m["BT"])
        bk = min(m["BK"], m["BN"])
        nkb = triton.cdiv(N, bk)
        dA = torch.empty(n_chunks, H, m["BT"], m["BT"], dtype=cdt, device=device)
        gs = torch.empty(n_chunks, H, N, dtype=cdt, device=device)
        # its n-blocks each form dA again: 64 wide (H100: 0.64 ms with 4 warps, 0.99 with 8)
        bp = min(m["BN"], 64)
        prep = dict(num_warps=4) if device.type == "cuda" else {}
        module.ssmc_chunked_bwd_keys_prep[(n_chunks, H, triton.cdiv(N, bp))](
            *args, dy, saved["states"][i], dstates, saved["finals"][i], dA, gs, dq, dk,
            *chunk_args, BN=bp, BP=min(m["BP"], 32), NPB=1, **dict(order, BT=m["BT"]), **prep)
        module.ssmc_chunked_bwd_keys[(n_chunks, H, nkb)](
            *args, dA, gs, dq, dk, dl, *chunk_args, BN=bk, BP=m["BP"], NPB=1, **order,
            **launch)
        module.ssmc_chunked_bwd_keys_dv[(n_chunks, H, triton.cdiv(P, m["BP"]))](
            *args, dy, dstates, saved["scores"][i], dv, *chunk_args, BN=bk, BP=m["BP"],
            **dict(order, BT=m["BT"]), **_key_warps(m, device))
    return {"query": dq.unsqueeze(-1), "key": dk.unsqueeze(-1), "value": dv.unsqueeze(3),
            "log_decay": dl.unsqueeze(-1)}


def render(plan: Plan) -> str:
    """The backward's generated module: the state passes, y, and the per-chunk kernels."""
    if per_key_decay(plan):
        kernels = [render_scores_kernel(plan), render_prefix_kernel(plan),
                   render_keys_y_kernel(plan),
                   render_keys_prep_kernel(plan), render_keys_kernel(plan),
                   render_keys_dv_kernel(plan)]
    else:
        kernels = [kernel(plan, resets) for resets in chunk_variants(plan)
                   for kernel in (render_y_kernel, render_dv_kernel, render_dqk_kernel)]
    mode = decay_mode(plan)
    return HEADER + "\n".join([render_state_kernel(plan), render_dstate_kernel(plan),
                               seg.render_join("ssmc_chunked_bwd_join", mode),
                               seg.render_fixup("ssmc_chunked_bwd_fixup", mode)] + kernels)
