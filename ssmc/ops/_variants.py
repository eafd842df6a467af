"""Cache of definition variants and compiled ops, keyed by the options that change the IR."""
from __future__ import annotations

import functools

from .. import api


@functools.lru_cache(maxsize=None)
def compiled(builder, options: tuple, backend: str, lowering: str):
    definition = builder(**dict(options))
    return api.compile(definition, backend=backend, lowering=lowering)


def call(builder, options: dict, tensors: tuple, *, backend="auto", lowering="auto", **extra):
    op = compiled(builder, tuple(sorted(options.items())), backend, lowering)
    return op(*tensors, **extra)
