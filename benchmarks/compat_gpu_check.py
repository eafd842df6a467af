"""GPU check of ssmc.compat against the original libraries on the same inputs.

    PYTHONPATH=$PWD:.carry/mamba_src:.carry/fla_src python3 benchmarks/compat_gpu_check.py \
        [--backend auto|triton|tvm|reference] [--dtypes float32,bfloat16] [--quick]
        [--only mamba_ssm|fla] [--functions NAME,...] [--jobs N] [--fla-hopper-bwd]
        [--original-configs K]

For every shim in ssmc.compat.mamba_ssm and ssmc.compat.fla and a few argument combinations,
runs the original (mamba_ssm 2.3.x, fla 0.6) and the shim on identical inputs, then compares
outputs, returned states and gradients of a random linear loss over the outputs (w.r.t. every
floating input the original differentiates). Prints one row per case: the relative error
||shim - original|| / ||original|| of the output, of the states, and the worst gradient (with
its name), and PASS/FAIL against a tolerance per dtype. A case whose original cannot run here
(an import error; FLA's backward guard on Hopper with Triton < 3.7.1 unless lifted) is reported
as "skip: <reason>", its forward still compared when only the backward is refused. Exit status 1 when any case fails.

Where mamba_ssm's CUDA extension is not built, `selective_scan_fn` is compared with mamba_ssm's
own pure-PyTorch `selective_scan_ref` (the function its tests check the CUDA kernel against).
`--fla-hopper-bwd` lifts FLA's refusal of its gated backward on Hopper with Triton < 3.7.1; run
the FLA cases once more with `--backend reference` in the same run to see FLA's gradients
against the float64 reference. `--jobs N` runs each (function, dtype) in its own process, N at a
time: the originals autotune on first use, and compiling their configs is what takes the time.
`--original-configs K` lets each of their Triton autotuners try only K of its configs, evenly
spaced over its list (tiling changes how fast a kernel runs, not what it computes).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
import types
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
import torch.nn.functional as F

from ssmc.compat import fla as ssmc_fla
from ssmc.compat import mamba_ssm as ssmc_mamba

TOL = {torch.float32: (5e-3, 2e-2), torch.bfloat16: (3e-2, 8e-2)}  # (outputs, gradients)
FUNCTIONS = {
    "mamba_ssm": ("mamba_chunk_scan_combined", "selective_state_update", "selective_scan_fn"),
    "fla": ("chunk_simple_gla", "fused_recurrent_simple_gla", "chunk_gla"),
}


def original(module: str, name: str):
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name), None
    except Exception as e:  # noqa: BLE001 - reported as a skip
        return None, f"import {module}.{name}: {type(e).__name__}: {e}"[:120]


def selective_scan_original():
    """mamba_ssm's selective_scan_fn, else its selective_scan_ref where the CUDA extension is
    not built (the module imports the extension at the top, though the reference never uses
    it)."""
    fn, why = original("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    if fn is not None:
        return fn, None
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        ref, why_ref = original("mamba_ssm.ops.selective_scan_interface", "selective_scan_ref")
        del sys.modules["selective_scan_cuda"]
        if ref is not None:
            return ref, None
        why = f"{why}; {why_ref}"
    return None, why


def allow_fla_hopper_bwd():
    """FLA 0.6 refuses its gated chunk backward on Hopper with Triton < 3.7.1 (its issue #640);
    this lifts the refusal, so that its gradients can be compared (and checked against the
    float64 reference with --backend reference)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except ImportError:  # the FLA cases report the import error themselves
        return
    chunk_o.TRITON_ABOVE_3_7_1 = True


def limit_autotuning(k: int) -> None:
    """Every Triton autotuner tries at most k configs, evenly spaced over its (pruned) list; a
    config that does not fit the GPU is still skipped by the autotuner's own benchmark."""
    from triton.runtime.autotuner import Autotuner
    prune = Autotuner.prune_configs

    def prune_to_k(self, kwargs):
        configs = prune(self, kwargs)
        if len(configs) <= k:
            return configs
        return [configs[round(i * (len(configs) - 1) / (k - 1))] for i in range(k)] \
            if k > 1 else configs[:1]
    Autotuner.prune_configs = prune_to_k


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Gen:
    def __init__(self, seed, device):
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def randn(self, *shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=self.g, device=self.device) * scale).to(dtype)

    def rand(self, *shape, lo=0.0, hi=1.0, dtype=torch.float32):
        x = torch.rand(*shape, generator=self.g, device=self.device)
        return (lo + (hi - lo) * x).to(dtype)


