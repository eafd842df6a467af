"""Check TVM CUDA exports (ssmc/backends/tvm/export.py) on a GPU against ssmc.reference.

Two steps, on two machines:

1. Where `tvm` and nvcc are installed (the CPU machine), write the exports:
       python benchmarks/tvm_gpu_check.py --make .carry/tvm_exports [--arch sm_90]
   This exports a few specialisations (SSD fp32 and bf16 with states and packed sequences,
   GLA bidirectional, Mamba-1 selective scan) as shared libraries that link only libtvm_ffi,
   and (for cuda) the chunked lowering: the Mamba-2 SSD forward at the benchmark's
   specialisation (h=80 g=1 n=128 p=64; bf16 on tensor cores and fp32) and smaller exports of
   its features (states, packed sequences, fp16 with odd sizes, both directions).

2. On the GPU machine, with only torch and apache-tvm-ffi (no `tvm`), check them:
       python benchmarks/tvm_gpu_check.py .carry/tvm_exports/*
   For each export: random inputs on CUDA at two lengths (and packed sequences where the export
   takes cu_seqlens), the float64 reference on the CPU (`ssmc.reference.scan` on the program
   text stored in the manifest), the relative errors, and the median kernel time.
   Chunked SSD exports at the benchmark specialisation are also timed at b=8 t=4096, next to
   the Triton backend's chunked forward on the same inputs (when triton is importable; with
   SSMC_AUTOTUNE=off, Triton runs its default tiles), printing the ratio TVM/Triton.
   With --profile, a few launches of each of those (TVM and Triton) also run under
   torch.profiler (CUDA activity), printing the CUDA time per kernel (name, calls, total and
   average us; the chunked TVM kernels in launch order: chunk pass, sequential pass, output
   pass per direction). --only NAME... restricts the checks to exports whose directory name
   contains one of the given strings (e.g. the bench exports only: --only bench).
   Exits non-zero when an error exceeds its tolerance (fp32 1e-4 relative to max|ref|, bf16
   2e-2; GPU exp/log differ from the CPU's in the last bits, and t is long).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if not hasattr(torch.Tensor, "__dlpack_c_exchange_api__"):
    # older torch: let tvm_ffi use plain DLPack (device/README.md)
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = {"float32": 1e-4, "float64": 1e-6, "bfloat16": 2e-2, "float16": 1e-2}
#: set by main(): run the bench launches under torch.profiler too
PROFILE = False
PROFILE_LAUNCHES = 3
#: set by main(): one reference case per export
QUICK = False
#: set by main(): the (b, t) the bench exports are timed at
BENCH_BT = [(8, 4096)]


def gla_bidirectional():
    import ssmc
    from ssmc import dsl as S

    def gla_bidirectional(q, k, v, g):
        return S.recurrence(decay=S.exp(g), key=k, value=v, query=q * 0.125,
                            direction="bidirectional")
    gla_bidirectional.__annotations__ = dict(q=S.In["b t h n"], k=S.In["b t h n"],
                                             v=S.In["b t h p"], g=S.In["b t h n"])
    return ssmc.ssm(gla_bidirectional)


def ssd_bidirectional():
    """A scalar-decay (SSD-like) definition over both directions: chunked on CUDA."""
    import ssmc
    from ssmc import dsl as S

    def ssd_bidirectional(x, dt, A, B, C):
        dt = S.softplus(dt)
        return S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C,
                            direction="bidirectional")
    ssd_bidirectional.__annotations__ = dict(x=S.In["b t h p"], dt=S.In["b t h"], A=S.In["h"],
                                             B=S.In["b t g n"], C=S.In["b t g n"])
    return ssmc.ssm(ssd_bidirectional)


#: the benchmark shape of the chunked SSD forward (README / RESULTS: Triton ~1.9 ms on an H100)
BENCH = dict(b=8, t=4096, h=80, p=64, n=128, g=1)


#: plan.tile of the bf16 variants exported at the bench shape (chunked_cuda.Tiles: output
#: pass: GF packed G fragments, EP staged epilogue, VS value tile over the key tile, KC key-dim
#: slice, LB load batch, MB __launch_bounds__ min blocks per SM of the output pass, SP state
#: tile prefetched into registers; chunk pass: KV key tile from 16-byte loads (now the
#: default); sequential pass: SV 16-byte vectors a thread; both parallel passes: FM approximate
#: exp/division where values are rounded to 16 bits (now the default; FM=0 pins exact math),
#: VT the value tile stored in 32-bit step pairs free of bank conflicts, now the default; VT=0
#: pins a row at a time). Each is exported as
#: chunked_ssd_mamba2_bf16_<name>; measurements in benchmarks/RESULTS.md.
BF16_VARIANTS = {
    "gf_ep": {"GF": 1, "EP": 1},                # G in bf16 fragments, epilogue staged (p)
    "kc64_occ7": {"GF": 1, "EP": 1, "KC": 64, "LB": 8, "MB": 7},   # 28 KB shared, 7 blocks/SM
    "vs_occ6": {"GF": 1, "EP": 1, "VS": 1, "LB": 4, "MB": 6},      # 35 KB shared, 6 blocks/SM
    "sv2": {"SV": 2},                           # 39 registers, 12 blocks/SM, fewer loads each
    "sp": {"SP": 1},                            # 105 registers: 4 blocks/SM
    "sp_occ5": {"SP": 1, "MB": 5},              # ... capped for 5 (a few spilled)
    "fm0": {"FM": 0},                           # exact expf and divisions (the earlier default)
    "vt0": {"VT": 0},                           # a row at a time (the earlier default)
}


def make(out_root: Path, arch: str, target: str = "cuda", only=None):
    from ssmc.ops.selective_scan import build as ss_build
    from ssmc.backends.tvm.export import export
    from ssmc.ops.ssd import build as ssd_build

    mamba2 = ssd_build(has_D=True, has_z=True, dt_softplus=True, has_dt_bias=True)
    bench = {a: BENCH[a] for a in "hgnp"}
    jobs = [
        ("ssd_fp32", ssd_build(), dict(h=8, g=1, n=64, p=64), {}),
        ("ssd_mamba2_bf16_states_varlen", ssd_build(has_D=True, has_z=True, dt_softplus=True,
                                                    has_dt_bias=True),
         dict(h=8, g=2, n=128, p=64),
         dict(dtype="bfloat16", initial_state=True, return_final_state=True, varlen=True)),
        ("gla_bidirectional_fp32_states", gla_bidirectional(), dict(h=4, n=64, p=64),
         dict(initial_state=True, return_final_state=True)),
        ("selective_scan_fp32", ss_build(has_D=True, has_z=True, delta_softplus=True),
         dict(h=256, g=1, n=16, p=1), dict(return_final_state=True)),
    ]
    if target == "cuda":
        # the chunked lowering on CUDA (tensor cores for bf16): the benchmark's specialisation,
        # timed against the Triton backend on the GPU, plus its features at smaller sizes
        jobs += [
            ("chunked_ssd_mamba2_bf16", mamba2, bench, dict(dtype="bfloat16", lowering="chunked")),
            ("chunked_ssd_mamba2_fp32", mamba2, bench, dict(lowering="chunked")),
            ("chunked_ssd_mamba2_bf16_states_varlen", mamba2, dict(h=8, g=2, n=128, p=64),
             dict(dtype="bfloat16", initial_state=True, return_final_state=True, varlen=True,
                  lowering="chunked")),
            ("chunked_ssd_mamba2_fp16_odd_sizes", mamba2, dict(h=6, g=3, n=40, p=20),
             dict(dtype="float16", return_final_state=True, lowering="chunked")),
            ("chunked_ssd_bidirectional_fp32_states", ssd_bidirectional(),
             dict(h=4, g=2, n=64, p=40), dict(initial_state=True, return_final_state=True,
                                               lowering="chunked")),
        ]
        # tile variants of the bf16 kernel, all timed at the bench shape
        jobs += [(f"chunked_ssd_mamba2_bf16_{name}", mamba2, bench,
                  dict(dtype="bfloat16", lowering="chunked", tile=tile))
                 for name, tile in BF16_VARIANTS.items()]
    for name, defn, shapes, opts in jobs:
        if only and not any(o in name for o in only):
            continue
        out = export(defn, target=target, arch=arch, shapes=shapes, out_dir=out_root / name,
                     **opts)
        print(f"exported {name} -> {out}")


def inputs_for(manifest, sizes, device, gen):
    """Random inputs in the ranges the built-ins are used with: names A are negative
    (decay rates), dt/delta small, log-gates g through logsigmoid; the rest standard normal."""
    out = []
    for spec in manifest["inputs"]:
        shape = tuple(sizes[a] for a in spec["axes"])
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        name = spec["name"]
        if name == "A":
            x = -(0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64))
        elif name in ("dt", "delta", "dt_bias", "delta_bias"):
            x = 0.5 * x
        elif name == "g":
            x = torch.nn.functional.logsigmoid(x + 2.0)
        out.append(x.to(getattr(torch, spec["dtype"])).to(device))
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check(directory: Path) -> bool:
    from ssmc import reference
    from ssmc.backends.tvm.load import load
    from ssmc.ir import parse_program

    kernel = load(directory)
    m = kernel.manifest
    device = "cuda" if m["target"] == "cuda" else "cpu"
    program = parse_program(m["program"])
    gen = torch.Generator().manual_seed(0)
    ok = True
    cases = [dict(b=2, t=300)] if QUICK else [dict(b=2, t=257), dict(b=1, t=2048)]
    for case in cases:
        sizes = dict(case, **m["sizes"])
        kw, cu = {}, None
        nseq = sizes["b"]
        if m["varlen"]:
            sizes["b"] = 1
            cuts = sorted(torch.randint(0, sizes["t"], (3,), generator=gen).tolist())
            cu = torch.tensor([0, *cuts, sizes["t"]], dtype=getattr(torch, m["cu_seqlens_dtype"]))
            nseq = cu.numel() - 1
            kw["cu_seqlens"] = cu.to(device)
        args = inputs_for(m, sizes, device, gen)
        h0 = None
        if m["has_initial_state"]:
            D = len(m["directions"])
            shape = ((D,) if D > 1 else ()) + (nseq, sizes["h"], sizes["n"], sizes["p"])
            h0 = torch.randn(shape, generator=gen).to(getattr(torch, m["initial_state_dtype"]))
            kw["initial_state"] = h0.to(device)
        result = kernel(*args, **kw)
        sync()
        out, final = result if isinstance(result, tuple) else (result, None)
        tensors = {s["name"]: a.cpu().double() for s, a in zip(m["inputs"], args)}
        ref_out, ref_final = reference.scan(program, tensors, sizes, None if h0 is None else
                                            h0.double(), cu, final is not None)
        tol = TOL[m["dtype"]]
        for what, a, e in (("y", out, ref_out), ("final_state", final, ref_final)):
            if a is None:
                continue
            a = a.cpu().double()
            finite = bool(torch.isfinite(a).all())
            err = float((a - e).abs().max() / e.abs().max().clamp_min(1e-30)) if finite else \
                float("inf")
            good = finite and err <= tol
            ok &= good
            print(f"  {'ok  ' if good else 'FAIL'} {directory.name} b={sizes['b']} t={sizes['t']}"
                  f" {what}: rel max err {err:.2e} (tol {tol:.0e})")
        # timing: median of 20 launches (CUDA events on the GPU)
        times = []
        for _ in range(23):
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                kernel(*args, **kw)
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                kernel(*args, **kw)
                times.append((time.perf_counter() - t0) * 1e3)
        times = sorted(times[3:])
        print(f"       median {times[len(times) // 2]:.3f} ms over 20 launches")
    if device == "cuda" and m.get("lowering") == "chunked" and m["program_name"] == "ssd" and \
            all(m["sizes"][a] == BENCH[a] for a in "hgnp") and not m["varlen"] and \
            not m["has_initial_state"]:
        bench_vs_triton(kernel, m, gen)
    return ok


def cuda_median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    times = []
    for _ in range(warmup + reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    times = sorted(times[warmup:])
    return times[len(times) // 2]


def chunked_roles(m) -> list[str]:
    """The chunked CUDA lowering's kernels in launch order (chunked_cuda.render_chunked_cuda)."""
    roles = ["slot map reset", "slot map fill"] if m.get("varlen") else []
    for d in m.get("directions", ["forward"]):
        roles += [f"chunk pass ({d})", f"sequential pass ({d})", f"output pass ({d})"]
    return roles


