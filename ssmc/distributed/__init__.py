"""Context parallelism: one sequence split along `t` over the ranks of a torch.distributed
process group (NCCL on GPUs, gloo on CPUs).

    cp = ssmc.distributed.context_parallel(op)        # op from ssmc.compile
    y_shard = cp(x_shard, dt_shard, A, B_shard, C_shard, D, z_shard)

A shard affects the next only through its final state and its total decay, so the ranks
exchange those (one all-gather of a few (b, h, n, p)-sized tensors, whatever the shard length)
and each runs the op from the state entering its shard. One job per module: `decay` (a shard's
total decay), `combine` (folding the shards' states and its gradient), `exchange` (the
collective as an autograd Function), `context` (the per-rank call).
"""
from .context import ContextParallel, context_parallel

__all__ = ["context_parallel", "ContextParallel"]
