"""The references' operands: the inputs in canonical layout, the prologue (decay, key, value,
query) and the epilogue, by the IR's evaluator (`ssmc.ir.evaluate`).

Shared by both references: they differ in how they apply the recurrence, not in how they
compute its operands.
"""
from __future__ import annotations

import torch

from ..ir import Y, Program
from ..ir.evaluate import evaluate, to_canonical


def canonical_inputs(program: Program, tensors: dict, sizes: dict, dtype=torch.float64) -> dict:
    return {i.name: to_canonical(tensors[i.name].to(dtype), i.axes, sizes) for i in program.inputs}


def prologue(program: Program, env: dict) -> dict[str, torch.Tensor | None]:
    """decay, key, value, query as canonical tensors (decay None where the program has none)."""
    like = next(iter(env.values()))
    r = program.recurrence
    return {
        "decay": None if r.decay is None else evaluate(r.decay.expr, env, like),
        "key": evaluate(r.key.expr, env, like),
        "value": evaluate(r.value.expr, env, like),
        "query": evaluate(r.query.expr, env, like),
    }


def epilogue(program: Program, y: torch.Tensor, env: dict) -> torch.Tensor:
    """y: (b, t, h, p). Returns the output as (b, t, h, p)."""
    env = dict(env)
    env[Y.name] = y.unsqueeze(3)  # canonical (b, t, h, 1, p)
    out = evaluate(program.output.expr, env, y)
    b, t, h, p = y.shape
    return out.expand(b, t, h, 1, p).squeeze(3)
