"""GPU benchmark: per-key (GLA-class) decays against FLA's chunk_gla, and Mamba-1's selective
scan on its two lowerings (issue 16).

    python benchmarks/per_key.py [--only gla,check,simple,s6] [--reps 50] [--shapes 1]
        [--fla-configs 4]
    python benchmarks/per_key.py --device cpu --tiny       # a smoke check of the script

Rows, bf16 inputs, the gate g = log sigmoid(4 x) (gates from near 0 to near 1), fp32 g:
- `fla`: fla.ops.gla.chunk_gla (its Hopper backward guard lifted, as compat_gpu_check does);
- `ssmc`: ssmc.compat.fla.chunk_gla (the built-in GLA definition);
- `user`: a GLA definition written here (decay exp(g), query q * scale), which must get the
  built-in's kernels and speed (no fast path keyed to a built-in);
at B=8 T=2048 H=16 K=V=128, B=2 T=8192 H=16 K=V=128 and B=8 T=4096 H=32 K=V=64. Columns:
median ms of a forward (no grad) and of a forward + backward (gradients of q, k, v, g), the
ratio FLA / row (above 1: faster than FLA), the chunked FLOPs per second (2 B T H (2 K V + 64
(K + V)): the state products and the intra-chunk products at chunks of 64) and the bytes per
second of reading the inputs and writing the output once, with the fraction of the H100/H200
memory floor (inputs + output once at the device's bandwidth).

`check`: at B=2 T=1024 H=4 K=V=64, the output and every input's gradient of `ssmc`, `user`
and `fla` against the float64 reference (ssmc's sequential scan on float64 copies), relative
L2 error, with some gates below 1e-3 and some above 0.999.

`simple` (issue 15's FLA rows): the same table for simple GLA, a scalar gate per head
(g (B, T, H)): fla.ops.simple_gla.chunk_simple_gla against ssmc.compat.fla.chunk_simple_gla and
a user's definition of it, at the same shapes.

`s6`: ssmc.ops.selective_scan (time-major, d=2048 n=16, D, z, delta_bias, softplus; b=8
t=2048), forward
and forward + backward with lowering="scan" and lowering="chunked", and what "auto" picks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import ssmc
from ssmc import dsl as S
from ssmc.compat import fla as ssmc_fla

SHAPES = [(8, 2048, 16, 128, 128), (2, 8192, 16, 128, 128), (8, 4096, 32, 64, 64)]
#: HBM bandwidth (bytes/s) of the cards the floor is quoted for
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def user_gla(scale: float, per_key: bool = True):
    """A GLA written as a user would (not the built-in); without `per_key`, simple GLA (one
    gate per head and step)."""
    if per_key:
        @ssmc.ssm
        def my_gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                   g: S.In["b t h n"]):
            return S.recurrence(decay=S.exp(g), key=k, value=v, query=q * scale)
        return my_gla

    @ssmc.ssm
    def my_simple_gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                      g: S.In["b t h"]):
        return S.recurrence(decay=S.exp(g), key=k, value=v, query=q * scale)
    return my_simple_gla


def fla_op(module: str, name: str):
    """FLA's `module.name`, or None (reported) where FLA is not importable."""
    try:
        import importlib

        import fla.ops.common.chunk_o as chunk_o
        chunk_o.TRITON_ABOVE_3_7_1 = True      # FLA 0.6's Hopper backward guard (its #640)
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - reported, then the rows are skipped
        print(f"# fla skipped: {e!r}", file=sys.stderr)
        return None


def inputs(B, T, H, K, V, device, dtype=torch.bfloat16, seed=0, per_key=True):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    q = (rnd(B, T, H, K) * K ** -0.5).to(dtype)
    k = (rnd(B, T, H, K) * K ** -0.5).to(dtype)
    v = rnd(B, T, H, V).to(dtype)
    g = F.logsigmoid(4 * rnd(*((B, T, H, K) if per_key else (B, T, H)))).float()
    return dict(q=q, k=k, v=v, g=g)


#: the lowering of the ssmc rows ("auto", or one to measure on its own: --lowering)
LOWERING = ["auto"]


def rows(fla, per_key=True):
    """name -> fn(q, k, v, g) returning o: FLA's op (`fla`, where given), ssmc's shim of it
    and a user's definition."""
    out = {}
    if fla is not None:
        out["fla"] = lambda q, k, v, g: fla(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]
    shim = ssmc_fla.chunk_gla if per_key else ssmc_fla.chunk_simple_gla
    out["ssmc"] = lambda q, k, v, g: shim(q, k, v, g, lowering=LOWERING[0])[0]
    ops = {}

    def user(q, k, v, g):
        scale = q.shape[-1] ** -0.5
        if scale not in ops:
            ops[scale] = ssmc.compile(user_gla(scale, per_key), lowering=LOWERING[0])
        return ops[scale](q=q, k=k, v=v, g=g)
    out["user"] = user
    return out


def timer(device):
    if device == "cuda":
        import triton.testing

        def bench(fn, reps):
            fn()
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")
        return bench

    def bench_cpu(fn, reps):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return bench_cpu


def fwd_bwd(fn, a):
    leaves = {k: v.detach().requires_grad_(True) for k, v in a.items()}

    def run():
        for v in leaves.values():
            v.grad = None
        o = fn(**leaves)
        o.backward(torch.ones_like(o))
    return run


