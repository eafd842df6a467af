"""The scan lowering: one program per (sequence, head, p-block), sequential over t.

The n x BP block of the state lives in registers for the whole sequence. Operands that do not
vary in t are computed once before the loop. Every decay structure is legal here, including a
decay that varies over p (Mamba-1 with p > 1). Every order, the grid's column orders of cross2d
included, is one launch that indexes its steps' positions in place (no permuted copies).
"""
from __future__ import annotations

import triton

from ....plan import Plan
from ..common import (HEADER, Outputs, emit_output, compute_type, input_args,
                      input_params, next_pow2)
from ..render import Context, Emitter, Tile, tile_mask
from ..templates import grid_position, indent
from ..tiles import ScanTile, scan_space
from .registry import TritonLowering, register_lowering

FIXED = {"b": "b_idx", "t": "t_idx", "h": "h_idx", "g": "g_idx"}

#: the position t_idx that step i visits (the backward's kernels share it). A column order
#: (cross2d) reads the row-major H x W grid column by column straight from memory: step u is
#: grid row u % GH, column u // GH. Such plans have no packed sequences (start = 0, end = T).
T_OF_I = f'''if REVERSE:
    u = end - 1 - i
else:
    u = start + i
if COLUMN:
    t_idx = {grid_position("u")}
else:
    t_idx = u'''


def _operand(ctx: Context, node, name: str, mask_axes) -> str:
    var = ctx.value(node, f"{name}_raw")
    mask = tile_mask(ctx.tile, [a for a in node.axes if a in mask_axes])
    if mask is None:
        ctx.emit(f"{name} = {var}")
    else:
        ctx.emit(f"{name} = tl.where({mask}, {var}, 0.0)")
    return name


def render(plan: Plan) -> str:
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    state_tile = Tile([("n", "offs_n", "mask_n"), ("p", "offs_p", "mask_p")], FIXED)
    out_tile = Tile([("p", "offs_p", "mask_p")], FIXED)

    pre = Emitter(indent=1)     # before the loop: time-invariant operands
    body = Emitter(indent=2)    # per step
    outer = Context(prog, state_tile, pre, "c", ct)
    inner = Context(prog, state_tile, body, "s", ct)
    operands = {"decay": rec.decay, "key": rec.key, "value": rec.value, "query": rec.query}
    for name, node in operands.items():
        if node is None:
            continue
        ctx = inner if "t" in node.axes else outer
        _operand(ctx, node, name, ("n", "p"))
    update = "state = decay * state + key * value" if rec.decay is not None else \
        "state = state + key * value"
    body(update)
    body("y = tl.sum(query * state, axis=0)")
    emit_output(body, prog, out_tile, ct, "t_idx", "offs_p", "mask_p")

    return HEADER + f'''
@triton.jit
def ssmc_scan_fwd(
    {input_params(prog)},
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, h0_ptr, hT_ptr, cu_ptr,
    T, HPG, N, P, GH,
    BN: tl.constexpr, BP: tl.constexpr, REVERSE: tl.constexpr, COLUMN: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, ACCUM_IN: tl.constexpr,
    WRITE_OUT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    h_idx = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(1)
    pid_p = tl.program_id(2)
    g_idx = h_idx // HPG
    if IS_VARLEN:
        b_idx = seq * 0
        start = tl.load(cu_ptr + seq).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        b_idx = seq
        start = seq * 0
        end = start + T
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < N
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    state_off = ((seq * H + h_idx) * N + offs_n[:, None]) * P + offs_p[None, :]
    state_mask = mask_n[:, None] & mask_p[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        state = tl.zeros([BN, BP], dtype={ct})
{pre.text()}
    for i in range(0, end - start):
{indent(T_OF_I, 2)}
{body.text()}
    if STORE_HT:
        tl.store(hT_ptr + state_off, state, mask=state_mask)
'''


def block_sizes(N: int, P: int, tile: dict | None = None) -> tuple[int, int]:
    """All of n (the query contraction) and a p-block that keeps the state tile at or under
    4096 fp32 values; `tile` (plan.tile) may set BP."""
    BN = max(next_pow2(N), 2)
    BP = max(min(next_pow2(P), max(4096 // BN, 2), 32), 2)
    if tile and "BP" in tile:
        BP = tile["BP"]
    return BN, BP


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
    out, final, yacc, h0s = o.out, o.final, o.yacc, o.h0s
    tile = plan.tile_dict()
    BN, BP = block_sizes(N, P, tile)
    grid = (S, H, triton.cdiv(P, BP))
    warps = {"num_warps": tile["num_warps"]} if "num_warps" in tile and device.type == "cuda" else {}
    for i, direction in enumerate(dirs):
        h0 = None if h0s[i] is None else h0s[i].contiguous()
        module.ssmc_scan_fwd[grid](
            *input_args(prog, tensors, i), out, *out.stride(), yacc,
            out if h0 is None else h0, out if final is None else final[i],
            out if cu_seqlens is None else cu_seqlens,
            T, H // G, N, P, sizes.get("grid_h", 1),
            BN=BN, BP=BP, REVERSE=direction.reversed, COLUMN=direction.column,
            HAS_H0=h0 is not None,
            STORE_HT=final is not None, IS_VARLEN=cu_seqlens is not None,
            ACCUM_IN=i > 0, WRITE_OUT=i == len(dirs) - 1, **warps,
        )
    return o.result()


def tile_space(ctx):
    return scan_space(ctx, *block_sizes(ctx.sizes["n"], ctx.sizes["p"]))


register_lowering(TritonLowering("scan", render, launch, tile_type=ScanTile,
                                 tile_space=tile_space, backward="scan", grid_orders=True))
