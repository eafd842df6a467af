"""The chunked (SSD) lowering: one fused kernel per (sequence, head, p-block).

Each program walks its sequence chunk by chunk, keeping the n x BP state block in registers:
per chunk, the intra-chunk part is two tensor-core matmuls (query key^T masked by the decay,
then times value), the inter-chunk part one more (query times the carried state), and the state
update a fourth (key^T times the decay-weighted value). States never touch device memory, so
the only traffic is the inputs and the output, and the epilogue is applied before the store.

Decay handling in log space: with L the within-chunk running sum of log-decays, the weight of
key s seen from query t is exp(L_t - L_s) (exponent <= 0 on the causal half). A scalar decay
uses that directly. A per-key decay factors it as (q_t exp(L_t)) . (k_s exp(-L_s)), which
overflows once a chunk's summed log-decay on one key falls below about -80, so per-key decays
use 16-step chunks (a chunk's decay would have to shrink a key by e^-80 in 16 steps).
"""
from __future__ import annotations

import torch
import triton

from ....ir import DecayKind, Direction
from ....plan import Plan
from ..common import (HEADER, compute_dtype, compute_type, direction_slices, dot_type, input_args,
                      input_params, next_pow2, num_sequences)
from ..render import Context, Emitter, Tile
from . import register_lowering

FIXED = {"b": "b_idx", "h": "h_idx", "g": "g_idx"}


def per_key_decay(plan: Plan) -> bool:
    ld = plan.program.log_decay
    return ld is not None and "n" in ld.axes


def supports(plan: Plan) -> str | None:
    if plan.program.decay_kind is DecayKind.FULL:
        return "a decay that varies over p has no chunked form"
    return None


def render(plan: Plan) -> str:
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    dt = dot_type(plan)
    prec = ', input_precision="ieee"' if plan.dtype == "float32" else ""
    t_ax = ("t", "t_row", "mask_t")
    qk_tile = Tile([t_ax, ("n", "offs_n", "mask_n")], FIXED)
    v_tile = Tile([t_ax, ("p", "offs_p", "mask_p")], FIXED)
    ld_tile = qk_tile if per_key_decay(plan) else Tile([t_ax], FIXED)

    body = Emitter(indent=2)
    ctx_qk = Context(prog, qk_tile, body, "qk", ct)
    ctx_v = Context(prog, v_tile, body, "v", ct)
    key = ctx_qk.value(rec.key, "key_raw")
    query = ctx_qk.value(rec.query, "query_raw")
    body(f"key = tl.where(mask_t[:, None] & mask_n[None, :], {key}, 0.0)")
    body(f"query = tl.where(mask_t[:, None] & mask_n[None, :], {query}, 0.0)")
    value = ctx_v.value(rec.value, "value_raw")
    body(f"value = tl.where(mask_t[:, None] & mask_p[None, :], {value}, 0.0).to({dt})")
    body("causal = offs_c[:, None] >= offs_c[None, :]")
    if prog.log_decay is None:
        body(f"scores = tl.dot(query.to({dt}), tl.trans(key.to({dt})){prec})")
        body("scores = tl.where(causal, scores, 0.0)")
        body(f"y = tl.dot(scores.to({dt}), value{prec})")
        body(f"y += tl.dot(query.to({dt}), state.to({dt}){prec})")
        body(f"state += tl.dot(tl.trans(key.to({dt})), value{prec})")
    elif per_key_decay(plan):
        ctx_ld = Context(prog, ld_tile, body, "qk", ct)
        ctx_ld.loaded = ctx_qk.loaded
        ld = ctx_ld.value(prog.log_decay, "ld_raw")
        body(f"ld = tl.where(mask_t[:, None] & mask_n[None, :], {ld}, 0.0)")
        body("lc = tl.cumsum(ld, axis=0)")
        body("l_last = tl.sum(ld, axis=0)")
        body("q_dec = query * tl.exp(lc)")
        body(f"scores = tl.dot(q_dec.to({dt}), tl.trans((key * tl.exp(-lc)).to({dt})){prec})")
        body("scores = tl.where(causal, scores, 0.0)")
        body(f"y = tl.dot(scores.to({dt}), value{prec})")
        body(f"y += tl.dot(q_dec.to({dt}), state.to({dt}){prec})")
        body("k_dec = key * tl.exp(l_last[None, :] - lc)")
        body(f"state = state * tl.exp(l_last)[:, None] + "
             f"tl.dot(tl.trans(k_dec.to({dt})), value{prec})")
    else:
        ctx_ld = Context(prog, ld_tile, body, "l", ct)
        ld = ctx_ld.value(prog.log_decay, "ld_raw")
        body(f"ld = tl.where(mask_t, {ld}, 0.0)")
        body("lc = tl.cumsum(ld, axis=0)")
        body("l_last = tl.sum(ld, axis=0)")
        body(f"scores = tl.dot(query.to({dt}), tl.trans(key.to({dt})){prec})")
        body("diff = tl.where(causal, lc[:, None] - lc[None, :], float('-inf'))")
        body("scores = scores * tl.exp(diff)")
        body(f"y = tl.dot(scores.to({dt}), value{prec})")
        body(f"y += tl.dot((query * tl.exp(lc)[:, None]).to({dt}), state.to({dt}){prec})")
        body("k_dec = key * tl.exp(l_last - lc)[:, None]")
        body(f"state = state * tl.exp(l_last) + tl.dot(tl.trans(k_dec.to({dt})), value{prec})")

    body("y_off = ((b_idx * T + t_row[:, None]) * H + h_idx) * P + offs_p[None, :]")
    body("y_mask = mask_t[:, None] & mask_p[None, :]")
    body("if ACCUM_IN:")
    with body.block():
        body("y += tl.load(yacc_ptr + y_off, mask=y_mask, other=0.0)")
    body("if WRITE_OUT:")
    with body.block():
        epi = Context(prog, v_tile, body, "e", ct, extra={"y": "y"})
        epi.loaded.update({k: v for k, v in ctx_v.loaded.items()})
        out = epi.value(prog.output, "out")
        body("tl.store(out_ptr + b_idx * s_out_b + t_row[:, None] * s_out_t + h_idx * s_out_h"
             f" + offs_p[None, :] * s_out_p, {out}.to(out_ptr.dtype.element_ty), mask=y_mask)")
    body("else:")
    with body.block():
        body("tl.store(yacc_ptr + y_off, y, mask=y_mask)")

    return HEADER + f'''
@triton.jit
def ssmc_chunked_fwd(
    {input_params(prog)},
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, h0_ptr, hT_ptr, cu_ptr,
    T, HPG, N, P,
    BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, REVERSE: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACCUM_IN: tl.constexpr, WRITE_OUT: tl.constexpr,
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
    length = end - start
    offs_c = tl.arange(0, BT)
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
    for c0 in range(0, length, BT):
        i_row = c0 + offs_c
        mask_t = i_row < length
        if REVERSE:
            t_row = end - 1 - i_row
        else:
            t_row = start + i_row
{body.text()}
    if STORE_HT:
        tl.store(hT_ptr + state_off, state, mask=state_mask)
'''