def gla_table(device, reps, tiny, fla, per_key=True):
    """GLA (`per_key`) or simple GLA against FLA's op of it (`fla`)."""
    bench = timer(device)
    card = next((c for c in BANDWIDTH if device == "cuda"
                 and c in torch.cuda.get_device_name()), None)
    shapes = [(1, 64, 2, 16, 16)] if tiny else SHAPES
    print("\n### " + ("GLA (gates per key) vs fla chunk_gla" if per_key else
                      "simple GLA (a gate per head) vs fla chunk_simple_gla"))
    print("| shape | row | fwd ms | vs fla | fwd TFLOP/s | fwd GB/s | floor % | fwd+bwd ms |"
          " vs fla |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, T, H, K, V in shapes:
        a = inputs(B, T, H, K, V, device, per_key=per_key)
        flops = 2 * B * T * H * (2 * K * V + 64 * (K + V))
        nbytes = sum(x.numel() * x.element_size() for x in a.values()) + B * T * H * V * 2
        times = {}
        for name, fn in rows(fla, per_key).items():
            try:
                with torch.no_grad():
                    f = bench(lambda: fn(**a), reps)
                fb = bench(fwd_bwd(fn, a), reps)
            except Exception as e:  # noqa: BLE001 - reported in the table
                print(f"| {B}x{T} h{H} k{K} | {name} | failed: {type(e).__name__}: {e} |")
                continue
            times[name] = (f, fb)
            base = times.get("fla")
            vs = ((f"{base[0] / f:.2f}x", f"{base[1] / fb:.2f}x") if base and name != "fla"
                  else ("", ""))
            floor = f"{100 * nbytes / BANDWIDTH[card] / (f * 1e-3):.0f}" if card else ""
            print(f"| {B}x{T} h{H} k{K} | {name} | {f:.3f} | {vs[0]} | "
                  f"{flops / (f * 1e-3) / 1e12:.1f} | {nbytes / (f * 1e-3) / 1e9:.0f} | {floor} |"
                  f" {fb:.3f} | {vs[1]} |", flush=True)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(device, fla):
    """Outputs and gradients against the float64 sequential reference, bf16 and fp32 inputs."""
    print("| inputs | row | o | dq | dk | dv | dg |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        a = inputs(2, 1024, 4, 64, 64, device, dtype=dtype, seed=1)
        a["g"][:, ::7, :, :8] = -8.0      # gates of 3e-4
        a["g"][:, 3::5, :, 8:16] = -1e-4  # gates of 0.9999
        gen = torch.Generator(device="cpu").manual_seed(2)
        cot = torch.randn(2, 1024, 4, 64, generator=gen).to(device)
        leaves = {k: v.detach().double().requires_grad_(True) for k, v in a.items()}
        ref = ssmc.compile(user_gla(64 ** -0.5), backend="reference")(**leaves)
        ref.backward(cot.double())
        for name, fn in rows(fla).items():
            ins = {k: v.detach().requires_grad_(True) for k, v in a.items()}
            o = fn(**ins)
            o.backward(cot.to(o.dtype))
            errs = [rel(o, ref)] + [rel(ins[k].grad, leaves[k].grad) for k in "qkvg"]
            print(f"| {str(dtype)[6:]} | {name} | " + " | ".join(f"{e:.2e}" for e in errs)
                  + " |", flush=True)


def s6_table(device, reps, tiny):
    from ssmc.ops import selective_scan
    bench = timer(device)
    b, t, d, n = (1, 32, 16, 4) if tiny else (8, 2048, 2048, 16)
    gen = torch.Generator(device="cpu").manual_seed(3)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    a = dict(u=rnd(b, t, d), delta=rnd(b, t, d) * 0.5, A=-torch.rand(d, n, generator=gen)
             .to(device), B=rnd(b, t, n), C=rnd(b, t, n), D=rnd(d, dtype=torch.float32),
             z=rnd(b, t, d), delta_bias=rnd(d, dtype=torch.float32) * 0.1)
    print("| selective_scan | fwd ms | fwd+bwd ms |")
    print("|---|---|---|")
    for lowering in ("scan", "chunked", "auto"):
        def fn(lw=lowering, **kw):
            return selective_scan(**kw, delta_softplus=True, lowering=lw)
        with torch.no_grad():
            f = bench(lambda: fn(**a), reps)
        fb = bench(fwd_bwd(fn, a), reps)
        print(f"| {lowering} | {f:.3f} | {fb:.3f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="check,gla,simple,s6")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shapes", type=int, default=len(SHAPES),
                    help="the first this many of the gla table's shapes")
    ap.add_argument("--lowering", default="auto", help="of the ssmc and user rows")
    ap.add_argument("--fla-configs", type=int, default=0,
                    help="let each of FLA's autotuners try only this many configs (0: all); "
                         "its full first-use tuning takes minutes")
    args = ap.parse_args()
    LOWERING[0] = args.lowering
    only = args.only.split(",")
    del SHAPES[args.shapes:]
    if args.fla_configs:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # (python -P)
        from compat_gpu_check import limit_autotuning
        limit_autotuning(args.fla_configs)
    on_gpu = args.device == "cuda"
    fla = fla_op("fla.ops.gla", "chunk_gla") if on_gpu else None
    print(f"# device: {torch.cuda.get_device_name() if on_gpu else 'cpu'}")
    if "check" in only and not args.tiny:
        check(args.device, fla)
    if "gla" in only:
        gla_table(args.device, args.reps, args.tiny, fla)
    if "simple" in only:
        simple = fla_op("fla.ops.simple_gla", "chunk_simple_gla") if on_gpu else None
        gla_table(args.device, args.reps, args.tiny, simple, per_key=False)
    if "s6" in only:
        s6_table(args.device, args.reps, args.tiny)


if __name__ == "__main__":
    main()
