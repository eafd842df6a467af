"""A shard's total decay: the product of its decays over `t`, the factor by which the shard
scales the state that enters it.

The decay is evaluated with the IR's evaluator (`ssmc.ir.evaluate`), so the
expression means exactly what it means to every backend, and only the inputs the decay reads
are converted. The product is taken directly, never as exp(sum log|decay|): a decay may be any
real number (0 is an exact reset, a negative one flips the state's sign), and a log-space sum
would turn a zero into -inf and lose the sign. torch's `prod` differentiates exactly through
zeros. It is accumulated in float64, since a shard may hold a million factors.
"""
from __future__ import annotations

import torch

from ..ir import Program
from ..ir.evaluate import evaluate, to_canonical


def total_decay(program: Program, tensors: dict, sizes: dict,
                dtype: torch.dtype) -> torch.Tensor | None:
    """prod_t decay_t over the shard, shaped (b', h', n', p') with each primed axis either its
    size or 1 (broadcast against the state (b, h, n, p)); None when the definition has no decay.
    A decay without `t` (per head, per key) is raised to the power of the shard's length; an
    empty shard's total decay is 1. Differentiable w.r.t. the inputs the decay reads."""
    decay = program.recurrence.decay
    if decay is None:
        return None
    names = decay.inputs()
    env = {n: to_canonical(tensors[n].to(dtype), program.input(n).axes, sizes) for n in names}
    device = next(iter(tensors.values())).device
    like = torch.zeros((), dtype=dtype, device=device)  # the dtype and device of constants
    factors = evaluate(decay.expr, env, like)
    factors = factors.reshape((1,) * (5 - factors.dim()) + tuple(factors.shape))
    if factors.shape[1] == sizes["t"]:  # one factor per step (with t = 1, either way)
        total = torch.prod(factors, dim=1, dtype=torch.float64)
    else:  # the decay has no t axis: the same factor at every step
        total = factors.squeeze(1).to(torch.float64) ** sizes["t"]
    return total.to(dtype)
