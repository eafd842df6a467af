"""The chunked lowering's launch: tile sizes, the chunk layout of packed sequences, the two
passes per direction (kernels rendered by chunked.py), and the lowering's registration."""
from __future__ import annotations

import torch
import triton

from ....devices import DeviceLimits
from ....errors import ConfigError
from ....plan import Plan
from ....tiles import OPERAND_BYTES
from ..common import Outputs, chunk_layout, input_args, interpreting, next_pow2
from ..tiles import ChunkedTile, chunked_space, walk_stage_bytes
from .chunked import RESET_ROWS_PER_PROGRAM, per_key_decay, render, reset_specialised, supports
from .chunk_qk import launch_qk, reads_qk
from .chunked_keys import launch_scores, whole_chunk_warps
from . import chunked_segments as seg
from .chunked_prefix import PrefixSums
from .chunked_segments import Segments
from .chunked_pairs import order_groups, second_order_args
from ..streams import SideStreams
from .registry import TritonLowering, register_lowering

#: shared memory a walk takes besides its pipelined operand tiles (sm_90, Triton 3.6: 8 bytes)
WALK_SMEM_EXTRA = 1024


def tiles(plan: Plan, sizes: dict, n_programs: int, limits: DeviceLimits | None = None) -> dict:
    """CS, the state-pass chunk, and BT, the output pass's row block (CS a multiple of BT;
    per-key decays use BT = 16 in 64-step chunks). The state pass may split n and p into
    blocks (its recurrence is independent per element: `BN_state`, `BP_state`; p more finely
    where its `n_programs` walks would leave too few programs for the GPU of `limits`); the
    output pass takes all of n (the query-key contraction) and a p-block."""
    tile = plan.tile_dict()
    target = None if limits is None else seg.target_for(limits.sm_count)
    N, P = sizes["n"], sizes["p"]
    BN = max(next_pow2(N), 16)
    per_key = per_key_decay(plan)
    if per_key:   # the scores pass's row blocks: their diagonal blocks in log2(BT) levels
        BT = tile.get("BT", 16)
        CS = tile.get("CS", max(64, BT))
    else:
        BT = tile.get("BT", 64)
        CS = tile.get("CS", BT)
    # measured on H100 (benchmarks/RESULTS.md): splitting the state pass over n to add
    # programs lost more to re-reading the value than it gained in parallelism (scalar
    # decays); per-key decays at n = p = 128 (GLA, b=8 t=2048 h=16) took 0.62 ms in n-blocks
    # of 64 against 1.12 ms whole, and their output pass 0.40 ms with p-blocks of 128 against
    # 0.69 ms with 64 (it forms exp(L) q once per block)
    BN_state = tile.get("BN_state", min(BN, 64) if per_key else BN)
    BP_state = tile.get("BP_state", seg.state_block(
        P, n_programs * triton.cdiv(N, BN_state), target))
    BP_out = tile.get("BP_out", max(min(next_pow2(P), 128 if per_key else
                                        64 if BN <= 128 else 32), 16))
    return dict(BT=BT, CS=CS, BN=BN, BN_state=BN_state, BP_state=BP_state, BP_out=BP_out,
                SEG_state=tile.get("SEG_state"),
                warps_state=tile.get("warps_state", 4),
                warps_out=tile.get("warps_out", whole_chunk_warps(BN, CS) if per_key else 4),
                # a pair of orders' output pass (chunked_pairs.py) holds more registers than
                # either order's alone (ptxas, Triton 3.6, sm_90a, Mamba-2-style cross2d n=64
                # p=64, 4 warps: 186 against 140 with q k^T read, 3 blocks an SM -> 2); capped
                # at 168 it keeps 3 with no spills. At n=128 one order's already takes 183
                # (2 blocks) and a cap spills: none
                regs_pair=tile.get("regs_pair", 168 if BN <= 64 and not per_key else None),
                # H100, ssd b=8 t=4096 / b=16 t=2048: 3 stages 1.74 / 1.66 ms, 2 stages 1.80 /
                # 1.74 (per-key decays: measured only with 2)
                stages_state=walk_stages(plan, CS, BN_state, BP_state, limits,
                                         2 if per_key else 3),
                stages_out=tile.get("stages_out", 2))


