"""The scan lowering: one program per (sequence, head, p-block, order), sequential over t in
blocks of BT steps.

The n x BP block of the state lives in registers for the whole sequence. Each block's operands
are loaded and computed for BT steps at once (a [BT, n, BP] tile: every load of the block in
flight together), and the BT steps of the recurrence S_t = a_t * S_{t-1} + k_t v_t^T are one
parallel prefix scan over (a, kv) pairs in registers: a step-at-a-time loop waits on its loads'
latency every step and leaves the GPU idle at the program counts a scan has. Operands that do
not vary in t are computed once before the loop. Every decay structure is legal here, including
a decay that varies over p (Mamba-1 with p > 1).

Every order of the op (both directions of a bidirectional op, the four of cross2d) runs in the
same launch, one program per order (its flags unpacked from the REV_BITS / COL_BITS masks), the
grid's column orders indexed in place (no permuted copies). The orders' outputs are summed in
an fp32 accumulator with atomic adds and a second small kernel applies the epilogue; under
`torch.use_deterministic_algorithms(True)` the orders run one launch each instead, each adding
the earlier ones' sum, so that the output's bits do not depend on the order of the adds.
"""
from __future__ import annotations

import torch
import triton

from ....plan import Plan
from ..common import (HEADER, Outputs, emit_output, compute_type, input_args,
                      input_params, next_pow2)
from ..render import Context, Emitter, Tile, tile_mask
from ..templates import indent, rows
from ..tiles import ScanTile, scan_space
from .registry import TritonLowering, register_lowering

#: a block of BT steps: t is tiled too; k, the order axis of cross2d's per-order inputs, is
#: the program's order
BLOCK_FIXED = {"b": "b_idx", "h": "h_idx", "g": "g_idx", "k": "order"}

#: the prefix scan's operator: composing S -> a1 S + b1 with S -> a2 S + b2
AFFINE = '''
@triton.jit
def _ssmc_affine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2
'''


def _operand(ctx: Context, node, name: str, mask_axes) -> str:
    var = ctx.value(node, f"{name}_raw")
    mask = tile_mask(ctx.tile, [a for a in node.axes if a in mask_axes])
    if mask is None:
        ctx.emit(f"{name} = {var}")
    else:
        ctx.emit(f"{name} = tl.where({mask}, {var}, 0.0)")
    return name


#: a program's sequence, head, order and p-block; its rows [start, end) (packed sequences read
#: theirs from cu_ptr); the n and p offsets of its state tile (state_off: one (S, H, N, P)
#: block per order of the launch)
SETUP = '''    seq = tl.program_id(0).to(tl.int64)
    h_idx = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(1)
    order = tl.program_id(2) // NPB + FIRST_ORDER
    pid_p = tl.program_id(2) % NPB
    REVERSE = ((REV_BITS >> order) & 1) != 0
    COLUMN = ((COL_BITS >> order) & 1) != 0
    g_idx = h_idx // HPG
    if IS_VARLEN:
        b_idx = seq * 0
        start = tl.load(cu_ptr + seq).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        b_idx = seq
        start = seq * 0
        end = start + T
    length = end - start
    offs_c = tl.arange(0, BT)
    last_row = offs_c == BT - 1
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < N
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    state_off = ((((order - FIRST_ORDER) * tl.num_programs(0) + seq) * H + h_idx) * N
                 + offs_n[:, None]) * P + offs_p[None, :]
    state_mask = mask_n[:, None] & mask_p[None, :]'''

#: the kernels' parameters that SETUP reads
SETUP_PARAMS = "NPB, FIRST_ORDER, REV_BITS, COL_BITS"

BLOCK = Tile([("t", "t_row", "mask_t"), ("n", "offs_n", "mask_n"), ("p", "offs_p", "mask_p")],
             BLOCK_FIXED)
OUT_TILE = Tile([("t", "t_row", "mask_t"), ("p", "offs_p", "mask_p")], BLOCK_FIXED)


def emit_operands(prog, ct: str, pre: Emitter, body: Emitter, names,
                  tag: str = "") -> tuple[Context, Context]:
    """The recurrence operands `names` (decay, key, value, query) on the block tile, zero
    outside its n and p masks: time-invariant ones into `pre` (before the loop), the others
    into `body` (per block). `tag` tells apart two kernels' variables in one module. Returns
    the two contexts (what each has loaded)."""
    rec = prog.recurrence
    outer = Context(prog, BLOCK, pre, f"c{tag}", ct)
    inner = Context(prog, BLOCK, body, f"s{tag}", ct)
    for name in names:
        node = getattr(rec, name)
        if node is not None:
            _operand(inner if "t" in node.axes else outer, node, name, ("n", "p"))
    return outer, inner


def emit_block_states(rec, ct: str, body: Emitter) -> None:
    """`states` [BT, n, BP]: the state after each row of the block, from `state` (the state
    entering it) and the operands; `a` the rows' decays. Rows past the sequence's end are the
    identity step (a = 1, kv = 0), so the block's last row holds the state after its last valid
    step."""
    full = "(BT, BN, BP)"
    rows_valid = "mask_t[:, None, None]"
    if rec.decay is not None:
        body(f"a = tl.where({rows_valid}, tl.broadcast_to(decay, {full}), 1.0)")
    else:
        body(f"a = tl.full({full}, 1.0, {ct})")
    body(f"kv = tl.where({rows_valid}, tl.broadcast_to(key * value, {full}), 0.0)")
    body("a_cum, kv_cum = tl.associative_scan((a, kv), 0, _ssmc_affine)")
    body("states = a_cum * state[None, :, :] + kv_cum")