def profile_kernels(fn, label: str, roles: list[str] | None = None, prefix: str = "",
                    launches: int = PROFILE_LAUNCHES):
    """Run fn() `launches` times under torch.profiler and print every kernel's time: name,
    calls, total and average us (CUDA activity; CPU activity where there is no GPU, only to
    test this code). `roles` names the kernels whose name starts with `prefix`, in the order
    of their first launch."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(launches):
            fn()
        sync()
    per, order = {}, []
    for e in prof.events():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name
        us = e.time_range.elapsed_us()
        if name not in per:
            per[name] = [0, 0.0, e.time_range.start]
            order.append(name)
        per[name][0] += 1
        per[name][1] += us
    order.sort(key=lambda k: per[k][2])
    total = sum(v[1] for v in per.values())
    print(f"  profile {label}: {launches} launches, {total / launches:.1f} us a launch "
          f"({'CUDA' if cuda else 'CPU'} activity)")
    print(f"    {'kernel':<48} {'calls':>5} {'total us':>10} {'avg us':>9} {'share':>8}  role")
    named = iter(roles or [])
    for name in order:
        calls, us, _ = per[name]
        role = next(named, "") if roles and name.startswith(prefix) else ""
        short = name if len(name) <= 48 else name[:45] + "..."
        print(f"    {short:<48} {calls:>5} {us:>10.1f} {us / calls:>9.1f} "
              f"{100 * us / max(total, 1e-9):>7.1f}%  {role}")


def bench_vs_triton(kernel, m, gen):
    for b, t in BENCH_BT:
        bench_one(kernel, m, gen, dict(BENCH, b=b, t=t))


def bench_one(kernel, m, gen, sizes):
    """The benchmark shape: the TVM export's time, and the Triton backend's chunked forward on
    the same inputs when triton is importable (its result is compared too)."""
    args = inputs_for(m, sizes, "cuda", gen)
    out = kernel(*args)
    t_tvm = cuda_median_ms(lambda: kernel(*args))
    print(f"  bench {m['dtype']} b={sizes['b']} t={sizes['t']} h={sizes['h']} n={sizes['n']} "
          f"p={sizes['p']}: TVM chunked {t_tvm:.3f} ms")
    if PROFILE:
        profile_kernels(lambda: kernel(*args), f"TVM {m['dtype']}", chunked_roles(m),
                        m["function"])
    try:
        import triton  # noqa: F401
    except ImportError:
        print("       (triton not importable: no Triton comparison)")
        return
    import ssmc.ops
    named = {s["name"]: a for s, a in zip(m["inputs"], args)}
    extra = {k: named[k] for k in ("D", "z", "dt_bias") if k in named}

    def run_triton():
        return ssmc.ops.ssd(named["x"], named["dt"], named["A"], named["B"], named["C"],
                            dt_softplus=True, backend="triton", lowering="chunked", **extra)
    ref = run_triton()
    sync()
    t_tri = cuda_median_ms(run_triton)
    diff = float((out.double() - ref.double()).abs().max() /
                 ref.double().abs().max().clamp_min(1e-30))
    print(f"       Triton chunked {t_tri:.3f} ms; TVM/Triton = {t_tvm / t_tri:.2f}x "
          f"(rel max diff between them {diff:.2e})")
    if PROFILE and m["dtype"] not in TRITON_PROFILED:
        TRITON_PROFILED.add(m["dtype"])
        profile_kernels(run_triton, f"Triton {m['dtype']}")


TRITON_PROFILED: set = set()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", type=Path, help="exported directories to check")
    ap.add_argument("--make", type=Path, help="write the exports into this directory")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--target", default="cuda", choices=("cuda", "llvm"),
                    help="with --make: llvm writes CPU exports (to test this script without a GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the bench-shape launches per kernel (torch.profiler)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="make or check only exports whose directory name contains one of "
                         "these")
    ap.add_argument("--quick", action="store_true",
                    help="one reference case per export (b=2 t=300: 5 chunks, the last one "
                         "partial) instead of two")
    ap.add_argument("--bench-bt", default="8x4096", metavar="BxT,...",
                    help="the (b, t) the bench exports are timed at (default 8x4096)")
    a = ap.parse_args(argv)
    global PROFILE, QUICK, BENCH_BT
    PROFILE, QUICK = a.profile, a.quick
    pairs = [bt.split("x") for bt in a.bench_bt.split(",")]
    if not all(len(bt) == 2 and all(v.isdigit() and int(v) > 0 for v in bt) for bt in pairs):
        ap.error(f"--bench-bt: {a.bench_bt!r} is not a list like 8x4096,16x2048")
    BENCH_BT = [(int(b), int(t)) for b, t in pairs]
    if a.make:
        make(a.make, a.arch, a.target, a.only)
        return 0
    dirs = [d for d in a.dirs if (d / "manifest.json").exists()]
    if a.only:
        dirs = [d for d in dirs if any(o in d.name for o in a.only)]
    targets = {json.loads((d / "manifest.json").read_text())["target"] for d in dirs}
    if "cuda" in targets and not torch.cuda.is_available():
        print("no CUDA device: run this on the GPU machine", file=sys.stderr)
        return 2
    if not dirs:
        print("no exported directories given (each needs a manifest.json)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    ok = True
    for d in dirs:
        print(f"{d}: {json.loads((d / 'manifest.json').read_text())['program_name']}")
        ok &= check(d)
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
