"""The Triton backend's lowerings, by name: one object per lowering with everything the backend
needs from it (`register_lowering`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ....tiles import Tile


def _supports_all(plan) -> None:
    return None


@dataclass(frozen=True)
class TritonLowering:
    """render(plan) -> the module source of the forward kernels;
    launch(module, plan, tensors, sizes, initial_state, cu_seqlens) -> (out, final state);
    supports(plan) -> the reason it cannot run the plan, or None;
    tile_type: the plan's tile for it (None: no tile parameters);
    tile_space(ctx) -> the tuner's space over those (`ssmc.tiles.TileSpace`), or None;
    backward: the lowering whose backward kernels differentiate it ("scan" or "chunked";
    `ssmc.backends.triton.backward`);
    grid_orders: whether its forward and backward kernels walk a grid's column orders
    (direction="cross2d");
    final_state(module, plan, tensors, sizes, initial_state, cu_seqlens) -> the final state
    alone, from only the passes it needs (None: the op runs whole and drops its output);
    keeps: whether `launch(..., keep=[])` appends what its backward can read instead of
    forming it again (`ssmc.backends.triton.backward`)."""

    name: str
    render: Callable
    launch: Callable
    supports: Callable = _supports_all
    tile_type: type[Tile] | None = None
    tile_space: Callable | None = None
    backward: str = "scan"
    grid_orders: bool = False
    final_state: Callable | None = None
    keeps: bool = False


LOWERINGS: dict[str, TritonLowering] = {}


def register_lowering(lowering: TritonLowering) -> TritonLowering:
    LOWERINGS[lowering.name] = lowering
    return lowering
