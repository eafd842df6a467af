"""The quadratic lowering's launch: block sizes, the forward and final-state kernels per
direction, the hidden attention matrix, and the lowering's registration (kernels rendered by
quadratic.py)."""
from __future__ import annotations

import torch
import triton

from ....errors import BackendUnavailableError, UnsupportedError
from ....plan import Plan
from ..common import Outputs, compute_dtype, input_args, interpreting, next_pow2
from ..tiles import QuadraticTile, quadratic_space
from .quadratic import decay_mode, render, supports
from .registry import TritonLowering, register_lowering


def block_sizes(plan: Plan, N: int, P: int) -> dict[str, int]:
    """BT (rows per query/key block), BNC (n-chunk of the attention kernels), BNS (n-block of
    the final-state kernel, whose n-blocks are independent), BP, and num_warps.

    tl.dot needs every dimension >= 16. Without a decay over n, BNC covers n in one chunk where
    the operand tiles fit shared memory (fp32 / fp64 tiles are 2x / 4x the bf16 ones, so BT and
    BNC shrink; measured sm90 compiles stay under ~160 KB); with one, the exact (BT, BT, BNC)
    broadcast is kept to 16K elements. A plan's `tile` may override any of them."""
    diagonal = decay_mode(plan) == "diagonal"
    BN = max(next_pow2(N), 16)
    wide = {"float32": 128, "float64": 64}.get(plan.dtype, 256)  # largest one-chunk BNC
    if diagonal:
        BT, BNC = 32, 16
    elif plan.dtype == "float64":
        BT, BNC = 32, min(BN, wide)
    else:
        BT, BNC = (32 if plan.dtype == "float32" and BN > 64 else 64), min(BN, wide)
    BP = max(min(next_pow2(P), 32 if plan.dtype == "float64" else 64), 16)
    sizes = dict(BT=BT, BNC=BNC, BNS=min(BN, 64), BP=BP)
    # 8 warps: at 4, sm90 compiles of the fwd kernel with states, varlen and an epilogue spill
    sizes["num_warps"] = 8
    sizes.update(plan.tile_dict())
    return sizes


def _low_precision_dots(device: torch.device) -> bool:
    # under the interpreter 16-bit dots are wrong; the kernels then round and multiply in fp32
    return device.type == "cuda"


def launch(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens):
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    o = Outputs(plan, tensors, sizes, initial_state, cu_seqlens)
    if o.empty:
        return o.result()
    device, S, dirs = o.device, o.S, o.dirs
    out, final, yacc, h0s = o.out, o.final, o.yacc, o.h0s
    bs = block_sizes(plan, N, P)
    BT, BNC, BNS, BP, warps = bs["BT"], bs["BNC"], bs["BNS"], bs["BP"], bs["num_warps"]
    npb = triton.cdiv(P, BP)
    # without a host sync, every sequence gets the query blocks of the longest possible one
    # (T); programs past their sequence's end return at once
    grid = (triton.cdiv(T, BT) * npb, H, S)
    state_grid = (triton.cdiv(N, BNS) * npb, H, S)
    cu = out if cu_seqlens is None else cu_seqlens
    lowp = _low_precision_dots(device)
    GH = sizes.get("grid_h", 1)   # a grid's height (cross2d): its column orders' layout
    for i, direction in enumerate(dirs):
        args = input_args(prog, tensors, i)   # per-order inputs: this order's slice
        h0 = None if h0s[i] is None else h0s[i].contiguous()
        flags = dict(REVERSE=direction.reversed, COLUMN=direction.column,
                     HAS_H0=h0 is not None, IS_VARLEN=cu_seqlens is not None, LOWP=lowp,
                     num_warps=warps)
        if out.numel() > 0:
            module.ssmc_quadratic_fwd[grid](
                *args, out, *out.stride(), yacc, out if h0 is None else h0, cu,
                T, H // G, N, P, GH, BT=BT, BNC=BNC, BP=BP,
                ACCUM_IN=i > 0, WRITE_OUT=i == len(dirs) - 1, **flags)
        if final is not None and final.numel() > 0:
            module.ssmc_quadratic_state[state_grid](
                *args, out if h0 is None else h0, final[i], cu,
                T, H // G, N, P, GH, BT=BT, BNC=BNS, BP=BP, **flags)
    return o.result()


def attention_matrix(module, plan: Plan, tensors, sizes) -> torch.Tensor:
    """The hidden attention matrix M (b, h, t, t), y = M value before the epilogue, summed over
    directions, in the compute dtype (fp32; fp64 for fp64 plans). One unpacked batch; `module`
    is the plan's generated module."""
    why = supports(plan)
    if why is not None:
        raise UnsupportedError(f"{plan.program.name}: attention_matrix: {why}")
    prog = plan.program
    device = tensors[prog.inputs[0].name].device
    if device.type != "cuda" and not interpreting():
        raise BackendUnavailableError(
            f"the Triton backend runs on CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
            "before importing triton to run it on the CPU, or use ssmc.reference")
    B, T, H, G, N = (sizes[a] for a in "bthgn")
    M = torch.zeros(B, H, T, T, dtype=compute_dtype(plan), device=device)
    if M.numel() == 0:
        return M
    bs = block_sizes(plan, N, sizes["p"])
    BT, BNC = bs["BT"], bs["BNC"]
    nb = triton.cdiv(T, BT)
    with torch.cuda.device(device) if device.type == "cuda" else _NullContext():
        for i, direction in enumerate(prog.recurrence.directions):
            module.ssmc_quadratic_matrix[(nb, nb, B * H)](
                *input_args(prog, tensors, i), M, M, T, H, H // G, N, sizes.get("grid_h", 1),
                BT=BT, BNC=BNC, REVERSE=direction.reversed, COLUMN=direction.column,
                IS_VARLEN=False, LOWP=_low_precision_dots(device), num_warps=bs["num_warps"])
    return M


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False




def tile_space(ctx):
    return quadratic_space(ctx, block_sizes(ctx.plan("quadratic"), ctx.sizes["n"],
                                            ctx.sizes["p"]))


# the chunked backward: the same mathematics
register_lowering(TritonLowering("quadratic", render, launch, supports,
                                 tile_type=QuadraticTile, tile_space=tile_space,
                                 backward="chunked", grid_orders=True))