def _as_list(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [r for r in result if r is not None]


def compare(run_orig, run_shim, inputs: dict, grad_names, dtype):
    """Run both on copies of `inputs`; returns (out_err, state_err, (grad_err, name), note)."""
    def leaves():
        return {k: (v.detach().clone().requires_grad_(k in grad_names)
                    if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in inputs.items()}

    a, b = leaves(), leaves()
    outs_o = _as_list(run_orig(a))
    outs_s = _as_list(run_shim(b))
    if len(outs_o) != len(outs_s):
        raise AssertionError(f"original returned {len(outs_o)} tensors, the shim {len(outs_s)}")
    for i, (o, s) in enumerate(zip(outs_o, outs_s)):
        if o.shape != s.shape:
            raise AssertionError(f"output {i}: shim shape {tuple(s.shape)}, original "
                                 f"{tuple(o.shape)}")
    out_err = rel(outs_s[0], outs_o[0])
    state_err = max((rel(s, o) for o, s in zip(outs_o[1:], outs_s[1:])), default=float("nan"))
    if not grad_names:
        return out_err, state_err, (float("nan"), "-"), ""
    gen = torch.Generator(device=outs_o[0].device).manual_seed(123)
    ws = [torch.randn(o.shape, generator=gen, device=o.device) for o in outs_o]
    names = [n for n in grad_names if n in a]
    try:
        g_o = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(outs_o, ws)
                                      if o.requires_grad),
                                  [a[n] for n in names], allow_unused=True)
    except Exception as e:  # noqa: BLE001 - e.g. FLA's Hopper/Triton backward guard
        return out_err, state_err, (float("nan"), "-"), \
            f"skip grads: original backward: {type(e).__name__}: {str(e)[:80]}"
    g_s = torch.autograd.grad(sum((s.float() * w).sum() for s, w in zip(outs_s, ws)
                                  if s.requires_grad),
                              [b[n] for n in names], allow_unused=True)
    worst = (0.0, "-")
    for n, go, gs in zip(names, g_o, g_s):
        if go is None:  # the original does not differentiate this input
            continue
        gs = torch.zeros_like(b[n]) if gs is None else gs
        err = rel(gs, go)
        if err > worst[0] or worst[1] == "-":
            worst = (err, n)
    return out_err, state_err, worst, ""


# --------------------------------------------------------------------------------- cases

