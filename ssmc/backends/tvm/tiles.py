"""What the TVM backend's lowerings expose to the planner and the tuner: their tile type and
the space the tuner searches (the chunked lowering tunes its chunk size)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...tiles import SpaceContext, TileSpace, next_pow2, pow2_upto
from .lowerings.chunked_cuda.tiles import ChunkedCudaTile


@dataclass(frozen=True)
class TVMLowering:
    name: str
    tile_type: type | None = None
    tile_space: Callable | None = None


def chunked_space(ctx: SpaceContext) -> TileSpace:
    T = ctx.sizes["t"]
    axes = {"chunk_size": pow2_upto(16, min(128, max(next_pow2(T), 16)))}
    return {"chunk_size": ctx.plan("chunked").chunk_size}, axes, lambda v, ctx: None


TVM_LOWERINGS = {
    "scan": TVMLowering("scan"),
    # the tile pins the CUDA target's chunked kernels; the LLVM one reads only the chunk size
    "chunked": TVMLowering("chunked", tile_type=ChunkedCudaTile, tile_space=chunked_space),
    "quadratic": TVMLowering("quadratic"),
}