def tiles(plan: Plan, sizes: dict, n_programs: int) -> dict:
    """Tile sizes: BT 64 (16 for per-key decays), full n, and a p-block small enough that
    there are at least a few programs per streaming multiprocessor."""
    tile = plan.tile_dict()
    N, P = sizes["n"], sizes["p"]
    BN = max(next_pow2(N), 16)
    BT = tile.get("BT", 16 if per_key_decay(plan) else 64)
    BP = tile.get("BP")
    if BP is None:
        BP = max(min(next_pow2(P), 64), 16)
        while BP > 16 and n_programs * triton.cdiv(P, BP) < 1024:
            BP //= 2
    return dict(BT=BT, BN=BN, BP=BP, num_warps=tile.get("num_warps", 4),
                num_stages=tile.get("num_stages", 2))


def launch(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens):
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = tensors[prog.inputs[0].name].device
    S = num_sequences(sizes, cu_seqlens)
    dirs = prog.recurrence.directions
    cdt = compute_dtype(plan)
    out = torch.empty(B, T, H, P, dtype=getattr(torch, plan.dtype), device=device)
    final = None
    if plan.return_final_state:
        final = torch.empty((len(dirs), S, H, N, P), dtype=cdt, device=device)
    if out.numel() == 0 and final is None:
        return out, None
    yacc = torch.zeros(B, T, H, P, dtype=cdt, device=device) if len(dirs) > 1 else out
    h0s = direction_slices(plan, initial_state)
    meta = tiles(plan, sizes, S * H)
    if device.type != "cuda":
        meta.pop("num_warps"), meta.pop("num_stages")
    grid = (S, H, triton.cdiv(P, meta["BP"]))
    args = input_args(prog, tensors)
    for i, direction in enumerate(dirs):
        h0 = None if h0s[i] is None else h0s[i].contiguous()
        module.ssmc_chunked_fwd[grid](
            *args, out, *out.stride(), yacc,
            out if h0 is None else h0, out if final is None else final[i],
            out if cu_seqlens is None else cu_seqlens,
            T, H // G, N, P,
            REVERSE=direction is Direction.REVERSE, HAS_H0=h0 is not None,
            STORE_HT=final is not None, IS_VARLEN=cu_seqlens is not None,
            ACCUM_IN=i > 0, WRITE_OUT=i == len(dirs) - 1, **meta,
        )
    if final is not None and len(dirs) == 1:
        final = final[0]
    return out, final


register_lowering("chunked", render, launch, supports)
