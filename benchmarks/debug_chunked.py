"""A tile sweep of the chunked lowering on the GPU: each variant's tiles over the built-in ones,
timed on the same inputs, its outputs compared with the built-in tiles' (a variant that changes
the summation order moves them by bf16 rounding, ~1e-3; a wrong one by far more).

    python3 benchmarks/debug_chunked.py fwd   --shapes 8x4096,2x16384 \\
        --variants "stages_state=3;BP_state=32,stages_state=3"
    python3 benchmarks/debug_chunked.py train --variants "WARPS_bwd=4;WARPS_bwd=4,BK_bwd=128"

`ssmc.ops.ssd` with D, z, dt_bias and softplus (bf16, h=80 p=64 n=128 g=1), forward alone or
forward + backward of every input. A variant is comma-separated `name=value` pairs of
`ssmc.backends.triton.tiles.ChunkedTile` fields; the backward's (`*_bwd`) and the state pass's
warps, stages and value block reach the backward as `chunked_bwd_launch.tiles` reads them.
Variants are separated by `;`; the built-in tiles always run first.
"""
import argparse
import dataclasses

import torch
import triton.testing

from ssmc.backends.triton.lowerings import chunked_bwd_launch as backward
from ssmc.backends.triton.lowerings import chunked_launch as forward
from ssmc.backends.triton.tiles import ChunkedTile
from ssmc.ops import ssd

H, P, N = 80, 64, 128


def parse_variant(text: str) -> dict:
    pins = dict(kv.split("=") for kv in text.split(",") if kv)
    fields = ChunkedTile.__dataclass_fields__
    unknown = sorted(set(pins) - set(fields))
    if unknown:
        raise SystemExit(f"not ChunkedTile fields: {unknown}")
    return {k: int(v) for k, v in pins.items()}


def with_tiles(pins: dict):
    """Patch both launches so the plan's tiles read as if `pins` were set."""
    real_fwd, real_bwd = forward.tiles, backward.tiles

    def plan_with(plan):
        return dataclasses.replace(plan, tile=ChunkedTile(**dict(plan.tile_dict(), **pins)))

    forward.tiles = lambda plan, *a: real_fwd(plan_with(plan), *a)
    backward.tiles = lambda plan, *a: real_bwd(plan_with(plan), *a)
    return real_fwd, real_bwd


def inputs(b, t):
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(b, t, H, P, generator=g, **bf)
    dt = (torch.randn(b, t, H, device="cuda", generator=g) * 0.5 - 1).to(torch.bfloat16)
    A = -torch.rand(H, device="cuda", generator=g)
    B = torch.randn(b, t, 1, N, generator=g, **bf)
    C = torch.randn(b, t, 1, N, generator=g, **bf)
    D = torch.randn(H, device="cuda", generator=g)
    z = torch.randn(b, t, H, P, generator=g, **bf)
    dt_bias = torch.randn(H, device="cuda", generator=g) * 0.3
    return x, dt, A, B, C, D, z, dt_bias


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("fwd", "train"))
    ap.add_argument("--shapes", default="8x4096,2x16384,16x2048", help="b x t, comma-separated")
    ap.add_argument("--variants", default="", help="';'-separated variants")
    args = ap.parse_args()
    variants = [{}] + [parse_variant(v) for v in args.variants.split(";") if v]
    print(f"{torch.cuda.get_device_name()}  {args.mode}  h={H} p={P} n={N} bf16", flush=True)
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        x, dt, A, B, C, D, z, dt_bias = leaves = inputs(b, t)
        for v in leaves:
            v.requires_grad_(args.mode == "train")
        grad = torch.randn_like(x)

        def call():
            y = ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                    lowering="chunked", backend="triton")
            return torch.autograd.grad(y, leaves, grad) if args.mode == "train" else (y,)

        reference = None
        for pins in variants:
            saved = with_tiles(pins)
            try:
                out = call()
                reference = reference or out
                err = max(rel(a, r) for a, r in zip(out, reference))
                ms = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
                print(f"b={b} t={t} {pins or 'built-in'}: {ms:.3f} ms, "
                      f"vs built-in {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a failing variant is a result
                print(f"b={b} t={t} {pins}: failed {e!r}"[:300], flush=True)
                torch.cuda.synchronize()
            finally:
                forward.tiles, backward.tiles = saved


if __name__ == "__main__":
    main()
