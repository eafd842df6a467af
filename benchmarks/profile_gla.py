"""Per-kernel device times of one GLA forward + backward (torch.profiler): ssmc's built-in
(`ssmc.compat.fla.chunk_gla`) and FLA's chunk_gla on the same bf16 inputs, for tuning the
per-key kernels (issue 16).

    python3 benchmarks/profile_gla.py [B T H K V] [--fla-configs 4] [--fwd] [--lowering chunked]
        [--tiles BN_state=32,BP_state=128] [--no-fla]

Inputs as benchmarks/per_key.py draws them. `--fwd`: the forward alone (no grad). `--tiles`:
`ssmc.backends.triton.tiles.ChunkedTile` fields pinned for the ssmc rows (as
benchmarks/debug_chunked.py pins them), to time a tile against the built-in one run by run.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import per_key


def kernel_launches(fn, steps: int = 3) -> list[tuple[str, float]]:
    """(kernel name, device ms) of every launch of `steps` calls, in launch order."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda ev: ev.time_range.start)
    return [(ev.name, ev.device_time_total / 1e3) for ev in events]


def kernel_table(fn, steps: int = 3) -> list[tuple[str, float, int]]:
    """(kernel name, device ms per step, launches per step), slowest first."""
    total, count = defaultdict(float), defaultdict(int)
    for name, ms in kernel_launches(fn, steps):
        total[name] += ms
        count[name] += 1
    return sorted(((k, v / steps, count[k] // steps) for k, v in total.items()),
                  key=lambda r: -r[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[8, 2048, 16, 128, 128])
    ap.add_argument("--fla-configs", type=int, default=4)
    ap.add_argument("--fwd", action="store_true")
    ap.add_argument("--lowering", default="chunked", help="of the ssmc rows")
    ap.add_argument("--tiles", default="", help="pinned tile fields, comma-separated")
    ap.add_argument("--no-fla", action="store_true")
    a = ap.parse_args()
    per_key.LOWERING[0] = a.lowering
    if a.tiles:
        import debug_chunked
        debug_chunked.with_tiles(debug_chunked.parse_variant(a.tiles))
    if a.fla_configs and not a.no_fla:
        import compat_gpu_check
        compat_gpu_check.limit_autotuning(a.fla_configs)
    fla = None if a.no_fla else per_key.fla_op("fla.ops.gla", "chunk_gla")
    data = per_key.inputs(*a.shape, "cuda")
    for name, fn in per_key.rows(fla).items():
        if name == "user":
            continue
        if a.fwd:
            def run(fn=fn):
                with torch.no_grad():
                    fn(**data)
        else:
            run = per_key.fwd_bwd(fn, data)
        table = kernel_table(run)
        print(f"\n{name} {'forward' if a.fwd else 'forward + backward'} {a.shape}: "
              f"{sum(r[1] for r in table):.3f} ms of kernels")
        for kname, ms, n in table[:14]:
            print(f"  {ms:8.3f} ms  x{n:<3d} {kname[:90]}")


if __name__ == "__main__":
    main()
