"""`context_parallel(op, group)`: one sequence split along `t` over the ranks of a process group.

Each rank holds a contiguous shard (rank order = sequence order; lengths may differ, a shard may
be empty). A rank runs the op on its shard twice: once from a zero start, for the shard's final
state alone (`CompiledOp.final_state`: the chunked lowering's state pass, no output pass), then,
after the exchange (`exchange.StateExchange`) has told it the state entering its
shard, once more from that state, for its output. A rank whose entering state is known before
the exchange (rank 0 of a forward op, which holds `initial_state`; every rank of a group of
one) runs once, from that state, and contributes its final state with the initial state folded
in. A rank whose final state nobody needs (the last one a direction visits, without
`return_final_state`) skips the first run. Autograd goes through the op's own backward on both
runs and through the exchange, whose backward sends the state gradients to earlier ranks.

Inputs without `t` (A, D, biases) are the same on every rank; each rank's gradient for them is
its shard's share, so summing them over the ranks (as data parallelism does) gives the
gradient of the whole sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..api import CompiledOp, Definition
from ..api import compile as compile_op
from ..errors import ArgumentError, ConfigError, DeviceError, UnsupportedError
from ..ir import Direction
from ..validate import Bound, bind
from .decay import total_decay
from .exchange import Spec, StateExchange


def context_parallel(op, group=None) -> "ContextParallel":
    """A callable with `op`'s signature that runs one sequence sharded along `t` over the ranks
    of `group` (default: the default process group); see `ContextParallel`. `op` is a compiled
    op (a definition is compiled with the default backend and lowering)."""
    if isinstance(op, Definition):
        op = compile_op(op)
    if not isinstance(op, CompiledOp):
        raise ArgumentError(f"context_parallel expects an op from ssmc.compile (or an @ssmc.ssm "
                            f"definition), got {type(op).__name__}")
    return ContextParallel(op, group)


class ContextParallel:
    """`op` over one sequence sharded along `t`: call it on every rank of the group with that
    rank's shard of every input that has `t` (and the same values of the others).

    `initial_state` is read on rank 0 and ignored elsewhere; with `return_final_state=True`
    every rank returns the state after the whole sequence (for a reverse direction, after its
    first step). Every rank returns its shard of the output. Forward, reverse and bidirectional
    definitions; `cu_seqlens` is refused. Under autograd the backward is collective: every rank
    must run it (all ranks' shards require gradients, or none do)."""

    def __init__(self, op: CompiledOp, group=None):
        self.op = op
        self.group = group
        self.fn = f"context_parallel({op.program.name})"

    def __repr__(self):
        return f"<ssmc context_parallel {self.op!r}>"

    def _rank_and_world(self) -> tuple[int, int]:
        if not dist.is_available():
            raise ConfigError(f"{self.fn}: this build of torch has no torch.distributed")
        if not dist.is_initialized():
            raise ConfigError(f"{self.fn}: torch.distributed is not initialised; call "
                              "torch.distributed.init_process_group first")
        rank = dist.get_rank(self.group)
        if rank < 0:
            raise ConfigError(f"{self.fn}: this process (global rank {dist.get_rank()}) is not "
                              "a member of 'group'")
        return rank, dist.get_world_size(self.group)

    def _check_device(self, bound: Bound) -> None:
        backend = str(dist.get_backend(self.group))
        if backend == "nccl" and bound.device.type != "cuda":
            raise DeviceError(f"{self.fn}: the group's backend is NCCL but the inputs are on "
                              f"{bound.device}; NCCL needs CUDA tensors (use gloo on the CPU)")

    def __call__(self, *args, **kwargs):
        if self.op.program.on_grid:
            raise UnsupportedError(f"{self.fn}: a cross2d recurrence is not supported: its "
                                   "column orders cross every shard of a row-major sequence")
        if kwargs.get("cu_seqlens") is not None:
            raise UnsupportedError(f"{self.fn}: 'cu_seqlens' is not supported: the shards are "
                                   "one sequence (b sequences side by side are fine)")
        rank, world = self._rank_and_world()
        if rank != 0:  # read on the first rank only
            kwargs = {k: v for k, v in kwargs.items() if k != "initial_state"}
        bound = bind(self.op.program, args, kwargs)  # every local check, before any launch
        self._check_device(bound)
        if world == 1:
            # the whole sequence on this rank: the op itself, with nothing to exchange (with
            # the exchange, a group of one's forward measured 0.3-8.2% over the op's, H100)
            return self.op(**bound.tensors, initial_state=bound.initial_state,
                           return_final_state=bound.return_final_state)
        return _run(self.op, bound, self._spec(bound, rank, world))

    def _spec(self, bound: Bound, rank: int, world: int) -> Spec:
        program = self.op.program
        s = bound.sizes
        decay = program.recurrence.decay
        decay_shape = None
        if decay is not None:
            present = set(decay.axes) | ({"h"} if "g" in decay.axes else set())
            decay_shape = tuple(s[a] if a in present else 1 for a in "bhnp")
        reverse = tuple(d is Direction.REVERSE for d in program.recurrence.directions)
        tensors = list(bound.tensors.values()) + [bound.initial_state]
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors)
        return Spec(fn=self.fn, group=self.group, rank=rank, world=world, reverse=reverse,
                    state_shape=(s["b"], s["h"], s["n"], s["p"]), decay_shape=decay_shape,
                    carries_initial=any(reverse), needs_grad=needs_grad,
                    return_final_state=bound.return_final_state)


