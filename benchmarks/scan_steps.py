"""GPU benchmark: the backward's checkpointing forward a step at a time, each block's inputs
loaded a block ahead (`ssmc_scan_ckpt_fwd_steps`, chosen with SSMC_SCAN_STEPS=1), against the
loop that loads each step's inputs in the step (SSMC_SCAN_STEPS=0), on VMamba's cross2d
selective scan (b=32, d=192 as h=6 p=32, bf16), in one process, alternated. (The forward's own
step kernel lost to the loop by 21-24% on an H100 and is gone: benchmarks/RESULTS.md.)

    python benchmarks/scan_steps.py [--profile] [--reps 15]
    SSMC_STEPS_UNROLL=4 python benchmarks/scan_steps.py      # steps per unrolled block

Each line: the median ms of a forward + backward with the gradients of every input for both
kernels over two alternated rounds, and the relative L2 difference of the gradients.
--profile adds the kernels' device time per training step for both. SSMC_STEPS_UNROLL is read
when the kernels are rendered: one value a process.
"""
from __future__ import annotations

import argparse
import os

import torch

import cross2d
from profile_gla import kernel_table

CASES = ((56, 56, 16), (28, 28, 16))


def use_steps(on: bool) -> None:
    os.environ["SSMC_SCAN_STEPS"] = "1" if on else "0"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    op = cross2d.ssmc.compile(cross2d.definition("full", "cross2d"))
    unroll = os.environ.get("SSMC_STEPS_UNROLL", "default")
    for H, W, n in CASES:
        v = cross2d.Case("v", "full", 32, H, W, 6, 32, n, torch.bfloat16, "cuda").v
        inputs = [v["x"], v["dt"], v["A"], v["B"], v["C"], v["Ds"].sum(0), v["dt_bias"]]
        inputs = [x.detach().requires_grad_() for x in inputs]

        def run():
            for x in inputs:
                x.grad = None
            y = op(*inputs, grid=(H, W))
            y.backward(torch.ones_like(y))
            return torch.cat([x.grad.float().flatten() for x in inputs])
        outs, times = {}, {False: [], True: []}
        for on in (False, True):
            use_steps(on)
            outs[on] = run()
        for _ in range(2):
            for on in (False, True):
                use_steps(on)
                times[on].append(round(cross2d.time_ms(run, torch.device("cuda"), args.reps), 3))
        diff = float((outs[True] - outs[False]).norm() / outs[False].norm())
        print(f"forward + backward {H}x{W} n={n} (unroll {unroll}): loop {times[False]} ms, "
              f"steps {times[True]} ms, relative difference {diff:.2e}", flush=True)
        if args.profile:
            for on in (False, True):
                use_steps(on)
                rows = kernel_table(run, steps=2)
                print(f"  {'steps' if on else 'loop'}: " + "; ".join(
                    f"{name[:40]} {ms:.3f} (x{count})" for name, ms, count in rows[:10]),
                    flush=True)


if __name__ == "__main__":
    main()
