"""Per-lowering code generators for the Triton backend, registered by name."""
from __future__ import annotations

from typing import Callable, NamedTuple


class Lowering(NamedTuple):
    render: Callable    # plan -> Triton module source
    launch: Callable    # (module, plan, tensors, sizes, initial_state, cu_seqlens) -> (out, final)
    supports: Callable  # plan -> reason it cannot, or None


LOWERINGS: dict[str, Lowering] = {}


def register_lowering(name: str, render, launch, supports=lambda plan: None) -> None:
    LOWERINGS[name] = Lowering(render, launch, supports)


def _load_all() -> None:
    import importlib
    for name in ("scan", "chunked", "quadratic"):
        importlib.import_module(f"{__name__}.{name}")


_load_all()
