"""Replay mamba_ssm's own `selective_state_update` batch-index test cases, in the order pytest
runs them and in one process, through ssmc's shim, and look hard at every case whose output
misses the test's tolerance (issue 17: in runs of the original file on the GPU some of these
cases failed at dstate 32, a different set each run, while run alone they passed).

    python3 benchmarks/step_sequence_check.py [--rounds 2] [--dstate 32] [--all] [--warps W]

Each case draws its inputs as the test does (seed 0) and compares the shim's output with the
test's own reference (computed in the input dtype, as the test does). For a case that misses,
it also reports the output of a float64 reference, of mamba_ssm's kernel and of the shim again,
each on the state as it was before the call, and where the worst elements are: whether the
shim's first output or the test's reference is off, and whether the shim's output repeats.
`--all` prints every case. `--warps W` runs every step tile with W warps (4 gives the tiles
before the step kernel's warps were capped at the tile's 32-value rows: Mamba-1's n = 32 steps
then ran a [32, 2] tile over 4 warps). Every miss also reports whether the shim's output
changed between its two calls on the same inputs. Needs mamba_ssm (its kernel and reference)
and einops importable.
"""
from __future__ import annotations

import argparse
import itertools

import torch
from einops import repeat
from mamba_ssm.ops.triton.selective_state_update import (
    selective_state_update as mamba_update, selective_state_update_ref as reference)

from ssmc.backends.triton.lowerings import step as step_lowering
from ssmc.compat.mamba_ssm import selective_state_update as shim_update

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cases(dstates):
    """(name, heads, dim, dstate, ngroups, has_z, tie, dtype) in pytest's order: the file's
    with_batch_indices cases, then its with_heads_with_batch_indices ones."""
    for dim, n, has_z, dt in itertools.product((2048, 2064, 4096), dstates, (False, True),
                                               DTYPES):
        yield f"batch_indices[{dim}-{n}-{has_z}-{dt}]", False, dim, n, 1, has_z, False, dt
    for dim, n, g, tie, has_z, dt in itertools.product((2048, 4096), dstates, (1, 2, 4),
                                                       (False, True), (False, True), DTYPES):
        yield (f"heads_batch_indices[{dim}-{n}-{g}-{tie}-{has_z}-{dt}]", True, dim, n, g,
               has_z, tie, dt)


def tolerance(heads: bool, dtype) -> tuple[float, float]:
    if dtype == torch.float32:
        return 3e-4, 1e-3
    if dtype == torch.bfloat16:
        return (1e-1, 1e-1) if heads else (6e-2, 6e-2)
    return (5e-3, 3e-2) if heads else (5e-3, 1e-2)


def draw(heads, dim, n, g, has_z, tie, dtype, dev="cuda"):
    """The test's inputs, in its order of draws."""
    torch.random.manual_seed(0)
    batch, total = 16, 160
    if not heads:
        state = torch.randn(total, dim, n, dtype=dtype, device=dev)
        idx = torch.randperm(total)[:batch].to(dtype=torch.int32, device=dev)
        x = torch.randn(batch, dim, device=dev, dtype=dtype)
        dt = torch.randn(batch, dim, device=dev, dtype=dtype)
        dt_bias = torch.rand(dim, device=dev) - 4.0
        A = -torch.rand(dim, n, device=dev) - 1.0
        B = torch.randn(batch, n, device=dev)
        C = torch.randn(batch, n, device=dev)
        D = torch.randn(dim, device=dev)
    else:
        p = 64
        h = dim // p
        state = torch.randn(total, h, p, n, dtype=dtype, device=dev)
        idx = torch.randperm(total)[:batch].to(dtype=torch.int32, device=dev)
        x = torch.randn(batch, h, p, device=dev, dtype=dtype)
        if not tie:
            dt = torch.randn(batch, h, p, device=dev, dtype=dtype)
            dt_bias = torch.rand(h, p, device=dev) - 4.0
            A = -torch.rand(h, p, n, device=dev) - 1.0
            D = torch.randn(h, p, device=dev)
        else:
            dt = repeat(torch.randn(batch, h, device=dev, dtype=dtype), "b h -> b h p", p=p)
            dt_bias = repeat(torch.rand(h, device=dev) - 4.0, "h -> h p", p=p)
            A = repeat(-torch.rand(h, device=dev) - 1.0, "h -> h p n", p=p, n=n)
            D = repeat(torch.randn(h, device=dev), "h -> h p", p=p)
        B = torch.randn(batch, g, n, device=dev)
        C = torch.randn(batch, g, n, device=dev)
    z = torch.randn_like(x) if has_z else None
    return state, idx, dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def call(fn, state, idx, a):
    return fn(state, a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"],
              dt_bias=a["dt_bias"], dt_softplus=True, state_batch_indices=idx)


def run_case(case, show_all: bool) -> bool:
    name, heads, dim, n, g, has_z, tie, dtype = case
    rtol, atol = tolerance(heads, dtype)
    state, idx, a = draw(heads, dim, n, g, has_z, tie, dtype)
    rows = idx.long()
    state_ref = state[rows].clone()
    state_before = state.clone()
    out = call(shim_update, state, idx, a)
    out_ref = reference(state_ref, a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"],
                        dt_bias=a["dt_bias"], dt_softplus=True)
    ok = bool(torch.allclose(out, out_ref, rtol=rtol, atol=atol))
    if ok and not show_all:
        return ok
    a64 = {k: None if v is None else v.double() for k, v in a.items()}
    out64 = reference(state_before[rows].double(), a64["x"], a64["dt"], a64["A"], a64["B"],
                      a64["C"], D=a64["D"], z=a64["z"], dt_bias=a64["dt_bias"],
                      dt_softplus=True)
    out_mamba = call(mamba_update, state_before.clone(), idx, a)
    out_again = call(shim_update, state_before.clone(), idx, a)
    err = {k: (v.double() - out64).abs() for k, v in
           (("shim", out), ("test ref", out_ref), ("mamba", out_mamba), ("shim again", out_again))}
    line = "  ".join(f"{k} {v.max().item():.3e}" for k, v in err.items())
    repeats = "same" if torch.equal(out, out_again) else "CHANGED"
    print(f"{'ok  ' if ok else 'MISS'} {name}: max |out - float64|: {line}; shim's two outputs "
          f"{repeats}", flush=True)
    if not ok:
        far = (out.double() - out_ref.double()).abs() > atol + rtol * out_ref.double().abs()
        where = torch.nonzero(far)[:4]
        for pos in where.tolist():
            t = tuple(pos)
            print(f"     at {t}: shim {out[t].item():.6g} again {out_again[t].item():.6g} "
                  f"mamba {out_mamba[t].item():.6g} test ref {out_ref[t].item():.6g} "
                  f"float64 {out64[t].item():.6g}  ({int(far.sum())} elements miss)")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dstate", type=int, nargs="*", default=[16, 32, 64])
    ap.add_argument("--all", action="store_true", help="print every case, not only misses")
    ap.add_argument("--warps", type=int, help="every step tile's warps")
    a = ap.parse_args()
    if a.warps:
        blocks = step_lowering.step_blocks

        def with_warps(N, P, state_bytes, tile=None):
            return dict(blocks(N, P, state_bytes, tile), num_warps=a.warps)
        step_lowering.step_blocks = with_warps
    for r in range(a.rounds):
        misses = sum(not run_case(c, a.all) for c in cases(a.dstate))
        print(f"round {r + 1}: {misses} of {len(list(cases(a.dstate)))} cases missed", flush=True)


if __name__ == "__main__":
    main()
