"""The scan lowering's launch: block sizes, the orders per launch, and the lowering's
registration (kernels rendered by scan.py)."""
from __future__ import annotations

import torch
import triton

from ....plan import Plan
from ..common import Outputs, input_args, next_pow2
from ..tiles import ScanTile, scan_space
from .registry import TritonLowering, register_lowering
from .scan import render


def block_sizes(N: int, P: int, tile: dict | None = None) -> tuple[int, int]:
    """All of n (the query contraction) and a p-block that keeps the state tile at or under
    4096 fp32 values; `tile` (plan.tile) may set BP. (The decode step's blocks.)"""
    BN = max(next_pow2(N), 2)
    BP = max(min(next_pow2(P), max(4096 // BN, 2), 32), 2)
    if tile and "BP" in tile:
        BP = tile["BP"]
    return BN, BP


#: values of one [BT, n, BP] block tile: a handful of such tiles are live in the loop
BLOCK_VALUES = 2048
#: steps per block at most (the prefix scan's depth is log2 of it)
MAX_BT = 16
#: a state tile (n x BP) at least this large runs a step at a time (BT = 1): measured on an
#: H200 (VMamba's selective scan, 56x56 grid, b=32, d=192, bf16), n=16: 4.3-4.8 ms a step at a
#: time (BP=32) against 6.7-7.8 ms in blocks of 16 steps (BP=8); n=1: 1.1-1.7 ms in blocks
#: against 3.4-4.2 ms a step at a time. A large tile has the work per step to hide its loads'
#: latency; a small one waits on them unless the loads of many steps are issued together.
STEP_AT_A_TIME_VALUES = 256


def block_tile(N: int, P: int, tile: dict | None = None) -> tuple[int, int, int]:
    """(BN, BP, BT) in blocks: all of n; a p-block narrow enough that a block of MAX_BT steps
    fits BLOCK_VALUES (narrow p-blocks also give more programs to a scan that has few); steps
    per block to fill the rest (at least 2). `tile` may set BP and BT. (The backward's
    blocks: it checkpoints the state entering each.) n = 1 and p = 1 (VMamba's n = 1,
    Mamba-1's channels) take blocks of one, not two: a padded half does all the work of a
    block for nothing (Mamba-1's backward, sm_90a: 438 instructions a loop iteration per 32
    steps of a state at p padded to 2, 230 at 1 with twice the steps; benchmarks/sass_mix.py)."""
    tile = tile or {}
    BN = next_pow2(N)
    BP = tile.get("BP") or min(next_pow2(P), 32, max(BLOCK_VALUES // (BN * MAX_BT), 2))
    BT = tile.get("BT") or max(min(MAX_BT, BLOCK_VALUES // (BN * BP)), 2)
    return BN, BP, BT


#: a step-at-a-time state tile this small runs in one warp, so that each step's sum over n
#: stays inside the warp (no shared memory, no barrier per step): measured on an H100
#: (VMamba's selective scan, b=32, d=192, bf16, n=16), 56x56: 3.75 ms with a 16 x 8 tile in
#: one warp against 4.56 ms with the 16 x 32 tile in four warps (16 x 32 in one warp: 3.93;
#: 16 x 4: 6.1, too little work per step); 28x28: 1.02 against 1.24 ms.
ONE_WARP_VALUES = 128


def scan_blocks(N: int, P: int, tile: dict | None = None) -> tuple[int, int, int]:
    """The forward's (BN, BP, BT): a step at a time (BT = 1, the decode step's p-block) where
    the state tile is large (STEP_AT_A_TIME_VALUES), narrowed to one warp's ONE_WARP_VALUES
    where n is small enough to keep BP >= 8, else `block_tile`. `tile` may set BP and BT."""
    tile = tile or {}
    BN, BP_step = block_sizes(N, P, tile)
    if tile.get("BT") == 1 or ("BT" not in tile and BN * BP_step >= STEP_AT_A_TIME_VALUES):
        if "BP" not in tile and ONE_WARP_VALUES // BN >= 8:
            BP_step = min(BP_step, ONE_WARP_VALUES // BN)
        return BN, BP_step, 1
    return block_tile(N, P, tile)


def scan_warps(BN: int, BP: int, BT: int, tile: dict | None = None) -> int:
    """Warps of a forward scan program: `tile`'s, else one for a step-at-a-time tile of at
    most ONE_WARP_VALUES, else four."""
    if tile and tile.get("num_warps"):
        return tile["num_warps"]
    return 1 if BT == 1 and BN * BP <= ONE_WARP_VALUES else 4


def order_bits(plan: Plan) -> tuple[int, int]:
    """(REV_BITS, COL_BITS): bit i set where order i runs reversed / down the grid's columns."""
    dirs = plan.program.recurrence.directions
    return (sum(1 << i for i, d in enumerate(dirs) if d.reversed),
            sum(1 << i for i, d in enumerate(dirs) if d.column))


def order_launches(plan: Plan, sums_output: bool = True) -> list[tuple[int, int]]:
    """[(first order, number of orders)] per launch: every order in one launch, or one launch
    per order where the orders' outputs are summed (atomically, in one launch) and torch's
    deterministic algorithms are on."""
    nd = len(plan.program.recurrence.directions)
    if nd > 1 and sums_output and torch.are_deterministic_algorithms_enabled():
        return [(i, 1) for i in range(nd)]
    return [(0, nd)]


def launch(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens, final_out=None):
    """Run the scan. `final_out`, when given, is the buffer the final state is written to (a
    contiguous (S, H, N, P) tensor, (2, S, H, N, P) when bidirectional, in the compute dtype);
    it may be `initial_state` itself: each program loads its state tile before the loop and
    stores the same tile after it, so updating a state in place (a decode step) is safe."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    o = Outputs(plan, tensors, sizes, initial_state, cu_seqlens, final_out)
    if o.empty:
        return o.result()
    device, S, dirs = o.device, o.S, o.dirs
    out, final, yacc = o.out, o.final, o.yacc
    tile = plan.tile_dict()
    BN, BP, BT = scan_blocks(N, P, tile)
    NPB = triton.cdiv(P, BP)
    rev, col = order_bits(plan)
    warps = {"num_warps": scan_warps(BN, BP, BT, tile)} if device.type == "cuda" else {}
    args = input_args(prog, tensors, None)
    nd = len(dirs)
    launches = order_launches(plan)
    if any(count > 1 for _, count in launches):   # orders added atomically, from zero
        yacc.zero_()
    for first, count in launches:
        # all orders: the whole (orders, S, H, N, P) states; one: its own slice
        h0 = initial_state if count == nd else o.h0s[first]
        h0 = None if h0 is None else h0.contiguous()
        fin = final if final is None or count == nd else final[first]
        module.ssmc_scan_fwd[(S, H, NPB * count)](
            *args, out, *out.stride(), yacc, out if h0 is None else h0,
            out if fin is None else fin, out if cu_seqlens is None else cu_seqlens,
            T, H // G, N, P, sizes.get("grid_h", 1), NPB, first, rev, col,
            BN=BN, BP=BP, BT=BT, STAGES=tile.get("stages") or 1, HAS_H0=h0 is not None,
            EVEN_P=P % BP == 0,
            STORE_HT=final is not None, IS_VARLEN=cu_seqlens is not None,
            ACCUM_IN=first > 0, WRITE_OUT=first + count == nd, ATOMIC=count > 1, **warps)
        if count > 1 and out.numel():     # the atomically summed orders' epilogue
            BTE = 16
            module.ssmc_scan_epilogue[(B, triton.cdiv(T, BTE), H)](
                *args, out, *out.stride(), yacc, T, H // G, P,
                BT=BTE, BP=max(next_pow2(P), 2))
    return o.result()


def tile_space(ctx):
    blocks = scan_blocks(ctx.sizes["n"], ctx.sizes["p"])
    return scan_space(ctx, *blocks, scan_warps(*blocks))


register_lowering(TritonLowering("scan", render, launch, tile_type=ScanTile,
                                 tile_space=tile_space, backward="scan", grid_orders=True))
