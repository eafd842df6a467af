"""How the shards' states combine along the sequence, and the gradient of that combination.

With a diagonal transition a shard is, seen from outside, an affine map of the state that enters
it: h -> A * h + S, with A its total decay (`decay.total_decay`) and S its final state from a
zero start. Folding these maps in the order the recurrence runs through the shards gives every
shard's entering state and the state after the whole sequence; nothing else about a shard
matters to the others, which is why the ranks exchange (A, S) and not activations.

Pure tensor arithmetic on the gathered lists (no communication), so it is checked on one
process; `exchange.py` runs it on every rank. The lists are short (one entry per rank).
"""
from __future__ import annotations

import torch


def fold(contributions: list[torch.Tensor], decays: list[torch.Tensor | None],
         entering: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """contributions[k] (S) and decays[k] (A, broadcastable to S; None: no decay) of the shards
    in processing order; `entering`: the state entering the first shard (None: zero).
    Returns the state entering each shard and the final state: h_0 = entering,
    h_{k+1} = A_k * h_k + S_k."""
    h = torch.zeros_like(contributions[0]) if entering is None else entering
    states = []
    for s, a in zip(contributions, decays):
        states.append(h)
        h = (h if a is None else a * h) + s
    return states, h


def fold_backward(decays: list[torch.Tensor | None], states: list[torch.Tensor],
                  grad_states: list[torch.Tensor], grad_final: torch.Tensor
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """The gradient of `fold`, run from the last shard to the first (a later shard's state
    gradient flows into the earlier ones). `states` are fold's entering states, grad_states[k]
    the loss's gradient w.r.t. state k through shard k's own op, grad_final w.r.t. the final
    state. Returns the gradients w.r.t. every contribution, every decay (reduced to its shape;
    None where it is None) and the state entering the first shard."""
    g = grad_final  # d loss / d (the state leaving shard k)
    grad_contributions, grad_decays = [], []
    for a, h, g_own in reversed(list(zip(decays, states, grad_states))):
        grad_contributions.append(g)
        grad_decays.append(None if a is None else (g * h).sum_to_size(a.shape))
        g = (g if a is None else a * g) + g_own
    return grad_contributions[::-1], grad_decays[::-1], g