def mamba_cases(dev, dtype, quick, backend):
    chunk, why = original("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    b, t, h, p, g, n = (2, 250, 8, 64, 2, 64) if not quick else (1, 100, 4, 32, 1, 32)
    r = Gen(0, dev)
    base = dict(x=r.randn(b, t, h, p, dtype=dtype), dt=r.randn(b, t, h, scale=0.5, dtype=dtype),
                A=-r.rand(h, lo=0.5, hi=4.0), B=r.randn(b, t, g, n, dtype=dtype),
                C=r.randn(b, t, g, n, dtype=dtype), D=r.randn(h), z=r.randn(b, t, h, p, dtype=dtype),
                dt_bias=r.randn(h, scale=0.3))
    h0 = r.randn(b, h, p, n)
    grads = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")

    def ssd_case(label, inputs, kw, grad_names=grads):
        def run_o(a):
            return chunk(**a, chunk_size=64, **kw)

        def run_s(a):
            return ssmc_mamba.mamba_chunk_scan_combined(**a, chunk_size=64, **kw, backend=backend)
        return ("mamba_chunk_scan_combined", label, run_o if chunk else None, run_s, inputs,
                grad_names, why)

    yield ssd_case("D z dt_bias softplus", base, dict(dt_softplus=True))
    yield ssd_case("+ initial/final states", {**base, "initial_states": h0},
                   dict(dt_softplus=True, return_final_states=True))
    plain = {k: base[k] for k in ("x", "dt", "A", "B", "C")}
    yield ssd_case("plain, D (h, p), dt_limit", {**plain, "D": r.randn(h, p)},
                   dict(dt_softplus=True, dt_limit=(0.01, 0.2)))
    lengths = [t // 3, t // 2, t - t // 3 - t // 2]
    seq_idx = torch.repeat_interleave(torch.arange(3, device=dev, dtype=torch.int32),
                                      torch.tensor(lengths, device=dev)).unsqueeze(0)
    cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], t], device=dev,
                      dtype=torch.int32)
    packed = {k: (v[:1] if v.dim() > 1 and v.shape[0] == b else v) for k, v in base.items()}
    yield ssd_case("packed seq_idx + varlen states (fwd)", packed,
                   dict(dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu,
                        return_final_states=True, return_varlen_states=True), grad_names=())

    update, why_u = original("mamba_ssm.ops.triton.selective_state_update",
                             "selective_state_update")
    bs = 4
    st = r.randn(bs, h, p, n, scale=0.5)
    A1, dt1, bias1 = -r.rand(h, lo=0.5, hi=4.0), r.randn(bs, h, scale=0.5), r.randn(h, scale=0.3)
    tied = dict(state=st, x=r.randn(bs, h, p, dtype=dtype),
                dt=dt1[..., None].expand(bs, h, p).to(dtype),
                A=A1[:, None, None].expand(h, p, n), B=r.randn(bs, g, n, dtype=dtype),
                C=r.randn(bs, g, n, dtype=dtype), D=r.randn(h)[:, None].expand(h, p),
                dt_bias=bias1[:, None].expand(h, p))
    untied = {**tied, "dt": r.randn(bs, h, p, scale=0.5, dtype=dtype),
              "A": -r.rand(h, p, n, lo=0.5, hi=4.0), "z": r.randn(bs, h, p, dtype=dtype),
              "D": r.randn(h, p), "dt_bias": r.randn(h, p, scale=0.3)}

    def update_case(label, inputs):
        def run_o(a):
            a = dict(a)
            y = update(**a, dt_softplus=True)
            return y, a["state"]

        def run_s(a):
            a = dict(a)
            y = ssmc_mamba.selective_state_update(**a, dt_softplus=True, backend=backend)
            return y, a["state"]
        return ("selective_state_update", label, run_o if update else None, run_s, inputs, (),
                why_u)

    yield update_case("Mamba-2 tied (state after)", tied)
    yield update_case("per-channel dt/A, z (state after)", untied)

    scan, why_s = selective_scan_original()
    d, L, ns = (64, 200, 16) if not quick else (16, 50, 8)
    s6 = dict(u=r.randn(b, d, L, dtype=dtype), delta=r.randn(b, d, L, scale=0.5, dtype=dtype),
              A=-r.rand(d, ns, lo=0.5, hi=4.0), B=r.randn(b, ns, L, dtype=dtype),
              C=r.randn(b, ns, L, dtype=dtype), D=r.randn(d), z=r.randn(b, d, L, dtype=dtype),
              delta_bias=r.randn(d, scale=0.3))

    def no_state_grad(result):  # selective_scan_fn does not differentiate its last state
        return (result[0], result[1].detach()) if isinstance(result, tuple) else result

    def s6_case(label, inputs, kw):
        def run_o(a):
            return no_state_grad(scan(**a, **kw))

        def run_s(a):
            return no_state_grad(ssmc_mamba.selective_scan_fn(**a, **kw, backend=backend))
        return ("selective_scan_fn", label, run_o if scan else None, run_s, inputs,
                ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), why_s)

    vs = " (vs ref)" if scan is not None and scan.__name__ == "selective_scan_ref" else ""
    yield s6_case("B, C (b, n, l), last state" + vs, s6,
                  dict(delta_softplus=True, return_last_state=True))
    yield s6_case("B, C (b, g, n, l)" + vs, {**s6, "B": r.randn(b, 2, ns, L, dtype=dtype),
                                        "C": r.randn(b, 2, ns, L, dtype=dtype)},
                  dict(delta_softplus=True))


