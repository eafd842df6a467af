"""Per-lowering TIR generators, registered by name with `@register_lowering`."""
from . import chunked, chunked_cuda, quadratic, scan  # noqa: F401 - registers the lowerings
from .common import LOWERINGS, KernelSpec, func_name, grid_args, register_lowering

__all__ = ["LOWERINGS", "KernelSpec", "func_name", "grid_args", "register_lowering"]
