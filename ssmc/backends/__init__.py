"""Kernel backends. Each registers itself here with one line."""
from .base import Backend, get_backend, register_backend, registered, resolve_backend
from . import reference  # noqa: F401 - registers "reference"
from . import triton  # noqa: F401 - registers "triton"

__all__ = ["Backend", "get_backend", "register_backend", "registered", "resolve_backend"]
