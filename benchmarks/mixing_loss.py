"""GPU benchmark: the fused matrix-matching loss (`ssmc.mixing_loss`) against materialising
both matrices (`ssmc.attention_matrix` for the SSM's, torch for the teacher's softmax) and
taking the same loss in torch; forward + backward, with peak memory per length.

    python benchmarks/mixing_loss.py [--t 2048 8192 32768] [--dtype bf16] [--reps 5]

A Mamba-2-style definition (softplus(dt), exp(dt A) decay, B and C shared by all heads) at
b=1, h=16, n=64, p=64, and a teacher q, k (b, t, h, 64); inputs in `--dtype`, both losses in
fp32. Prints one markdown table for benchmarks/RESULTS.md: median ms of forward + backward
(gradients of every SSM input and of q, k), the speed-up (materialised / fused), peak MiB
allocated during one forward + backward of each (the inputs excluded), and the relative
difference of the two losses. The materialised baseline runs only where its matrices fit
(`--max-baseline-t`, default 8192: at t=32768 one fp32 (h, t, t) matrix is 64 GiB).
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

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


def measure(loss_fn, op, x, q, k, reps: int):
    """(median ms of forward + backward, peak MiB above the inputs, loss)."""
    loss = step(loss_fn, op, x, q, k)                   # warm-up: compile, load kernels
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(loss_fn, op, x, q, k)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(loss_fn, op, x, q, k)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return statistics.median(times), peak, float(loss)


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
    parser.add_argument("--max-baseline-t", type=int, default=8192)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    op = ssmc.compile(mamba2_like)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, b=1 h={args.heads} n={args.n} "
          f"p={args.p}, teacher d={args.d} kv heads={args.kv_heads}; forward + backward")
    print()
    print("| t | fused ms | fused peak MiB | materialised ms | materialised peak MiB | "
          "speed-up | rel. loss diff |")
    print("|---|---|---|---|---|---|---|")
    for t in args.t:
        x, q, k = make_inputs(t, args, DTYPES[args.dtype])
        f_ms, f_mib, f_loss = measure(fused, op, x, q, k, args.reps)
        row = [f"{t}", f"{f_ms:.1f}", f"{f_mib:.0f}"]
        if t <= args.max_baseline_t:
            try:
                m_ms, m_mib, m_loss = measure(materialised, op, x, q, k, args.reps)
                row += [f"{m_ms:.1f}", f"{m_mib:.0f}", f"{m_ms / f_ms:.2f}x",
                        f"{abs(f_loss - m_loss) / abs(m_loss):.1e}"]
            except torch.cuda.OutOfMemoryError:
                row += ["OOM", "-", "-", "-"]
        else:
            row += ["skipped", "-", "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
        del x, q, k
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
