"""The Triton lowerings' tile parameters (typed) and the spaces the tuner searches over them.

Each field left None takes the lowering's built-in value, which may depend on the call's sizes
(`chunked.tiles`, `scan.block_sizes`, `quadratic.block_sizes` compute them). The resource
checks are deliberately rough (operand tiles times pipeline stages, fp32 accumulators spread
over the threads); a config that passes them but still fails to compile is recorded as failed
by the tuner.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...ir import Program
from ...tiles import SpaceContext, Tile, TileSpace, count, next_pow2, pow2, pow2_upto


@dataclass(frozen=True)
class ScanTile(Tile):
    BP: int | None = pow2("value channels per program (the state tile is n x BP)")
    BT: int | None = pow2("steps per block (one prefix scan over a [BT, n, BP] tile)")
    stages: int | None = count("blocks whose loads are in flight ahead of the one computed")
    num_warps: int | None = pow2("warps per program")


@dataclass(frozen=True)
class ChunkedTile(Tile):
    BT: int | None = pow2("rows per output block (per-key decays: per block of the scores "
                          "pass, 16; their output pass takes whole chunks)")
    CS: int | None = pow2("state-pass chunk length, a multiple of BT")
    BN_state: int | None = pow2("key channels per state-pass program")
    BP_state: int | None = pow2("value channels per state-pass program")
    BP_out: int | None = pow2("value channels per output-pass program")
    warps_state: int | None = pow2("warps of the state pass")
    warps_out: int | None = pow2("warps of the output pass")
    stages_state: int | None = count("pipeline stages of the state pass's loads")
    stages_out: int | None = count("pipeline stages of the output pass")
    regs_pair: int | None = count("registers a thread of the output pass of two opposite "
                                  "orders may hold (chunked_pairs.py; 255 for no cap)")
    SEG_state: int | None = count("chunks per segment of the state pass, its segments walked "
                                  "side by side (default: where few sequences and heads would "
                                  "leave the GPU idle)")
    BT_bwd: int | None = pow2("backward: rows per chunk")
    BP_bwd: int | None = pow2("backward: value channels per block")
    WARPS_bwd: int | None = pow2("backward: warps of the per-chunk kernels")
    WARPS_DV_bwd: int | None = pow2("backward: warps of the d value kernel")
    BK_bwd: int | None = pow2("backward: key channels per step of the d value kernel's loop "
                              "(per-key decays: per program of the dq/dk kernel)")
    BNQK_bwd: int | None = pow2("backward, decays without n: key channels per program of the "
                                "dq/dk kernel")
    SEG_bwd: int | None = count("backward: chunks per segment of its sequential passes "
                                "(default: as SEG_state)")


@dataclass(frozen=True)
class QuadraticTile(Tile):
    BT: int | None = pow2("rows per query/key block")
    BNC: int | None = pow2("key channels per chunk of the attention kernels")
    BNS: int | None = pow2("key channels per final-state program")
    BP: int | None = pow2("value channels per block")
    num_warps: int | None = pow2("warps per program")


def _per_key_decay(program: Program) -> bool:
    ld = program.log_decay
    return ld is not None and "n" in ld.axes


def walk_stage_bytes(chunk: int, BN: int, BP: int, op_bytes: int) -> int:
    """Shared memory of one pipeline stage of a chunked sequential walk: a (chunk, BN) and a
    (chunk, BP) operand tile (Triton 3.6 on sm_90 allocates exactly that, plus 8 bytes)."""
    return chunk * (BN + BP) * op_bytes


def chunked_space(ctx: SpaceContext, built_in: dict) -> TileSpace:
    """`built_in`: the chunked lowering's built-in tiles at ctx's sizes."""
    P, T = ctx.sizes["p"], ctx.sizes["t"]
    BN = built_in["BN"]
    BPmax = max(next_pow2(P), 16)
    per_key = _per_key_decay(ctx.program)
    longest = min(128, max(next_pow2(T), 16))
    axes = {
        # per-key decays: a row block's diagonal block is elementwise work, BT^2 * BN
        "BT": (16, 32) if per_key else pow2_upto(16, longest),
        "BP_state": pow2_upto(16, min(64, BPmax)),
        "BP_out": pow2_upto(16, min(128, BPmax)),
        "warps_state": (2, 4, 8),
        "warps_out": (4, 8),
        "stages_state": (1, 2, 3, 4),
    }
    if per_key:   # the state pass's chunk; row blocks between them are tensor-core products
        axes["CS"] = pow2_upto(16, max(longest, 64))
    # the output pass has no pipelined loop: its stages change nothing, so they stay default
    default = {k: v for k, v in built_in.items() if k in axes}
    ob = ctx.op_bytes

    def check(v, ctx):
        cs = v.get("CS", v["BT"])
        if cs % v["BT"]:
            return f"a chunk of {cs} steps is not a whole number of {v['BT']}-row blocks"
        # the sequential state pass: an n x BP_state fp32 state, pipelined key/value chunk loads
        threads = 32 * v["warps_state"]
        smem = v["stages_state"] * walk_stage_bytes(cs, BN, v["BP_state"], ob)
        why = ctx.fits(threads, smem, BN * v["BP_state"] / threads)
        if why:
            return f"state pass: {why}"
        # measured on an H200 (Triton 3.6; ssd bf16, n=128, BT=64): the output pass with 8 warps
        # over a 32-channel p-block faulted with an illegal memory access, which loses the
        # process's device context; 16 channels were not tried
        if v["warps_out"] == 8 and v["BP_out"] < 64:
            return "output pass: 8 warps over fewer than 64 value channels (faulted on an H200)"
        # the output pass: q, k^T (per-key decays: the chunk's scores), v and the entering
        # state as operands; scores and y in fp32. Per-key decays take whole chunks there
        rows = cs if per_key else v["BT"]
        threads = 32 * v["warps_out"]
        smem = (2 * rows * BN + rows * v["BP_out"] + BN * v["BP_out"]) * ob
        why = ctx.fits(threads, smem, (rows * rows + rows * v["BP_out"]) / threads)
        return f"output pass: {why}" if why else None

    return default, axes, check


def scan_space(ctx: SpaceContext, BN: int, BP: int, BT: int, num_warps: int) -> TileSpace:
    """`BN`, `BP`, `BT`, `num_warps`: the scan's built-in blocks at ctx's sizes."""
    P = ctx.sizes["p"]
    # p = 1 (Mamba-1's channels) takes blocks of one: wider ones are padding
    axes = {"BP": pow2_upto(min(2, next_pow2(P)), min(64, next_pow2(P))),
            "BT": (1, 2, 4, 8, 16, 32),
            "stages": (1, 2, 3), "num_warps": (1, 2, 4, 8)}
    default = {"BP": BP, "BT": BT, "stages": 1, "num_warps": num_warps}

    def check(v, ctx):
        threads = 32 * v["num_warps"]
        # the n x BP state and about six [BT, n, BP] block tiles live in registers
        return ctx.fits(threads, 0, (BN * v["BP"] + 6 * v["BT"] * BN * v["BP"]) / threads)

    return default, axes, check


def quadratic_space(ctx: SpaceContext, built_in: dict) -> TileSpace:
    """`built_in`: the quadratic lowering's built-in blocks at ctx's sizes."""
    N, P, T = ctx.sizes["n"], ctx.sizes["p"], ctx.sizes["t"]
    BN = max(next_pow2(N), 16)
    wide = {"float32": 128, "float64": 64}.get(ctx.dtype, 256)
    diagonal = _per_key_decay(ctx.program)
    axes = {
        "BT": pow2_upto(16, min(128, max(next_pow2(T), 16))),
        "BNC": pow2_upto(16, min(BN, wide)),
        "BP": pow2_upto(16, min(128, max(next_pow2(P), 16))),
        "num_warps": (4, 8),
    }
    default = {k: v for k, v in built_in.items() if k in axes}
    ob = ctx.op_bytes

    def check(v, ctx):
        # measured on an H100 (Triton 3.6; ssd bf16, n=128, p=64, t=64) against the default
        # tile: with 4 warps, BT=64, BNC >= 64 and BP <= 32 the forward faulted (BNC=64 BP=32:
        # an illegal shared-memory read, which loses the process's device context) or gave
        # wrong outputs (0.59-0.79 relative); BNC=32, BT=32, BP=64 or 8 warps agreed. The same
        # source is right under the interpreter: the fault is in the sm_90 code for these tiles
        if v["num_warps"] == 4 and v["BT"] >= 64 and v["BNC"] >= 64 and v["BP"] < 64:
            return ("4 warps with BT >= 64, BNC >= 64 and BP < 64 (faulted or wrong on an "
                    "H100)")
        threads = 32 * v["num_warps"]
        bcast = v["BT"] * v["BT"] * v["BNC"] if diagonal else 0
        if bcast > 16384:  # the exact per-key decay broadcast lives in registers
            return f"(BT, BT, BNC) broadcast of {bcast} elements > 16384"
        smem = 3 * (2 * v["BT"] * v["BNC"] + v["BT"] * v["BP"]) * ob
        acc = (v["BT"] * v["BT"] + v["BT"] * v["BP"] + bcast) / threads
        return ctx.fits(threads, smem, acc)

    return default, axes, check
