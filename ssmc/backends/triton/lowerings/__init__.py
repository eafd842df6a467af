"""Per-lowering code generators for the Triton backend, registered by name (registry.py)."""
from . import chunked_launch, quadratic_launch, scan_launch  # noqa: F401 - each registers its lowering
from .registry import LOWERINGS, TritonLowering, register_lowering

__all__ = ["LOWERINGS", "TritonLowering", "register_lowering"]
