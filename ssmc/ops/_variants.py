"""Calls of built-in ops: the compiled op of the definition variant for the given options."""
from __future__ import annotations

from ..api import compiled_variant as compiled


def call(builder, options: dict, tensors: tuple, *, backend="auto", lowering="auto", **extra):
    op = compiled(builder, tuple(sorted(options.items())), backend, lowering)
    return op(*tensors, **extra)
