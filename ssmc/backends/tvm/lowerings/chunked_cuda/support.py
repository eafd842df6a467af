"""What the lowering can run: the plans and sizes it refuses, and why (the CUDA target runs
the scan for those)."""
from __future__ import annotations

from .....plan import Plan
from .tiles import chunk_size_problem, tiles


def unsupported(plan: Plan, N: int | None = None, P: int | None = None) -> str | None:
    """Why the CUDA chunked lowering cannot run this plan (at these sizes), or None. Raises
    ConfigError for tile pins that are not valid at any size (checked with the sizes)."""
    if plan.dtype not in ("bfloat16", "float16", "float32"):
        return f"the CUDA chunked lowering takes bf16/fp16/fp32 inputs, not {plan.dtype}"
    prog = plan.program
    why = chunk_size_problem(plan.chunk_size)
    if why:
        return why
    if len(prog.recurrence.directions) > 2:
        return "more than two directions"
    ld = prog.log_decay
    if prog.recurrence.decay is not None and (ld is None or "n" in ld.axes or "p" in ld.axes):
        return ("the CUDA chunked lowering handles decays that are scalar per step (per key "
                "or per channel decays have no overflow-free tensor-core form)")
    if N is not None and P is not None:
        t = tiles(plan, N, P)
        if isinstance(t, str):
            return t
    return None