def last_state() -> str:
    return "state = tl.sum(tl.where(last_row[:, None, None], states, 0.0), axis=0)"


def render(plan: Plan) -> str:
    prog = plan.program
    ct = compute_type(plan)
    pre = Emitter(indent=1)     # before the loop: time-invariant operands
    body = Emitter(indent=2)    # per block of BT steps
    emit_operands(prog, ct, pre, body, ("decay", "key", "value", "query"))
    emit_block_states(prog.recurrence, ct, body)
    body("y = tl.sum(query * states, axis=1)")
    body(last_state())
    body("y_mask = mask_t[:, None] & mask_p[None, :]")
    body("if ATOMIC:")
    with body.block():
        body("tl.atomic_add(yacc_ptr + ((b_idx * T + t_row[:, None]) * H + h_idx) * P "
             "+ offs_p[None, :], y, mask=y_mask, sem=\"relaxed\")")
    body("else:")
    with body.block():
        emit_output(body, prog, OUT_TILE, ct, "t_row[:, None]", "offs_p[None, :]", "y_mask")

    # the epilogue of an atomically summed output: one program per (sequence, block of rows,
    # head)
    epi = Emitter(indent=1)
    emit_output(epi, prog, OUT_TILE, ct, "t_row[:, None]", "offs_p[None, :]", "y_mask")

    return HEADER + AFFINE + f'''
@triton.jit
def ssmc_scan_fwd(
    {input_params(prog)},
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, h0_ptr, hT_ptr, cu_ptr,
    T, HPG, N, P, GH, {SETUP_PARAMS},
    BN: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr, STAGES: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, ACCUM_IN: tl.constexpr,
    WRITE_OUT: tl.constexpr, ATOMIC: tl.constexpr,
):
{SETUP}
    if HAS_H0:
        state = tl.load(h0_ptr + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        state = tl.zeros([BN, BP], dtype={ct})
{pre.text()}
    for c0 in tl.range(0, length, BT, num_stages=STAGES):
{indent(rows(), 2)}
{body.text()}
    if STORE_HT:
        tl.store(hT_ptr + state_off, state, mask=state_mask)


@triton.jit
def ssmc_scan_epilogue(
    {input_params(prog)},
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, T, HPG, P,
    BT: tl.constexpr, BP: tl.constexpr,
):
    b_idx = tl.program_id(0).to(tl.int64)
    t_row = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)
    h_idx = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(2)
    g_idx = h_idx // HPG
    order = 0
    mask_t = t_row < T
    offs_p = tl.arange(0, BP)
    mask_p = offs_p < P
    y_mask = mask_t[:, None] & mask_p[None, :]
    y = tl.zeros([BT, BP], dtype={ct})
    ACCUM_IN: tl.constexpr = True
    WRITE_OUT: tl.constexpr = True
{epi.text()}
'''


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
    blocks: it checkpoints the state entering each.)"""
    tile = tile or {}
    BN = max(next_pow2(N), 2)
    BP = tile.get("BP") or max(min(next_pow2(P), 32, BLOCK_VALUES // (BN * MAX_BT)), 2)
    BT = tile.get("BT") or max(min(MAX_BT, BLOCK_VALUES // (BN * BP)), 2)
    return BN, BP, BT


def scan_blocks(N: int, P: int, tile: dict | None = None) -> tuple[int, int, int]:
    """The forward's (BN, BP, BT): a step at a time (BT = 1, the decode step's p-block) where
    the state tile is large (STEP_AT_A_TIME_VALUES), else `block_tile`. `tile` may set BP and
    BT."""
    tile = tile or {}
    BN, BP_step = block_sizes(N, P, tile)
    if tile.get("BT") == 1 or ("BT" not in tile and BN * BP_step >= STEP_AT_A_TIME_VALUES):
        return BN, BP_step, 1
    return block_tile(N, P, tile)


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
    warps = {"num_warps": tile["num_warps"]} if "num_warps" in tile and device.type == "cuda" else {}
    args = input_args(prog, tensors, None)
    nd = len(dirs)
    for first, count in order_launches(plan):
        # all orders: the whole (orders, S, H, N, P) states; one: its own slice
        h0 = initial_state if count == nd else o.h0s[first]
        h0 = None if h0 is None else h0.contiguous()
        fin = final if final is None or count == nd else final[first]
        module.ssmc_scan_fwd[(S, H, NPB * count)](
            *args, out, *out.stride(), yacc, out if h0 is None else h0,
            out if fin is None else fin, out if cu_seqlens is None else cu_seqlens,
            T, H // G, N, P, sizes.get("grid_h", 1), NPB, first, rev, col,
            BN=BN, BP=BP, BT=BT, STAGES=tile.get("stages") or 1, HAS_H0=h0 is not None,
            STORE_HT=final is not None, IS_VARLEN=cu_seqlens is not None,
            ACCUM_IN=first > 0, WRITE_OUT=first + count == nd, ATOMIC=count > 1, **warps)
        if count > 1 and out.numel():     # the atomically summed orders' epilogue
            BTE = 16
            module.ssmc_scan_epilogue[(B, triton.cdiv(T, BTE), H)](
                *args, out, *out.stride(), yacc, T, H // G, P,
                BT=BTE, BP=max(next_pow2(P), 2))
    return o.result()


def tile_space(ctx):
    return scan_space(ctx, *scan_blocks(ctx.sizes["n"], ctx.sizes["p"]))


register_lowering(TritonLowering("scan", render, launch, tile_type=ScanTile,
                                 tile_space=tile_space, backward="scan", grid_orders=True))
