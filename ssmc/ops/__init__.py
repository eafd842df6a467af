"""Built-in SSMs, written in the ssmc language itself.

Each op is a plain function with the familiar keyword options; it picks (and caches) the
definition variant for those options, so optional tensors are never materialised as zeros.
All tensors are time-major: (b, t, h, ...).
"""
from .gla import gla
from .linear_attention import linear_attention
from .retention import retention
from .selective_scan import selective_scan
from .ssd import mamba2, ssd

__all__ = ["ssd", "mamba2", "selective_scan", "retention", "gla", "linear_attention"]
