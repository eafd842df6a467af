"""The collective of context parallelism, as an autograd Function: one all-gather forward, one
all-gather backward, each of a few (b, h, n, p)-sized tensors per rank whatever the shard length.

Forward, every rank contributes one flat buffer: its flags (does this rank need gradients, does
it return the final state), its shard's final state from a zero start (`contribution`), its
total decay, and on rank 0 the initial state it did not fold into its own run. Each rank folds
the gathered contributions (`combine.fold`) in the order each direction runs through the ranks
and keeps the state entering its own shard, plus the state after the whole sequence.

Backward, every rank contributes its gradients w.r.t. its entering state and the final state;
each rank runs the fold's gradient over all ranks (a later shard's state gradient flows into
the earlier ones) and keeps its own share. Redoing the short fold on every rank is cheaper than
a second round of messages.

The backward is collective, so it must run on every rank or on none: the flags are checked
after the gather and a disagreement raises on every rank alike instead of hanging one of them.
The Function's outputs require gradients wherever one of its inputs does; the caller passes the
rank's differentiable inputs as `anchors` so that holds on every rank that needs gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ArgumentError, UnsupportedError
from .combine import fold, fold_backward

#: the all-gather into one flat tensor (named all_gather_into_tensor before torch 2.13; neither
#: exists in a torch built without distributed support, where `context` refuses every call)
_gather_into = (getattr(dist, "all_gather_single", None)
                or getattr(dist, "all_gather_into_tensor", None))

#: one value whose bits say: needs gradients (1), returns the final state (2). Made on the
#: device by a fill, not copied from the host, which would synchronise with the device.
_FLAGS = 1


@dataclass(frozen=True)
class Spec:
    """What one rank knows about a call. The payload's layout follows from it, so it agrees
    across ranks whenever their non-`t` sizes do."""

    fn: str                                # "context_parallel(ssd)", for messages
    group: object                          # the process group (None: the default one)
    rank: int
    world: int
    reverse: tuple[bool, ...]              # per direction of the op: starts at the last rank
    state_shape: tuple[int, ...]           # (b, h, n, p)
    decay_shape: tuple[int, ...] | None    # the total decay's shape; None without a decay
    carries_initial: bool                  # the payload has a slot for rank 0's initial state
    needs_grad: bool
    return_final_state: bool

    def order(self, direction: int) -> list[int]:
        """The ranks in the order the direction's recurrence visits their shards."""
        ranks = list(range(self.world))
        return ranks[::-1] if self.reverse[direction] else ranks

    @property
    def states_shape(self) -> tuple[int, ...]:
        return (len(self.reverse),) + self.state_shape


def _gather(flat: torch.Tensor, spec: Spec) -> torch.Tensor:
    out = flat.new_empty(spec.world * flat.numel())
    _gather_into(out, flat.contiguous(), group=spec.group)
    return out.view(spec.world, flat.numel())


def _split(gathered: torch.Tensor, spec: Spec):
    """Per rank: flags, contribution (directions, b, h, n, p), total decay (or None); and
    rank 0's initial state (or None)."""
    n_states = math.prod(spec.states_shape)
    sizes = [_FLAGS, n_states]
    if spec.decay_shape is not None:
        sizes.append(math.prod(spec.decay_shape))
    if spec.carries_initial:
        sizes.append(n_states)
    parts = list(torch.split(gathered, sizes, dim=1))
    flags, contributions = parts[0], parts[1].reshape(spec.world, *spec.states_shape)
    decays = [None] * spec.world
    if spec.decay_shape is not None:
        decays = list(parts[2].reshape(spec.world, *spec.decay_shape))
    initial = parts[-1][0].view(spec.states_shape) if spec.carries_initial else None
    return flags, list(contributions), decays, initial


