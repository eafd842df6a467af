"""GPU benchmark: the fused matrix-matching loss (`ssmc.mixing_loss`) against materialising
both matrices (`ssmc.attention_matrix` for the SSM's, torch for the teacher's softmax) and
taking the same loss in torch; forward + backward, with peak memory per length.

    python benchmarks/mixing_loss.py [--t 2048 8192 32768] [--dtype bf16] [--reps 5]
                                     [--warmup-ms 1000] [--rep-ms 50]

A Mamba-2-style definition (softplus(dt), exp(dt A) decay, B and C shared by all heads) at
b=1, h=16, n=64, p=64, and a teacher q, k (b, t, h, 64); inputs in `--dtype`, both losses in
fp32. Prints one markdown table for benchmarks/RESULTS.md: median ms of forward + backward
(gradients of every SSM input and of q, k), the host ms of the fused side (the CPU time to
issue one step: where it is near the step's ms, the host bounds the row, not the kernels), the
speed-up (materialised / fused), peak MiB allocated during one forward + backward of each (the
inputs excluded), and the relative difference of the two losses. Both sides are timed alike by
`measure`: a warm-up of at least `--warmup-ms` per side and length, then `--reps` timings of
back-to-back steps; a Triton compilation while timing is reported under the row. The
materialised baseline runs only where its matrices fit (`--max-baseline-t`, default 8192: at
t=32768 one fp32 (h, t, t) matrix is 64 GiB).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import triton

import ssmc
from ssmc import dsl as S

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@ssmc.ssm
def mamba2_like(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"], B: S.In["b t g n"],
                C: S.In["b t g n"]):
    dt = S.softplus(dt)
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C)


def make_inputs(t: int, args, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, n, p, d = 1, args.heads, args.n, args.p, args.d

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    x = dict(x=randn(b, t, h, p), dt=randn(b, t, h) - 1.0,
             A=-torch.rand(h, generator=gen, device="cuda").to(dtype) - 0.5,
             B=randn(b, t, 1, n, scale=n ** -0.5), C=randn(b, t, 1, n, scale=n ** -0.5))
    q, k = randn(b, t, h, d), randn(b, t, args.kv_heads, d)
    return x, q, k


def fused(op, x, q, k):
    return ssmc.mixing_loss(op, *x.values(), q=q, k=k)


def materialised(op, x, q, k):
    """The baseline: both (b, h, t, t) matrices in device memory, the loss in torch."""
    M = ssmc.attention_matrix(op, *x.values())
    T, H = q.shape[1], q.shape[2]
    kh = k.repeat_interleave(H // k.shape[2], 2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), kh.float()) / math.sqrt(q.shape[3])
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    P = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
    return (M - P).square().sum()


def step(loss_fn, op, x, q, k):
    leaves = {n: v.detach().requires_grad_(True) for n, v in x.items()}
    ql, kl = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    loss = loss_fn(op, leaves, ql, kl)
    loss.backward()
    return loss.detach()


class _Compiles:
    """Counts Triton JIT compilations (in-memory cache misses), so a kernel compiled inside the
    timed steps (a specialisation that changes from call to call) shows in the table."""

    def __init__(self):
        self.count = 0
        knobs = getattr(triton, "knobs", None)
        runtime = getattr(knobs, "runtime", None)
        if runtime is not None and runtime.jit_post_compile_hook is None:
            runtime.jit_post_compile_hook = self._hook

    def _hook(self, *args, **kwargs):
        self.count += 1
        return None


COMPILES = _Compiles()


def measure(loss_fn, op, x, q, k, reps: int, warmup_ms: float, rep_ms: float):
    """(median ms of one forward + backward, host ms of one, peak MiB above the inputs, loss,
    kernels compiled while timing). Both sides are measured here alike: steps for at least
    `warmup_ms` first, so that compilation, kernel loading, the allocator's cache and the GPU's
    clocks have settled (a single warm-up step left a short t no time), then `reps` timings of
    back-to-back steps (a training loop's steady state: the host issues the next step while
    the GPU runs this one), each at least `rep_ms` long, one synchronisation per timing. The
    host ms is the CPU time to issue one step onto an idle GPU; where it is near the step's
    ms, the row is bound by the host, not the kernels."""
    loss = step(loss_fn, op, x, q, k)                   # compiles, loads the kernels
    torch.cuda.synchronize()
    steps, begin = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - begin < warmup_ms / 1e3:
        step(loss_fn, op, x, q, k)
        torch.cuda.synchronize()
        steps += 1
    per_step = (time.perf_counter() - begin) * 1e3 / steps
    inner = max(1, math.ceil(rep_ms / per_step))
    compiled = COMPILES.count
    times, host = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step(loss_fn, op, x, q, k)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
        # the host's time alone: one step issued onto an idle GPU (its queue never fills)
        issue = time.perf_counter()
        step(loss_fn, op, x, q, k)
        host.append((time.perf_counter() - issue) * 1e3)
        torch.cuda.synchronize()
    compiled = COMPILES.count - compiled
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(loss_fn, op, x, q, k)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return statistics.median(times), statistics.median(host), peak, float(loss), compiled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16, help="teacher k heads (GQA)")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--p", type=int, default=64)
    parser.add_argument("--d", type=int, default=64, help="teacher head dim")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup-ms", type=float, default=1000.0,
                        help="steps before timing, per side and length")
    parser.add_argument("--rep-ms", type=float, default=50.0,
                        help="least length of one timing (back-to-back steps)")
    parser.add_argument("--max-baseline-t", type=int, default=8192)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    op = ssmc.compile(mamba2_like)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, b=1 h={args.heads} n={args.n} "
          f"p={args.p}, teacher d={args.d} kv heads={args.kv_heads}; forward + backward")
    print()
    print("| t | fused ms | fused host ms | fused peak MiB | materialised ms | "
          "materialised peak MiB | speed-up | rel. loss diff |")
    print("|---|---|---|---|---|---|---|---|")
    for t in args.t:
        x, q, k = make_inputs(t, args, DTYPES[args.dtype])
        timing = (args.reps, args.warmup_ms, args.rep_ms)
        f_ms, f_host, f_mib, f_loss, compiled = measure(fused, op, x, q, k, *timing)
        row = [f"{t}", f"{f_ms:.2f}", f"{f_host:.2f}", f"{f_mib:.0f}"]
        if t <= args.max_baseline_t:
            try:
                m_ms, _, m_mib, m_loss, m_compiled = measure(materialised, op, x, q, k, *timing)
                compiled += m_compiled
                row += [f"{m_ms:.1f}", f"{m_mib:.0f}", f"{m_ms / f_ms:.2f}x",
                        f"{abs(f_loss - m_loss) / abs(m_loss):.1e}"]
            except torch.cuda.OutOfMemoryError:
                row += ["OOM", "-", "-", "-"]
        else:
            row += ["skipped", "-", "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
        if compiled:
            print(f"(t={t}: {compiled} Triton kernel(s) compiled while timing: a specialisation "
                  "changes from step to step)", flush=True)
        del x, q, k
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
