"""Context parallelism (`ssmc.distributed.context_parallel`) on Mamba-2 SSD: scaling over GPUs,
and the cost of a group of one over the plain op.

    torchrun --nproc-per-node 8 benchmarks/context_parallel.py scaling
    torchrun --nproc-per-node 1 benchmarks/context_parallel.py overhead
    python benchmarks/context_parallel.py overhead     # one process: its own group of one

`scaling` times groups made of the first 1, 2, 4, ... ranks of the launch (the others wait):
strong scaling splits a sequence of each `--seqlen` tokens over the group, weak scaling gives
every rank `--shard-len` tokens. `overhead` times the op and context_parallel(op) over a group
of one on the same inputs. Both time the forward and forward + backward (wall time between
device synchronisations, median of `--iters` after `--warmup`), at b=1, h=16, g=1, n=128,
p=64 in bf16 by default, and report the time spent communicating: the device time of NCCL
kernels in one profiled step (on the CPU, gloo calls' host time), which includes waiting for
the slowest rank. `--device cpu` runs on gloo (with `--dtype fp32` and a small `--seqlen`, to
check the script itself). Option names avoid prefixes of torchrun's own options, which
torchrun would take for itself.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import ssmc
import ssmc.ops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("scaling", "overhead"))
    p.add_argument("--seqlen", type=int, nargs="+", default=[262144, 524288, 1048576],
                   help="whole-sequence lengths (strong scaling, overhead)")
    p.add_argument("--shard-len", type=int, nargs="+", default=[131072, 262144],
                   help="tokens per rank (weak scaling)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dstate", type=int, default=128)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", default="auto", help="ssmc backend (auto, triton, tvm)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if min(args.seqlen + args.shard_len) < 1:
        p.error("--seqlen and --shard-len take positive lengths")
    return args


def init(device: str) -> torch.device:
    """The process group (torchrun's, or a group of one made here) and this rank's device."""
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        else:
            store = f"file://{tempfile.mkdtemp()}/store"
            dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=store,
                                    rank=0, world_size=1)
    if device == "cpu":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def ssd_shard(args, t: int, device, seed: int) -> dict:
    """Mamba-2 inputs for `t` tokens: x, z (b, t, h, p); dt (b, t, h); A, D (h,); B, C (b, t,
    1, n). Parameters A, D are the same on every rank (seed 0)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, p = args.batch, args.heads, args.dstate, args.headdim
    dtype = DTYPES[args.dtype]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    params = torch.Generator().manual_seed(0)
    return dict(x=rnd(b, t, h, p), dt=rnd(b, t, h, scale=0.5),
                A=(-torch.rand(h, generator=params) * 2 - 0.5).to(device, torch.float32),
                B=rnd(b, t, 1, n), C=rnd(b, t, 1, n),
                D=torch.randn(h, generator=params).to(device, torch.float32), z=rnd(b, t, h, p))


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, args, device) -> float:
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def comm_ms(fn, device) -> float:
    """Time in collectives during one call of `fn`: NCCL kernels' device time on a GPU, the
    host time of c10d calls (gloo) on the CPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    if device.type == "cuda":
        return sum(e.device_time_total for e in prof.events()
                   if "nccl" in e.name.lower() and e.device_type.name == "CUDA") / 1e3
    return sum(e.cpu_time_total for e in prof.events() if e.name.startswith("c10d::")) / 1e3


def steps(fn, inputs: dict):
    """(forward, forward + backward) closures over fresh leaves of `inputs`."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}

    def forward():
        with torch.no_grad():
            fn(**leaves)

    def forward_backward():
        fn(**leaves).float().sum().backward()
    return forward, forward_backward


def measure(fn, inputs, args, device) -> dict:
    forward, forward_backward = steps(fn, inputs)
    return dict(fwd=median_ms(forward, args, device), fwd_comm=comm_ms(forward, device),
                fwdbwd=median_ms(forward_backward, args, device),
                fwdbwd_comm=comm_ms(forward_backward, device))


def scaling(args, op, device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= world]
    groups = {k: dist.new_group(list(range(k))) for k in sizes}  # every rank makes every group
    rows = []
    for kind, lengths in (("strong", args.seqlen), ("weak", args.shard_len)):
        for length in lengths:
            for k in sizes:
                shard = length // k if kind == "strong" else length
                if rank < k:
                    inputs = ssd_shard(args, shard, device, seed=rank + 1)
                    cp = ssmc.distributed.context_parallel(op, groups[k])
                    row = measure(cp, inputs, args, device)
                    if rank == 0:
                        rows.append(row)
                        print_row(kind, k, shard, row, rows[-sizes.index(k) - 1])
                dist.barrier()


def print_row(kind: str, ranks: int, shard: int, row: dict, one: dict) -> None:
    """One line; `one` is the same length's row on one rank (the speed-up's reference)."""
    ideal = ranks if kind == "strong" else 1
    print(f"{kind:6s} ranks={ranks:2d} t={shard * ranks:8d} shard={shard:8d} "
          f"fwd {row['fwd']:8.2f} ms (comm {row['fwd_comm']:6.2f}) "
          f"fwd+bwd {row['fwdbwd']:8.2f} ms (comm {row['fwdbwd_comm']:6.2f}) "
          f"speed-up {one['fwdbwd'] / row['fwdbwd']:5.2f} (ideal {ideal})", flush=True)


def overhead(args, op, device) -> None:
    # every rank makes every group (new_group is collective); each times its own group of one
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    cp = ssmc.distributed.context_parallel(op, groups[dist.get_rank()])
    for t in args.seqlen:
        inputs = ssd_shard(args, t, device, seed=1)
        plain, one = measure(op, inputs, args, device), measure(cp, inputs, args, device)
        print(f"t={t:8d} plain fwd {plain['fwd']:8.2f} ms fwd+bwd {plain['fwdbwd']:8.2f} ms | "
              f"group of one fwd {one['fwd']:8.2f} ms ({one['fwd'] / plain['fwd'] - 1:+.1%}) "
              f"fwd+bwd {one['fwdbwd']:8.2f} ms ({one['fwdbwd'] / plain['fwdbwd'] - 1:+.1%}) "
              f"comm {one['fwdbwd_comm']:.3f} ms", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init(args.device)
    op = ssmc.compile(ssmc.ops.mamba2, backend=args.backend)
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"# {args.mode}: b={args.batch} h={args.heads} n={args.dstate} p={args.headdim} "
              f"{args.dtype} on {dist.get_world_size()} x {name} ({dist.get_backend()})",
              flush=True)
    if args.mode == "scaling":
        scaling(args, op, device)
    else:
        overhead(args, op, device)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
