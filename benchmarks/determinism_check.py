"""Run ssmc's kernels many times on the same inputs and count the calls whose outputs or
gradients differ bit for bit from the first call's. A Triton sum over warps that hold copies of
one another's values gave the step kernel a different output about once in 100-200 calls on an
H100 (RESULTS.md); the scalar-decay chunked kernels have 1-D sums over a chunk's steps on such
layouts too (`tests.helpers.reductions_over_copied_warps`), with no change seen so far.

    python3 benchmarks/determinism_check.py [--calls 200] [--only ssd,gla,step]
    TRITON_INTERPRET=1 python3 benchmarks/determinism_check.py --device cpu --tiny --calls 3

Rows: `ssd` (Mamba-2 with D, z, dt_bias and softplus, chunked, forward + backward, bf16, b=2
t=2048 h=16 p=64 n=128), `gla` (per-key decays, chunked, forward + backward, bf16, B=2 T=1024
H=8 K=V=128) and `step` (the mamba_ssm shim's per-channel step with cache slots, fp32, n = 16,
32, 64). The kernels make no atomic sums on these paths, so any difference is a fault.
`--tiny` (small shapes) with `--device cpu` checks the script itself under the interpreter.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ssmc.compat.fla import chunk_gla
from ssmc.compat.mamba_ssm import selective_state_update
from ssmc.ops.ssd import ssd


def differing_calls(run, calls: int) -> int:
    """How many of `calls` runs of `run()` (a tuple of tensors) differ from the first run."""
    first = [t.clone() for t in run()]
    changed = 0
    for _ in range(calls - 1):
        changed += any(not torch.equal(a, b) for a, b in zip(first, run()))
    return changed


def normal(gen):
    """Standard normal draws of any shape on `gen`'s device."""
    return lambda *shape: torch.randn(*shape, device=gen.device, generator=gen)


def ssd_run(gen, tiny):
    b, t, h, p, n = (1, 70, 2, 8, 16) if tiny else (2, 2048, 16, 64, 128)
    r = normal(gen)
    leaves = [r(b, t, h, p).bfloat16(), (r(b, t, h) * 0.5 - 1).bfloat16(),
              -torch.exp(r(h) * 0.5), r(b, t, 1, n).bfloat16(), r(b, t, 1, n).bfloat16(),
              r(h), r(b, t, h, p).bfloat16(), r(h) * 0.1]
    leaves = [v.requires_grad_(True) for v in leaves]
    grad = r(b, t, h, p).bfloat16()

    def run():
        x, dt, A, B, C, D, z, dt_bias = leaves
        y = ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                backend="triton", lowering="chunked")
        return (y.detach(), *torch.autograd.grad(y, leaves, grad))
    return run


def gla_run(gen, tiny):
    B, T, H, K, V = (1, 70, 2, 16, 16) if tiny else (2, 1024, 8, 128, 128)
    r = normal(gen)
    leaves = [(r(B, T, H, K) * K ** -0.5).bfloat16(), (r(B, T, H, K) * K ** -0.5).bfloat16(),
              r(B, T, H, V).bfloat16(), F.logsigmoid(4 * r(B, T, H, K))]
    leaves = [v.requires_grad_(True) for v in leaves]
    grad = r(B, T, H, V).bfloat16()

    def run():
        o = chunk_gla(*leaves, backend="triton", lowering="chunked")[0]
        return (o.detach(), *torch.autograd.grad(o, leaves, grad))
    return run


def step_run(gen, tiny, n):
    b, dim, slots = (2, 8, 5) if tiny else (16, 4096, 160)
    dev = gen.device
    r = normal(gen)
    args = dict(x=r(b, dim), dt=r(b, dim), A=-torch.rand(dim, n, device=dev, generator=gen) - 1,
                B=r(b, n), C=r(b, n), D=r(dim), z=r(b, dim), dt_bias=r(dim) * 0.1 - 4)
    cache = r(slots, dim, n)
    index = torch.randperm(slots, device=dev, generator=gen)[:b].to(torch.int32)

    def run():
        state = cache.clone()
        y = selective_state_update(state, dt_softplus=True, state_batch_indices=index,
                                   backend="triton", **args)
        return y, state
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--only", default="ssd,gla,step")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    gen = torch.Generator(device=a.device).manual_seed(0)
    rows = {"ssd": [("ssd fwd+bwd", ssd_run)], "gla": [("gla fwd+bwd", gla_run)],
            "step": [(f"step n={n}", lambda g, tiny, n=n: step_run(g, tiny, n))
                     for n in (16, 32, 64)]}
    where = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    print(f"{where}: calls whose results differ from the first call's")
    for key in a.only.split(","):
        for name, make in rows[key]:
            changed = differing_calls(make(gen, a.tiny), a.calls)
            print(f"  {name}: {changed} of {a.calls - 1}", flush=True)


if __name__ == "__main__":
    main()
