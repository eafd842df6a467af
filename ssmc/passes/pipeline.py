"""The order in which passes run over every definition: one readable list."""
from __future__ import annotations

from ..ir import Program
from . import classify_decay as _classify  # noqa: F401 - registers the pass
from . import derive_backward as _derive_backward  # noqa: F401 - registers the pass
from . import log_space as _log_space  # noqa: F401 - registers the pass
from .base import PassContext, run_passes

PIPELINE = (
    "classify_decay",
    "log_space_decay",
    "derive_backward",
)


def run_pipeline(program: Program, ctx: PassContext | None = None) -> Program:
    return run_passes(program, PIPELINE, ctx)