def fla_cases(dev, dtype, quick, backend):
    simple, why = original("fla.ops.simple_gla", "chunk_simple_gla")
    recur, why_r = original("fla.ops.simple_gla", "fused_recurrent_simple_gla")
    gla, why_g = original("fla.ops.gla", "chunk_gla")
    B, T, H, K, V = (2, 300, 4, 64, 64) if not quick else (1, 100, 2, 32, 32)
    r = Gen(1, dev)
    qkv = dict(q=r.randn(B, T, H, K, dtype=dtype), k=r.randn(B, T, H, K, dtype=dtype),
               v=r.randn(B, T, H, V, dtype=dtype))
    g = F.logsigmoid(r.randn(B, T, H) + 3).to(dtype)
    gk = F.logsigmoid(r.randn(B, T, H, K) + 3).to(dtype)
    h0 = r.randn(B, H, K, V, scale=0.5)
    grads = ("q", "k", "v", "g", "initial_state")  # FLA does not differentiate g_gamma

    def case(name, fn, shim, label, inputs, kw, reason):
        def run_o(a):
            return fn(**a, **kw)

        def run_s(a):
            return shim(**a, **kw, backend=backend)
        return (name, label, run_o if fn else None, run_s, inputs, grads, reason)

    final = dict(output_final_state=True)
    yield case("chunk_simple_gla", simple, ssmc_fla.chunk_simple_gla, "g, h0, final",
               {**qkv, "g": g, "initial_state": h0}, final, why)
    yield case("chunk_simple_gla", simple, ssmc_fla.chunk_simple_gla, "g_gamma, scale=0.1",
               {**qkv, "g_gamma": -r.rand(H, lo=0.01, hi=0.3)}, dict(scale=0.1, **final), why)
    n1 = T // 3
    cu = torch.tensor([0, n1, T], device=dev, dtype=torch.long)
    packed = {k: v[:1] for k, v in qkv.items()}
    yield case("chunk_simple_gla", simple, ssmc_fla.chunk_simple_gla, "varlen, h0",
               {**packed, "g": g[:1], "initial_state": r.randn(2, H, K, V, scale=0.5)},
               dict(cu_seqlens=cu, **final), why)
    for reverse in (False, True):
        yield case("fused_recurrent_simple_gla", recur, ssmc_fla.fused_recurrent_simple_gla,
                   f"g, h0, reverse={reverse}", {**qkv, "g": g, "initial_state": h0},
                   dict(reverse=reverse, **final), why_r)
    yield case("chunk_gla", gla, ssmc_fla.chunk_gla, "gk, h0, final",
               {**qkv, "g": gk, "initial_state": h0}, final, why_g)
    yield case("chunk_gla", gla, ssmc_fla.chunk_gla, "varlen",
               {**packed, "g": gk[:1]}, dict(cu_seqlens=cu, **final), why_g)


CASES = {"mamba_ssm": mamba_cases, "fla": fla_cases}


def run_cases(functions, dtypes, quick, backend) -> int:
    """Print one row per case; returns the number of failed cases."""
    failed = 0
    for dname in dtypes:
        dtype = getattr(torch, dname)
        tol_out, tol_grad = TOL[dtype]
        for lib, gen in CASES.items():
            if not set(FUNCTIONS[lib]) & set(functions):
                continue
            for name, label, run_o, run_s, inputs, grad_names, why in gen("cuda", dtype, quick,
                                                                          backend):
                if name not in functions:
                    continue
                prefix = f"{name:<27} {label:<38} {dname[:8]:<8}"
                if run_o is None:
                    print(f"{prefix} {'':>9} {'':>9} {'':>9} {'':<15} skip: {why}", flush=True)
                    continue
                try:
                    out_err, st_err, (g_err, g_name), note = compare(run_o, run_s, inputs,
                                                                     grad_names, dtype)
                except Exception as e:  # noqa: BLE001 - one failing case does not stop the table
                    failed += 1
                    print(f"{prefix} FAIL: {type(e).__name__}: {str(e)[:150]}", flush=True)
                    if "--verbose" in sys.argv:
                        traceback.print_exc()
                    continue
                ok = out_err <= tol_out and not st_err > tol_out and not g_err > tol_grad
                failed += not ok
                status = ("PASS" if ok else "FAIL") + (f" ({note})" if note else "")
                print(f"{prefix} {out_err:9.2e} {st_err:9.2e} {g_err:9.2e} {g_name:<15} {status}",
                      flush=True)
    return failed