def _run(op: CompiledOp, bound: Bound, spec: Spec):
    """One rank's share of the call: the first run (or the only one), the exchange, the run
    from the entering state."""
    # rank 0 of a forward op knows its entering state already
    single = spec.rank == 0 and spec.reverse == (False,)
    last = all(spec.rank == spec.order(d)[-1] for d in range(len(spec.reverse)))
    needed = spec.return_final_state or not last  # does anyone read this shard's final state?
    h0 = bound.initial_state
    s = bound.sizes
    empty = s["t"] == 0
    out, final = None, None
    if empty:  # the identity map: nothing to run (and no kernel sees empty inputs)
        out = torch.zeros((s["b"], 0, s["h"], s["p"]), dtype=bound.dtype, device=bound.device)
        final = h0 if single else None
    elif single:
        out = op(**bound.tensors, initial_state=h0, return_final_state=needed)
        out, final = out if needed else (out, None)
    elif needed:   # the state pass alone where the backend has one (`final_state`)
        final = op.final_state(**bound.tensors)
    dtype = torch.float64 if bound.dtype == torch.float64 else torch.float32
    contribution = (torch.zeros(spec.states_shape, dtype=dtype, device=bound.device)
                    if final is None else final.to(dtype).reshape(spec.states_shape))
    decay = None
    if spec.decay_shape is not None:
        # a single run's entering state is zero in the fold, so its decay multiplies nothing
        decay = (total_decay(op.program, bound.tensors, bound.sizes, dtype)
                 if needed and not single
                 else torch.ones(spec.decay_shape, dtype=dtype, device=bound.device))
    initial = None
    if spec.carries_initial and not single and h0 is not None:
        initial = h0.reshape(spec.states_shape)
    anchors = [t for t in list(bound.tensors.values()) + [h0]
               if t is not None and t.requires_grad] if spec.needs_grad else []
    entering, final, out = StateExchange.apply(spec, contribution, decay, initial, out, *anchors)
    state_shape = spec.states_shape if len(spec.reverse) > 1 else spec.state_shape
    if not (single or empty):
        out = op(**bound.tensors, initial_state=entering.reshape(state_shape))
    if bound.return_final_state:
        return out, final.reshape(state_shape)
    return out
