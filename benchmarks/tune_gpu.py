"""Autotuner benchmark: untuned vs tuned ssd (forward, forward+backward), selective_scan and gla.

On the GPU (one process, about 5 minutes: no shape is started after --budget-s seconds):

    PYTHONPATH=$PWD python3 benchmarks/tune_gpu.py --budget-s 330 \
        --out $OUT/tune.md --json $OUT/tune.json

(`--ops ssd` and `--ops selective_scan,gla` split it over two runs if one is not enough.)

On the CPU (Triton interpreter, tiny shapes; checks the code path, the times mean nothing):

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python3 benchmarks/tune_gpu.py --quick --device cpu

Per op and shape (bf16): the op is timed untuned (SSMC_AUTOTUNE=off: the cost model's lowering
with the backend's built-in tiles), then tuned with the tuner's public API exactly as implicit
tuning does (ssmc.autotune.tuner: make_task over every legal lowering, Tuner.tune, the record
stored in a fresh SSMC_CACHE_DIR), then timed again as a new op under SSMC_AUTOTUNE=cached, so
the tuned plan comes from the cache lookup every op call makes. The tuner tunes the forward
kernels; forward+backward (ssd) runs the backward of the tuned forward's lowering. Times are
medians of ssmc.autotune.measure.bench (CUDA events on the GPU). The tuning wall time includes
every candidate's Triton compile. For every ssd shape the script prints each lowering's cost-model
estimate and measured times, which explains the lowering the tuner picks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

import ssmc
from ssmc.devices import DeviceLimits, device_model
from ssmc.planner import candidates
from ssmc.autotune import tuner as tuner_mod
from ssmc.autotune.measure import Settings, default_timer, outputs_match
from ssmc.autotune.space import Config
from ssmc.ops.gla import build as build_gla
from ssmc.ops.selective_scan import build as build_ss
from ssmc.ops.ssd import build as build_ssd
from ssmc.validate import bind

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- ops and inputs

def ssd_inputs(s, dtype, r):
    b, t, h, p, n, g = (s[a] for a in "bthpng")
    return (r(b, t, h, p).to(dtype), (r(b, t, h) * 0.5 - 1.0).to(dtype), -torch.exp(r(h) * 0.5),
            r(b, t, g, n).to(dtype), r(b, t, g, n).to(dtype), r(h), r(b, t, h, p).to(dtype),
            r(h) * 0.1)                                 # x dt A B C D z dt_bias


def ss_inputs(s, dtype, r):
    """Mamba-1: d channels as heads with p=1, A = -(1..n) per channel (S4D-real init), dt =
    softplus(delta + bias) around 0.02, inside Mamba's dt init range [0.001, 0.1]."""
    b, t, d, n = s["b"], s["t"], s["h"], s["n"]
    A = -torch.arange(1.0, n + 1).repeat(d, 1)
    return (r(b, t, d, 1).to(dtype), (r(b, t, d) * 0.5 - 4.0).to(dtype), A,
            r(b, t, 1, n).to(dtype), r(b, t, 1, n).to(dtype), r(d), r(b, t, d, 1).to(dtype),
            r(d) * 0.1)                                 # u delta A B C D z delta_bias


def gla_inputs(s, dtype, r):
    b, t, h, n, p = (s[a] for a in "bthnp")
    return (r(b, t, h, n).to(dtype), r(b, t, h, n).to(dtype), r(b, t, h, p).to(dtype),
            F.logsigmoid(r(b, t, h, n)) / 16)           # q k v g (fp32 log-gates, as FLA)


def shapes(text: str, **fixed) -> list[dict]:
    return [dict(fixed, **dict(zip("bt", map(int, bt.split("x"))))) for bt in text.split()]


def op_table(quick: bool) -> dict:
    """op -> (definition, input maker, shapes, time forward+backward too)."""
    ssd_def = build_ssd(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True)
    ss_def = build_ss(has_D=True, has_z=True, has_delta_bias=True, delta_softplus=True)
    if quick:
        return {"ssd": (ssd_def, ssd_inputs, shapes("2x32 1x128", h=2, p=16, n=16, g=1), True),
                "selective_scan": (ss_def, ss_inputs, shapes("1x64", h=8, p=1, n=16, g=1), False),
                "gla": (build_gla(16 ** -0.5), gla_inputs, shapes("1x64", h=2, n=16, p=16),
                        False)}
    # ssd: t=256 and t=16384 first (the lowering choice to explain), as in gpu_table h80 p64 n128
    return {"ssd": (ssd_def, ssd_inputs, shapes("32x256 2x16384 8x4096", h=80, p=64, n=128, g=1),
                    True),
            "selective_scan": (ss_def, ss_inputs, shapes("32x256 8x2048 2x8192", h=2048, p=1,
                                                         n=16, g=1), False),
            "gla": (build_gla(128 ** -0.5), gla_inputs,
                    shapes("32x256 8x2048 2x8192", h=16, n=128, p=128), False)}


# --------------------------------------------------------------------------- measuring

