"""The chunked (SSD) lowering on CUDA: a parallel chunk pass, a sequential elementwise pass
and a parallel output pass, with the chunk-local matrix products on tensor cores (`mma.sync`
m16n8k16 through `T.ptx_legacy.mma`) for bf16/fp16 plans and as tiled fp32 FMAs from shared
memory for fp32.

Per direction, three kernels (each module's docstring says how):
    chunk pass (chunk_pass.py), every chunk in parallel: dS_c = key^T @ (value * exp(l_last -
        lc)) and the chunk's total log-decay l_last, into its slot of the workspaces
    sequential pass (seq_pass.py), elementwise: per chunk in order, dS = ws[slot];
        ws[slot] = S (the state entering the chunk); S = exp(l_last) * S + dS
    output pass (out_pass.py), every chunk in parallel: y = exp(lc_i) * (query @ state_in) +
        G @ value with G = (query @ key^T) * exp(lc_i - lc_j) on the causal half

The modules: tiles.py plans the tiling from the plan's tile pins (ChunkedCudaTile, which
documents every pin) and the shared-memory budget; support.py says which plans the lowering
refuses; slots.py lays out the workspaces; emitter.py, copies.py and mma.py are the helpers the
passes write with (each pass is a function of that emitter, `e`); this module runs the passes in
order and registers the lowering.

Both parallel passes: where the value is a bare input carrying p times a factor free of p and n
(`value_split`; Mamba-2's x * softplus(dt + dt_bias)), the factor is evaluated once a step,
beside the log-decays, into shared memory (svs), and the value tile's copies load the input
and multiply (the softplus's exp and log were evaluated once an element).

16-bit plans evaluate exp and divisions whose results are rounded to 16 bits right after (the
operand tiles' and the epilogue's expressions, the output pass's decay factors) with CUDA's
approximate `__expf` / `__fdividef` (plan.tile FM, default on; FM=0: exact; fp32 plans: exact).

Shared tiles are stored with the reduction axis contiguous (transposed on the way in where
needed) and rows padded by 8 elements, so that fragment loads are 32-bit and free of bank
conflicts (warp ownership of the products: mma.py).

Extra arguments (after the common ones, see common.py):
    ws   (NS, H, P, N) in the operand type: each chunk's dS (chunk pass), then the state
         entering every chunk (sequential pass) ("chunk slots"; NS = B * ceil(TT / Q), or
         TT // Q + S for packed sequences: sequence s's chunk c is slot TT0_s // Q + s + c,
         which never collides with the next sequence's)
    cd   (NS, H) float32: every chunk's total log-decay (chunk pass -> sequential pass)
    cs   (NS,) int32, packed sequences only: the sequence of every slot (-1: unused), written
         by two small kernels before the first direction, read by the chunk and output passes.
`workspace_shapes` gives their shapes. Limits (`unsupported`): decays that vary over the key
axis (their tensor-core form needs a factorisation that overflows), float64, chunk sizes that
are not a multiple of 16 up to 128, and tiles that do not fit in 48 KB of shared memory
(the chunk pass's count includes its staged dS tile, where that is larger than the key tile).
"""
from __future__ import annotations

from ..common import KernelSpec, register_lowering
from .chunk_pass import chunk_pass
from .copies import Copies
from .mma import Mma
from .out_pass import out_pass
from .seq_pass import seq_pass
from .slots import init_slots, map_slots, num_slots, workspace_shapes
from .support import unsupported
from .tiles import (
    MMA_DTYPES,
    SMEM,
    THREADS,
    WARPS,
    ChunkedCudaTile,
    Tiles,
    operand_dtype,
    tiles,
)
from .value_split import value_split

__all__ = ["MIN_BLOCKS_MARK", "MMA_DTYPES", "SMEM", "THREADS", "WARPS", "ChunkedCudaTile",
           "Tiles", "num_slots", "operand_dtype", "render_chunked_cuda", "tiles", "unsupported",
           "value_split", "workspace_shapes"]

#: a comment line of the TVMScript text that build.cuda_host_source turns into the second
#: argument of __launch_bounds__ of the kernels listed (by their order in the function; TIR
#: has no attribute for it): "# ssmc.cuda_min_blocks_per_sm = K @ i,j"
MIN_BLOCKS_MARK = "# ssmc.cuda_min_blocks_per_sm = "


class _Kernels(Copies, Mma):
    """The emitter the passes write with: the common pieces, the copies and the products."""


@register_lowering("chunked", target="cuda")
def render_chunked_cuda(spec: KernelSpec) -> str:
    e = _Kernels(spec)
    e.header()
    mark = len(e.w.lines)
    kernels, out_kernels = 0, []
    if e.varlen:
        init_slots(e)
        map_slots(e)
        kernels += 2
    for d_index, direction in enumerate(e.directions):
        chunk_pass(e, d_index, direction)
        seq_pass(e, d_index, direction)
        out_pass(e, d_index, direction)
        out_kernels.append(kernels + 2)
        kernels += 3
    if e.t.MB:
        # the output passes only (the others' registers stay uncapped)
        e.w.lines.insert(mark, "    " + MIN_BLOCKS_MARK + f"{e.t.MB} @ " +
                         ",".join(map(str, out_kernels)))
    return e.finish()