def walk_stages(plan: Plan, chunk: int, BN: int, BP: int, limits: DeviceLimits | None,
                default: int) -> int:
    """Pipeline stages of a sequential walk over `chunk`-step chunks (the state pass, the
    backward's recompute and reverse pass), each `walk_stage_bytes` of shared memory.
    `stages_state` if the plan pins it, else `default` or as many as fit
    the device; a walk that does not fit with the stages it must use is a ConfigError here,
    not Triton's out-of-resources error at launch."""
    pinned = plan.tile_dict().get("stages_state")
    if limits is None:
        return pinned or default
    per_stage = walk_stage_bytes(chunk, BN, BP, OPERAND_BYTES.get(plan.dtype, 4))
    fitting = (limits.smem_per_block - WALK_SMEM_EXTRA) // per_stage
    stages = pinned or min(default, max(fitting, 1))
    if stages > fitting:
        raise ConfigError(
            f"{plan.describe()}: a sequential walk over {chunk}-step chunks (n-block {BN}, "
            f"p-block {BP}) in {stages} pipeline stage(s) needs ~{stages * per_stage // 1024} "
            f"KiB of shared memory; {limits.name} has {limits.smem_per_block // 1024} KiB per "
            f"block. Use a smaller chunk (CS / BT_bwd) or p-block, or fewer stages_state")
    return stages


def orders_side_by_side(plan: Plan) -> int:
    """How many orders' passes before the output passes run side by side (streams.py), their
    walks filling the GPU together: every order, but per-key decays' one at a time (their
    running sums are one buffer, refilled order by order)."""
    return 1 if per_key_decay(plan) else len(plan.program.recurrence.directions)