def median_ms(fn, device, settings) -> float:
    """The tuner's own timing loop (first run untimed, warm-up, median of timed repeats)."""
    return statistics.median(default_timer(device)(lambda i: fn(), None, 1, settings))


def label(plan) -> str:
    return Config(plan.lowering, plan.tile).label()


def tune(op, args, settings):
    """What implicit tuning (tuner._tuned_plan) does for this call, with our settings; the
    record goes into the cache that SSMC_AUTOTUNE=cached reads. -> (TuneResult, wall s)."""
    bound = bind(op.program, args, {})
    device = bound.device
    plan = dataclasses.replace(op.last_plan, tile=None)         # the cost model's plan
    lowerings = candidates(op.program, op.backend_name, device, plan)
    limits = DeviceLimits.from_device(device)
    first = tuner_mod.InputSet({k: v.detach() for k, v in bound.tensors.items()})
    start = time.perf_counter()
    task = tuner_mod.make_task(
        op.program, backend_name=op.backend_name, lowering_policy=op.lowering,
        lowerings=lowerings, default_lowering=plan.lowering, base=plan, sizes=dict(bound.sizes),
        device=device, input_sets=tuner_mod.rotating_sets(first, limits.l2_bytes), limits=limits,
        device_model=device_model(device), max_configs=settings.max_configs)
    print(f"  tuning {task.describe()}", flush=True)
    with torch.no_grad():
        result = tuner_mod.Tuner(settings=settings, progress=False).tune(task, device)
    wall = time.perf_counter() - start
    record = result.record()
    if record is not None:
        tuner_mod.cache_for(device).store(task.key, record)
    return result, wall


def by_lowering(result) -> list[str]:
    """Per candidate lowering: the cost model's estimate, the measured built-in tiles and best
    config, or why it was not measured."""
    space, best = result.task.space, result.best
    lines = [(f"  picked: {best.config.label() if best else '-'}"
              f" (cost model's default: {space.default.label()})"),
             ("  | lowering | cost model est. ms | built-in tiles ms | best ms | best config "
              "| ok/tried |"),
             "  |---|---|---|---|---|---|"]
    lowerings = dict.fromkeys([c.lowering for c in space.candidates] + list(space.estimates))
    for lw in lowerings:
        est = space.estimates.get(lw)
        est = "-" if est is None else f"{est * 1e3:.4g}"
        ms = [m for m in result.measurements if m.config.lowering == lw]
        ok = sorted((m for m in ms if m.ok), key=lambda m: m.median_ms)
        base = next((f"{m.median_ms:.4g}" for m in ok if not m.config.tile), "-")
        if ok:
            lines.append(f"  | {lw} | {est} | {base} | {ok[0].median_ms:.4g} | "
                         f"{ok[0].config.label()} | {len(ok)}/{len(ms)} |")
        else:
            why = next((w for c, w in space.pruned if c.lowering == lw and not c.tile), None)
            why = why or next((f"{m.status}: {m.error[:80]}" for m in ms if not m.ok),
                              "not measured")
            lines.append(f"  | {lw} | {est} | - | - | {why} | 0/{len(ms)} |")
    return lines


def run_case(name, definition, make, sizes, grad, a, device, settings, tune_settings):
    """Rows (forward, and forward+backward if `grad`) and the lowering lines for one shape."""
    gen = torch.Generator(device=device).manual_seed(0)
    args = tuple(x.to(device) for x in make(sizes, DTYPES[a.dtype],
                 lambda *s: torch.randn(*s, device=device, generator=gen)))
    shape = " ".join(f"{k}={v}" for k, v in sizes.items())
    os.environ["SSMC_AUTOTUNE"] = "off"
    untuned = ssmc.compile(definition, backend=a.backend)
    y_off = untuned(*args)
    t_off = median_ms(lambda: untuned(*args), device, settings)
    result, wall = tune(untuned, args, tune_settings)
    os.environ["SSMC_AUTOTUNE"] = "cached"
    tuned = ssmc.compile(definition, backend=a.backend)
    y_on = tuned(*args)
    t_on = median_ms(lambda: tuned(*args), device, settings)
    check = ("untuned output not finite" if not bool(torch.isfinite(y_off).all()) else
             outputs_match((y_on, None), (y_off, None), tuned.last_plan.dtype) or "ok")
    if result.best is not None and label(tuned.last_plan) != result.best.config.label():
        print(f"  WARNING: the op ran {label(tuned.last_plan)}, not the tuned "
              f"{result.best.config.label()}", flush=True)
    n_ok = sum(m.ok for m in result.measurements)
    common = {"op": name, "shape": shape, "untuned_config": label(untuned.last_plan),
              "tuned_config": label(tuned.last_plan)}
    rows = [{**common, "pass": "fwd", "untuned_ms": t_off, "tuned_ms": t_on, "tuning_s": wall,
             "configs": f"{n_ok}/{len(result.measurements)}", "check": check}]
    if grad:
        leaves = [x.detach().clone().requires_grad_(True) for x in args]
        gy = torch.randn_like(untuned(*leaves).detach())

        def train(op):
            return lambda: torch.autograd.grad(op(*leaves), leaves, gy)
        rows.append({**common, "pass": "fwd+bwd", "tuning_s": "(fwd's)",
                     "untuned_ms": median_ms(train(untuned), device, settings),
                     "tuned_ms": median_ms(train(tuned), device, settings)})
    return rows, result


