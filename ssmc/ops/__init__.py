"""Built-in SSMs, written in the ssmc language itself.

Each op is a plain function with the familiar keyword options; it picks (and caches) the
definition variant for those options, so optional tensors are never materialised as zeros.
All tensors are time-major: (b, t, h, ...).

Each op's plain definition, for `ssmc.compile`, `explain`, `tune` and `export`, is its
`definition` attribute and its module's (`ssmc.ops.gla.definition`, `ssmc.ops.gla:definition`
on the command line); `mamba2` and `mamba1` are those of `ssd` and `selective_scan`.
"""
from .gla import gla
from .linear_attention import linear_attention
from .retention import retention
from .selective_scan import mamba1, selective_scan
from .ssd import mamba2, ssd

__all__ = ["ssd", "mamba2", "selective_scan", "mamba1", "retention", "gla", "linear_attention"]