def launch(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens, output=True,
           keep=None):
    """(out, final state); without `output`, the state pass alone (out an empty stand-in).
    `keep`, a list: per-key decays append their chunks' scores, (directions, chunks, H, CS,
    CS), which the backward reads instead of forming them again (`kept_scores`)."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    o = Outputs(plan, tensors, sizes, initial_state, cu_seqlens, output=output)
    if o.empty:
        return o.result()
    device, S, dirs, cdt = o.device, o.S, o.dirs, o.cdt
    out, final, yacc, h0s = o.out, o.final, o.yacc, o.h0s
    per_key = per_key_decay(plan)
    side_by_side = orders_side_by_side(plan)
    m = tiles(plan, sizes, S * H * side_by_side, seg.device_limits(device))
    n_chunks, chunk_off, chunk_seq = chunk_layout(sizes, cu_seqlens, m["CS"], device)
    state_dtype = cdt if interpreting() else {"bfloat16": torch.bfloat16,
                                              "float16": torch.float16}.get(plan.dtype, cdt)
    # per-key decays: each chunk's decayed scores (chunked_keys.py); query and key shared by
    # a group's heads: each chunk's q k^T per group (chunk_qk.py)
    qk_read = reads_qk(plan, sizes)
    # only the output pass reads them: none for the state pass alone
    kept = None
    if keep is not None and output and per_key:   # each direction's, for the backward
        # the scores kernel writes every entry (zeros where no score is); with no chunk it
        # runs no program, and an op's output must not depend on what memory held
        kept = (torch.empty if n_chunks > 0 else torch.zeros)(
            len(dirs), max(n_chunks, 1), H, m["CS"], m["CS"], dtype=cdt, device=device)
        keep.append(kept)
    out_bt = m["CS"] if per_key else m["BT"]   # per-key: the output pass takes whole chunks
    groups = order_groups(dirs, T, out_bt, output and cu_seqlens is None and not per_key)

    on_gpu = device.type == "cuda"
    launch_state = dict(num_warps=m["warps_state"], num_stages=m["stages_state"]) if on_gpu else {}
    launch_out = dict(num_warps=m["warps_out"], num_stages=m["stages_out"]) if on_gpu else {}
    cu = out if cu_seqlens is None else cu_seqlens
    off = out if chunk_off is None else chunk_off
    seqs = out if chunk_seq is None else chunk_seq
    GH = sizes.get("grid_h", 1)   # a grid's height (cross2d): its column orders' layout
    npb_state = triton.cdiv(P, m["BP_state"])
    blocks = triton.cdiv(N, m["BN_state"]) * npb_state
    per_seq = triton.cdiv(T, m["CS"])
    sums = PrefixSums(plan, per_key, n_chunks, H, m["CS"], m["BT"], N,
                      device)

    def order_buffers():
        """What one order's passes write and its output pass reads (one set per order where
        the orders run side by side)."""
        return dict(
            states=torch.empty(max(n_chunks, 1), H, N, P, dtype=state_dtype, device=device),
            # 1 where a chunk holds a reset (`reset_specialised`): written by the state pass
            resets=torch.empty(max(n_chunks, 1), H, dtype=torch.int8, device=device),
            scores=(torch.empty(max(n_chunks, 1), H if per_key else G, m["CS"], m["CS"],
                                dtype=cdt, device=device)
                    if output and (per_key or qk_read) and kept is None else out),
            sg=Segments(seg.segment_chunks(m["SEG_state"], per_seq,
                                           S * H * blocks * side_by_side,
                                           cu_seqlens is not None, seg.program_target(device)),
                        S, per_seq, n_chunks, sizes, per_key, device, out))

    slots = [order_buffers() for _ in range(max(side_by_side, *map(len, groups)))]
    sg = slots[0]["sg"]
    rows = (cu, off, seqs)
    npb = triton.cdiv(P, m["BP_out"])
    n_rows = n_chunks * (m["CS"] // out_bt)

    def passes(i, buf):
        return _order_passes(module, plan, tensors, sizes, m, i, dirs[i], buf, h0s[i],
                             None if final is None else final[i], sums, kept, rows,
                             cu_seqlens is not None, n_chunks, output, qk_read, launch_state,
                             launch_out, S)

    ready = {}
    if side_by_side > 1:   # every order's passes first, each on its own stream
        streams = SideStreams(device, side_by_side)
        for i in range(len(dirs)):
            with streams.on(i):
                ready[i] = passes(i, slots[i])
        streams.join()
    for gi, group in enumerate(groups):   # order by order where not side by side
        done = [ready[i] if ready else passes(i, slots[k]) for k, i in enumerate(group)]
        if n_chunks == 0 or not output:
            continue
        (args, buffers, order), *second = done
        kernel_args = (*args, out, *out.stride(), yacc, *buffers[:3], *rows, *buffers[3:],
                       T, H // G, N, P, GH, sg.n_seg, sg.seg or 1)
        # a pair's second order (chunked_pairs.py): its inputs, buffers and flags as `_b`
        pair = second_order_args(plan, *second[0]) if second else {}
        out_meta = dict(BT=out_bt, CS=m["CS"], BN=m["BN"], BP=m["BP_out"], NPB=npb, **order,
                        IS_VARLEN=cu_seqlens is not None, ACCUM_IN=gi > 0,
                        WRITE_OUT=gi == len(groups) - 1, SEGMENTED=bool(sg.seg),
                        QK_READ=qk_read, **pair, **launch_out)
        kind = "_pair" if pair else ""
        cap = (dict(maxnreg=m["regs_pair"])
               if pair and on_gpu and m["regs_pair"] and m["warps_out"] == 4 else {})
        getattr(module, f"ssmc_chunked_out{kind}_fwd")[(n_rows, H, npb)](*kernel_args,
                                                                          **out_meta, **cap)
        if reset_specialised(plan):
            rows_per = RESET_ROWS_PER_PROGRAM
            getattr(module, f"ssmc_chunked_out{kind}_resets_fwd")[
                (triton.cdiv(n_rows, rows_per), H, npb)](*kernel_args, **out_meta,
                                                         NROWS=n_rows, ROWS=rows_per)
    return o.result()


def _order_passes(module, plan: Plan, tensors, sizes, m, i, direction, buf, h0, final,
                  sums, kept, rows, packed, n_chunks, output, qk_read, launch_state, launch_out,
                  S):
    """Order `i`'s passes before its output pass: its running sums (per-key decays), the
    state pass (and the segments' join), and the scores or q k^T its output pass reads, into
    `buf`. Returns (its input arguments, the buffers its output pass reads in parameter
    order: states, resets, scores, segment states, chunk products; its order flags)."""
    prog = plan.program
    T, H, G, N, P = (sizes[a] for a in "thgnp")
    GH = sizes.get("grid_h", 1)
    sg = buf["sg"]
    # per-order inputs: this order's slice; per-key decays: their running sums after them
    args = input_args(prog, tensors, i)
    h0 = None if h0 is None else h0.contiguous()
    order = dict(REVERSE=direction.reversed, COLUMN=direction.column)
    sums.fill(module, args, n_chunks, H, rows, (T, H // G, N, P, GH), N, order, packed)
    args = (*args, *sums.args)
    dummy = buf["states"]
    npb_state = triton.cdiv(P, m["BP_state"])
    blocks = triton.cdiv(N, m["BN_state"]) * npb_state
    state_pass(module, args, buf["states"], buf["resets"], h0, final, rows[:2], sg,
               (S, T, H, G, N, P, GH), dict(BT=m["CS"], BN=m["BN_state"], BP=m["BP_state"]),
               order, packed, launch_state)
    if sg.seg:
        module.ssmc_chunked_segments[(S, H, blocks)](
            sg.seg_state, sg.seg_prod, dummy if final is None else final, sg.n_seg, N, P,
            BN=m["BN_state"], BP=m["BP_state"], NPB=npb_state,
            STORE_OUT=final is not None, REVERSE=False)
    scores = buf["scores"]
    if n_chunks > 0 and output:
        if per_key_decay(plan):   # the chunk's scores once, then the output pass takes chunks
            if kept is not None:
                scores = kept[i]
            launch_scores(module, args, scores, n_chunks, H, rows, (T, H // G, N, P, GH),
                          m["BT"], m["CS"], m["BN"], order, packed, dummy.device.type == "cuda")
        elif qk_read:
            launch_qk(module, args, scores, n_chunks, G, rows, sizes, m["CS"], order, packed,
                      launch_out)
    return args, (buf["states"], buf["resets"], scores, sg.seg_state, sg.chunk_prod), order


def state_pass(module, args, states, flags, h0, final, rows, sg: Segments, dims, tile: dict,
               order: dict, packed: bool, launch: dict) -> None:
    """The state pass (`ssmc_chunked_state_fwd`): every chunk's entering state into `states`
    and its reset flag into `flags`, from `h0` (or none), the end state into `final` where
    given; one program per (sequence or segment, head, n and p block). `rows`: the packed
    sequences' offsets and the chunks' (stand-ins where not packed); `dims`: (S, T, H, G, N,
    P, grid height); `tile`: BT (the chunk), BN, BP."""
    S, T, H, G, N, P, GH = dims
    npb = triton.cdiv(P, tile["BP"])
    dummy = states
    module.ssmc_chunked_state_fwd[(S * sg.n_seg, H, triton.cdiv(N, tile["BN"]) * npb)](
        *args, states, flags, dummy if h0 is None else h0, dummy if final is None else final,
        *rows, *sg.buffers, T, H // G, N, P, GH, sg.n_seg, sg.seg or 1, **tile, NPB=npb,
        **order, HAS_H0=h0 is not None, STORE_HT=final is not None, IS_VARLEN=packed,
        SEGMENTED=bool(sg.seg), **launch)


def final_state(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens):
    """The final state from the state pass alone (no output pass)."""
    return launch(module, plan, tensors, sizes, initial_state, cu_seqlens, output=False)[1]


def tile_space(ctx):
    """The tuner's space around the built-in tiles of a call on ctx's device (a GPU's limits
    carry its compute capability; the CPU's none)."""
    n_programs = ctx.sizes.get("b", 1) * ctx.sizes["h"]
    gpu = ctx.limits.capability != (0, 0)
    return chunked_space(ctx, tiles(ctx.plan("chunked"), ctx.sizes, n_programs,
                                    ctx.limits if gpu else None))


register_lowering(TritonLowering("chunked", render, launch, supports, tile_type=ChunkedTile,
                                 tile_space=tile_space, backward="chunked", grid_orders=True,
                                 final_state=final_state, keeps=True))