def run_jobs(args, functions, dtypes) -> int:
    """Each (function, dtype) in a child process, args.jobs at a time; a unit's rows are printed
    when it ends, so a run stopped early still shows the units that finished."""
    passthrough = [f"--backend={args.backend}", f"--original-configs={args.original_configs}"] \
        + ["--quick"] * args.quick + ["--fla-hopper-bwd"] * args.fla_hopper_bwd

    def child(fn, dname):
        cmd = [sys.executable, __file__, *passthrough, f"--functions={fn}", f"--dtypes={dname}",
               "--rows-only"]
        return subprocess.run(cmd, capture_output=True, text=True)

    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        units = {pool.submit(child, fn, d): (fn, d) for d in dtypes for fn in functions}
        for done in as_completed(units):
            (fn, dname), res = units[done], done.result()
            rows, sep, count = res.stdout.rpartition("# failed: ")
            print(rows if sep else res.stdout, end="", flush=True)
            if sep:
                failed += int(count.split()[0])
            else:  # the child died before its summary line
                failed += 1
                print(f"{fn:<27} {'(process)':<38} {dname[:8]:<8} FAIL: exit {res.returncode}: "
                      f"{res.stderr.strip()[-300:]}", flush=True)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--only", choices=tuple(FUNCTIONS),
                    help="one library's shims (the other's first-use autotuning takes minutes)")
    ap.add_argument("--functions", help="comma-separated original function names")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run each (function, dtype) in its own process, this many at a time")
    ap.add_argument("--fla-hopper-bwd", action="store_true",
                    help="lift FLA's refusal of its gated backward on Hopper with Triton < 3.7.1")
    ap.add_argument("--original-configs", type=int, default=0, metavar="K",
                    help="the originals' Triton autotuners try K configs each (0: all)")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    libraries = [args.only] if args.only else list(FUNCTIONS)
    known = [fn for lib in libraries for fn in FUNCTIONS[lib]]
    functions = args.functions.split(",") if args.functions else known
    unknown = sorted(set(functions) - set(known))
    if unknown:
        ap.error(f"--functions: unknown {', '.join(unknown)} (expected some of "
                 f"{', '.join(known)})")
    if args.original_configs < 0 or args.jobs < 1:
        ap.error("--original-configs must be >= 0 and --jobs >= 1")
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if getattr(torch, d, None) not in TOL]
    if bad:
        ap.error(f"--dtypes: {', '.join(bad)} not supported (expected float32 and/or bfloat16)")
    if not torch.cuda.is_available():
        print("compat_gpu_check: needs a CUDA GPU (the originals are Triton/CUDA kernels)")
        return 2
    if args.fla_hopper_bwd:
        allow_fla_hopper_bwd()
    if args.original_configs:
        limit_autotuning(args.original_configs)
    if args.rows_only:
        failed = run_cases(functions, dtypes, args.quick, args.backend)
        print(f"# failed: {failed}")
        return 1 if failed else 0
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  ssmc backend "
          f"{args.backend}" + ("  (FLA's Hopper backward guard lifted)" * args.fla_hopper_bwd)
          + (f"  (originals autotune over {args.original_configs} configs)"
             * bool(args.original_configs)))
    header = (f"{'function':<27} {'case':<38} {'dtype':<8} {'out err':>9} {'state err':>9} "
              f"{'grad err':>9} {'(worst)':<15} status")
    print(header)
    print("-" * len(header))
    if args.jobs > 1:
        failed = run_jobs(args, functions, dtypes)
    else:
        failed = run_cases(functions, dtypes, args.quick, args.backend)
    print(f"# tolerances (relative L2): float32 out {TOL[torch.float32][0]:.0e} grad "
          f"{TOL[torch.float32][1]:.0e}; bfloat16 out {TOL[torch.bfloat16][0]:.0e} grad "
          f"{TOL[torch.bfloat16][1]:.0e}")
    print(f"# {failed} case(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