# --------------------------------------------------------------------------- output

COLUMNS = [("op", "op"), ("shape", "shape"), ("pass", "pass"), ("untuned_ms", "untuned ms"),
           ("tuned_ms", "tuned ms"), ("speedup", "speedup"), ("tuning_s", "tuning wall s"),
           ("configs", "configs ok/tried"), ("untuned_config", "untuned lowering+config"),
           ("tuned_config", "tuned lowering+config"), ("check", "tuned fwd == untuned")]


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows) -> list[str]:
    out = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "untuned_ms" in r and "tuned_ms" in r:
            r["speedup"] = r["untuned_ms"] / r["tuned_ms"]
        out.append("| " + " | ".join(fmt(r.get(k, "")) for k, _ in COLUMNS) + " |")
    return out


def write(a, header, rows, explain, records):
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join([header, ""] + table(rows) + [""] + explain) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"header": header, "rows": rows, "records": records}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--backend", default=None,
                    help="backend policy (default: auto on cuda, triton on cpu)")
    ap.add_argument("--ops", default="ssd,selective_scan,gla")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="start no new shape after this many seconds (default 330)")
    ap.add_argument("--tune-budget-s", type=float, default=25.0,
                    help="per shape: measure no new config after this many seconds")
    ap.add_argument("--max-configs", type=int, default=None,
                    help="configs per shape, default first (default 12; 4 with --quick)")
    ap.add_argument("--out", help="also write the markdown table and lowering tables here")
    ap.add_argument("--json", help="write rows and full tuner records here")
    a = ap.parse_args()
    start = time.monotonic()
    device = torch.device(a.device)
    a.backend = a.backend or ("auto" if device.type == "cuda" else "triton")
    cpu = device.type != "cuda"
    if cpu:
        tuner_mod.FORCE_CPU = True              # let SSMC_AUTOTUNE=cached apply tuned plans here
    os.environ["SSMC_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssmc-tune-gpu-")  # a fresh cache
    max_configs = a.max_configs or (4 if a.quick else 12)
    # timing: ~100 ms of repeats per median on the GPU; a few runs in the CPU interpreter
    settings = (Settings(warmup_ms=0, rep_ms=0, min_reps=3, max_warmup=1, time_limit_ms=1e9)
                if cpu else Settings(warmup_ms=25, rep_ms=100, time_limit_ms=1e9))
    tune_base = (Settings(warmup_ms=0, rep_ms=0, min_reps=2, max_warmup=1, time_limit_ms=1e9)
                 if cpu else Settings(warmup_ms=10, rep_ms=40))
    import triton
    where = (f"cpu (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})" if cpu
             else torch.cuda.get_device_name(device))
    header = (f"device: {where}; torch {torch.__version__}, triton {triton.__version__}, "
              f"ssmc {ssmc.__version__}; {a.dtype}, backend {a.backend}, max {max_configs} "
              f"configs and {a.tune_budget_s:g} s per tuning, lowering all")
    print(header, flush=True)
    ops = op_table(a.quick)
    rows, explain, records = [], [], {}
    for name in a.ops.split(","):
        definition, make, op_shapes, grad = ops[name]
        for sizes in op_shapes:
            left = a.budget_s - (time.monotonic() - start)
            shape = " ".join(f"{k}={v}" for k, v in sizes.items())
            if left <= 0:
                print(f"# {name} {shape}: skipped, --budget-s {a.budget_s:g} spent", flush=True)
                rows.append({"op": name, "shape": shape, "pass": "skipped (budget)"})
                continue
            print(f"# {name} {shape} ({time.monotonic() - start:.0f} s)", flush=True)
            tune_settings = dataclasses.replace(tune_base, max_configs=max_configs,
                                                budget_s=min(a.tune_budget_s, left))
            try:
                new, result = run_case(name, definition, make, sizes, grad, a, device,
                                       settings, tune_settings)
            except Exception as e:  # noqa: BLE001 - one failing shape must not hide the rest
                traceback.print_exc()
                rows.append({"op": name, "shape": shape, "pass": f"error: {e!r}"[:120]})
                continue
            finally:
                if not cpu:
                    torch.cuda.empty_cache()
            rows += new
            records[f"{name} {shape}"] = result.record()
            for line in table(new)[2:]:
                print(line, flush=True)
            if name == "ssd":
                lines = [(f"ssd {shape}: lowering candidates ({len(result.task.space.pruned)} "
                          "more configs not measured: pruned or beyond max configs)")]
                lines += by_lowering(result)
                print("\n".join(lines), flush=True)
                explain += lines + [""]
            write(a, header, rows, explain, records)
    print(f"\n## tuned vs untuned ({time.monotonic() - start:.0f} s in all)\n", flush=True)
    print("\n".join(table(rows)))
    print("\n" + "\n".join(explain), flush=True)
    write(a, header, rows, explain, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