def _check_agreement(flags: torch.Tensor, spec: Spec) -> None:
    """Raise on every rank alike when the ranks disagree on a flag the backward depends on.
    Reading the flags synchronises the host with the device once per call (a group of one
    never gets here: it runs the op alone)."""
    host = [int(f) for f in flags.reshape(-1).tolist()]
    for bit, (what, fix, error) in zip((1, 2), (
            ("need gradients", "every rank's shard must require gradients (the backward is "
             "collective), or none", UnsupportedError),
            ("pass return_final_state=True", "pass the same value on every rank",
             ArgumentError))):
        yes = [r for r, f in enumerate(host) if f & bit]
        if yes and len(yes) < spec.world:
            no = [r for r, f in enumerate(host) if not f & bit]
            raise error(f"{spec.fn}: ranks {yes} {what} but ranks {no} do not; {fix}")


class StateExchange(torch.autograd.Function):
    """apply(spec, contribution, decay, initial, passthrough, *anchors)
    -> (entering state, final state, passthrough), states shaped (directions, b, h, n, p).

    contribution: this rank's shard's final state from a zero start (rank 0's may include its
    own initial state, then `initial` is None); decay: its total decay (None without one);
    initial: rank 0's initial state not folded into its contribution (else None);
    passthrough: returned as is (a single-run rank's output, so that its loss reaches this
    Function's backward); anchors: tensors only to make the outputs require gradients."""

    @staticmethod
    def forward(ctx, spec: Spec, contribution, decay, initial, passthrough, *anchors):
        flags = int(spec.needs_grad) + 2 * int(spec.return_final_state)
        pieces = [contribution.new_full((_FLAGS,), flags), contribution.reshape(-1)]
        if spec.decay_shape is not None:
            pieces.append(decay.reshape(-1))
        if spec.carries_initial:
            pieces.append(contribution.new_zeros(contribution.numel()) if initial is None
                          else initial.to(contribution.dtype).reshape(-1))
        flags, contributions, decays, initial_all = _split(_gather(torch.cat(pieces), spec), spec)
        _check_agreement(flags, spec)
        entering, finals, states = [], [], []
        for d in range(len(spec.reverse)):
            order = spec.order(d)
            s, final = fold([contributions[r][d] for r in order], [decays[r] for r in order],
                            None if initial_all is None else initial_all[d])
            entering.append(s[order.index(spec.rank)])
            finals.append(final)
            states.append(s)
        ctx.spec, ctx.decays, ctx.states = spec, decays, states
        ctx.num_anchors = len(anchors)
        ctx.given = [x is not None for x in (contribution, decay, initial, passthrough)]
        return torch.stack(entering), torch.stack(finals), passthrough

    @staticmethod
    def backward(ctx, grad_entering, grad_final, grad_passthrough):
        spec = ctx.spec
        zeros = ctx.states[0][0].new_zeros(spec.states_shape)
        grad_entering = zeros if grad_entering is None else grad_entering
        grad_final = zeros if grad_final is None else grad_final
        flat = torch.cat([grad_entering.reshape(-1), grad_final.reshape(-1)])
        gathered = _gather(flat, spec).view(spec.world, 2, *spec.states_shape)
        grad_entering_all, grad_final_sum = gathered[:, 0], gathered[:, 1].sum(0)
        grad_contribution, grad_decay, grad_initial = [], None, []
        for d, states in enumerate(ctx.states):
            order = spec.order(d)
            g_s, g_a, g_h = fold_backward([ctx.decays[r] for r in order], states,
                                          [grad_entering_all[r, d] for r in order],
                                          grad_final_sum[d])
            k = order.index(spec.rank)
            grad_contribution.append(g_s[k])
            if g_a[k] is not None:
                grad_decay = g_a[k] if grad_decay is None else grad_decay + g_a[k]
            grad_initial.append(g_h)
        grads = (torch.stack(grad_contribution), grad_decay, torch.stack(grad_initial),
                 grad_passthrough)
        grads = tuple(g if given else None for g, given in zip(grads, ctx.given))
        return (None,) + grads + (None,) * ctx.num_anchors
