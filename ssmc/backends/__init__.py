"""Kernel backends. Each registers itself here with one line."""
from .base import Backend, get_backend, register_backend, registered, resolve_backend
from . import reference  # noqa: F401 - registers "reference"
from . import triton  # noqa: F401 - registers "triton"
from . import tvm  # noqa: F401 - registers "tvm"; tvm itself is imported lazily, so ssmc imports without it

__all__ = ["Backend", "get_backend", "register_backend", "registered", "resolve_backend"]
