"""The `ssmc` command line.

    ssmc explain ssmc.ops.ssd:mamba2 --shape b=8,t=4096,h=80,p=64,n=128,g=1 --device h100

Each subcommand is one entry in `SUBCOMMANDS`: its name maps to `(add_arguments, run)`, where
`add_arguments(parser)` declares its options on an argparse sub-parser and `run(args)` does the
work and returns the exit status. The first line of `run`'s docstring is its help text. The
commands are explain, tune, compile and export; adding `bench` is one function pair and one
line in the dict.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import sympy as sp
import torch

from . import config
from ._version import __version__
from .api import Definition
from .validate import complete_sizes
from .autotune import tuner as tuner_mod
from .autotune.cache import (TuneCache, TuneKey, all_caches, device_slug,
                             export_defaults)
from .autotune.measure import Settings
from .autotune.space import Config
from .backends import registered
from .backends.tvm.export import TARGETS, export
from .errors import SSMCError
from .ir import AXES, DecayKind, print_program
from .ir.nodes import AXIS_ROLES
from .devices import DEVICES, DeviceLimits, device_model, gpu_model
from .lowerings import legal_lowerings, lowering_costs, lowering_names
from .plan import Plan
from .planner import candidates, choose

PROG = "ssmc"


class CLIError(SSMCError, ValueError):
    """A bad command-line argument; main() prints it and exits with status 2."""


# -- shared helpers (for every subcommand that takes a definition, a shape, a dtype) ---------

DTYPES = {  # accepted spelling -> (short name, bytes per element)
    "bf16": ("bf16", 2), "bfloat16": ("bf16", 2),
    "fp16": ("fp16", 2), "float16": ("fp16", 2), "half": ("fp16", 2),
    "fp32": ("fp32", 4), "float32": ("fp32", 4), "float": ("fp32", 4),
    "fp64": ("fp64", 8), "float64": ("fp64", 8), "double": ("fp64", 8),
}

DECAY_DESCRIPTIONS = {
    DecayKind.NONE: "no decay: the state accumulates (plain cumulative sum)",
    DecayKind.TIME_INVARIANT: "time-invariant: no 't' axis (per head, maybe per key)",
    DecayKind.SCALAR: "scalar per step and head (b t h)",
    DecayKind.DIAGONAL: "diagonal over the key dim (b t h n)",
    DecayKind.FULL: "full elementwise: varies over the value dim 'p' too",
}


def load_definition(target: str) -> Definition:
    """`MODULE:ATTR` -> the ssmc Definition it names. MODULE is a dotted module name or the
    path of a .py file; ATTR may be dotted (`ops.mamba2`). An object that carries a definition
    as its `definition` attribute (each keyword function in ssmc.ops) stands for it, so that
    `ssmc.ops.gla:gla` works; a note on stderr says which definition was used."""
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise CLIError(f"definition {target!r} is not of the form MODULE:FUNCTION "
                       "(e.g. ssmc.ops.ssd:mamba2 or my_model.py:mamba2)")
    module = _import(module_part)
    obj = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_part if i == 0 else f"{module_part}:{'.'.join(attr.split('.')[:i])}"
            found = _definitions_in(module)
            hint = f"; definitions there: {', '.join(found)}" if found else ""
            raise CLIError(f"{where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    kind = "function" if callable(obj) else type(obj).__name__
    if not isinstance(obj, Definition) and isinstance(getattr(obj, "definition", None),
                                                      Definition):
        print(f"note: {target} is a {kind}; using its definition {target}.definition "
              f"({obj.definition.name})", file=sys.stderr)
        obj = obj.definition
    if not isinstance(obj, Definition):
        found = _definitions_in(module)
        hint = f"; definitions there: {', '.join(found)}" if found else ""
        raise CLIError(f"{target} is a {kind}, not an ssmc definition (a function decorated "
                       f"with @ssmc.ssm){hint}")
    return obj


def _import(module_part: str):
    looks_like_path = module_part.endswith(".py") or os.sep in module_part or "/" in module_part
    if looks_like_path:
        path = Path(module_part)
        if not path.is_file():
            raise CLIError(f"module file {module_part!r} does not exist")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        name = f"_ssmc_cli_{path.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so dataclasses and pickling inside it resolve the module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        if e.name and module_part.startswith(e.name):  # the module itself, not one it imports
            raise CLIError(f"no module named {module_part!r} (give a dotted module name on "
                           "sys.path or the path of a .py file)") from None
        raise


def _definitions_in(module) -> list[str]:
    return sorted(k for k, v in vars(module).items() if isinstance(v, Definition))


def parse_shape(text: str) -> dict[str, int]:
    """`b=8,t=4096,h=80` -> {'b': 8, 't': 4096, 'h': 80}; errors name the bad item."""
    sizes: dict[str, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise CLIError(f"--shape {text!r} has an empty item; expected a comma-separated "
                           "list like b=8,t=4096,h=80,p=64,n=128,g=1")
        axis, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise CLIError(f"--shape item {item!r} is not of the form axis=size (e.g. t=4096)")
        if axis not in AXES:
            raise CLIError(f"--shape item {item!r}: unknown axis {axis!r} "
                           f"(expected one of {' '.join(AXES)})")
        try:
            size = int(value)
        except ValueError:
            raise CLIError(f"--shape item {item!r}: size {value!r} is not an integer") from None
        if size <= 0:
            raise CLIError(f"--shape item {item!r}: size must be positive, got {size}")
        if axis in sizes:
            raise CLIError(f"--shape item {item!r}: axis {axis!r} is given twice")
        sizes[axis] = size
    return sizes


def resolve_sizes(program, given: dict[str, int],
                  optional: tuple[str, ...] = ()) -> tuple[dict[str, int], list[str]]:
    """Every axis size the cost model needs, following `ssmc.validate`'s rules.

    The axes the definition's inputs carry are required, except those in `optional`. The
    others take validate's defaults (`validate.complete_sizes`).
    Sizes given for axes the definition does not use are ignored; their names are returned so
    the caller can say so.
    """
    used = program.axes_present()
    missing = [a for a in AXES if a in used and a not in given and a not in optional]
    if missing:
        users = {a: [i.name for i in program.inputs if a in i.axes] for a in missing}
        first = missing[0]
        raise CLIError(f"--shape lacks axis {first!r} ({AXIS_ROLES[first]}), which "
                       f"{program.name} uses in {', '.join(repr(u) for u in users[first])}"
                       + (f"; also missing: {' '.join(missing[1:])}" if missing[1:] else ""))
    ignored = [a for a in given if a not in used]
    sizes = {a: v for a, v in given.items() if a in used}
    complete_sizes(sizes)
    if sizes["h"] % sizes["g"]:
        raise CLIError(f"--shape: heads h={sizes['h']} is not a multiple of groups "
                       f"g={sizes['g']}")
    return sizes, ignored


def _si(value: float, unit: str) -> str:
    """1.7e12 -> '1.72 T<unit>'."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.4g} {unit}".rstrip()


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


# -- explain -----------------------------------------------------------------------------

def device_at_hand() -> tuple[str, str]:
    """(cost-model device, what was found): what a call here would run on, the GPU here, else
    the CPU (TVM's LLVM target)."""
    if not torch.cuda.is_available():
        return "cpu", "no CUDA GPU here, so the CPU and TVM's LLVM target"
    name = torch.cuda.get_device_name()
    model = device_model(torch.device("cuda"))
    nearest = "" if model in name.lower() else f"; not in the cost model's table, so {model}"
    return model, f"the GPU here, {name}{nearest}"


def default_dtype(device: str) -> str:
    """The dtype to explain for when none is given: what models train in on that device."""
    return "fp32" if device == "cpu" else "bf16"


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition", metavar="MODULE:FUNCTION",
                        help="an ssmc definition, e.g. ssmc.ops.ssd:mamba2 or model.py:mamba2")
    parser.add_argument("--shape", required=True,
                        help="axis sizes, e.g. b=8,t=4096,h=80,p=64,n=128,g=1; every axis the "
                             "definition uses is required")
    parser.add_argument("--device", default=None, choices=sorted(DEVICES),
                        help="device model for the cost estimate (default: the GPU here, else "
                             "cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="input dtype; sets the bytes per element E (default: fp32 for "
                             "--device cpu, else bf16)")
    parser.add_argument("--chunk", type=int, default=64,
                        help="chunk size Q of the chunked lowering (default: 64)")


_COST_FIELDS = (  # (Cost attribute, label, unit)
    ("tensor_flops", "tensor-core FLOPs", "FLOP"),
    ("vector_flops", "vector FLOPs", "FLOP"),
    ("bytes", "memory traffic", "B"),
    ("serial_steps", "serial steps", ""),
    ("launches", "kernel launches", ""),
)


def run_explain(args: argparse.Namespace) -> int:
    """Show a definition's IR, decay structure, cost per lowering and the chosen lowering."""
    if args.chunk <= 0:
        raise CLIError(f"--chunk must be positive, got {args.chunk}")
    definition = load_definition(args.definition)
    program = definition.program
    given = parse_shape(args.shape)
    sizes, ignored = resolve_sizes(program, given)
    hand_device, found = device_at_hand()
    device = args.device or hand_device
    dtype, elem_bytes = DTYPES[args.dtype or default_dtype(device)]
    # the planner's own choice: among the lowerings a backend for that device implements
    base = Plan(program=program, lowering="scan", dtype=TORCH_DTYPES[dtype])
    choice, _ = choose(program, config.backend(), "cpu" if device == "cpu" else "cuda", sizes,
                       base, model=device, chunk=args.chunk)
    estimates = {e.lowering: e for e in choice.estimates}
    chunk = min(args.chunk, max(sizes["t"], 16))  # what choose_lowering substitutes for Q

    out = []
    out.append(f"definition: {args.definition} ({program.name})")
    out.append("shape: " + " ".join(f"{a}={sizes[a]}" for a in AXES if a in sizes)
               + f"   dtype: {dtype} (E={elem_bytes} bytes)   device: {device}")
    if args.device is None:
        out.append(f"device {device} by default: {found} (--device overrides)")
    if args.dtype is None:
        out.append(f"dtype {dtype} by default on {device} (--dtype overrides)")
    if ignored:
        out.append(f"note: {program.name} does not use axis {', '.join(ignored)}; ignored")
    out += ["", "== IR ==", print_program(program), ""]
    out.append("== decay ==")
    out.append(f"kind: {program.decay_kind.value} - {DECAY_DESCRIPTIONS[program.decay_kind]}")
    decay = program.recurrence.decay
    if decay is not None:
        out.append(f"decay over [{' '.join(decay.axes)}]: {sp.sstr(decay.expr)}")
    if program.log_decay is not None:
        out.append(f"log decay: {sp.sstr(program.log_decay.expr)}")
    out.append(f"legal lowerings: {', '.join(legal_lowerings(program))}")
    out.append("")
    out.append(f"== cost per lowering (Q = chunk = {chunk}, E = {elem_bytes}) ==")
    for name, cost in lowering_costs(program).items():
        est = estimates[name]
        status = f"estimated {_seconds(est.seconds)}" if est.legal else est.reason
        out.append(f"{name}: {status}")
        for attr, label, unit in _COST_FIELDS:
            formula = getattr(cost, attr)
            value = est.values[attr]
            shown = _si(value, unit) if unit else f"{value:g}"
            out.append(f"  {label:<18} {sp.sstr(formula)}  =  {shown}")
    out.append("")
    out.append("== choice ==")
    out.append(f"chosen lowering: {choice.lowering}")
    out.append(f"why: {choice.explanation}")
    print("\n".join(out))
    return 0


# -- tune --------------------------------------------------------------------------------

TUNE_LOWERINGS = ("all",) + lowering_names()
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition", nargs="?", metavar="MODULE:FUNCTION",
                        help="an ssmc definition, e.g. ssmc.ops.ssd:mamba2 or model.py:mamba2")
    parser.add_argument("--shape", action="append", default=[],
                        help="axis sizes, e.g. b=8,t=4096,h=80,p=64,n=128,g=1; repeat the "
                             "option to tune several shapes")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="input dtype (default: bf16)")
    parser.add_argument("--lowering", default="all", choices=TUNE_LOWERINGS,
                        help="tune across every legal lowering (all, what lowering='auto' ops "
                             "use) or within one (default: all)")
    parser.add_argument("--backend", default="auto", choices=config.BACKENDS,
                        help="backend policy, as in ssmc.compile (default: auto)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda; cpu must be asked for)")
    parser.add_argument("--initial-state", action="store_true",
                        help="tune calls that pass initial_state")
    parser.add_argument("--final-state", action="store_true",
                        help="tune calls with return_final_state=True")
    parser.add_argument("--max-configs", type=int, default=128,
                        help="measure at most this many configs per shape (default: 128)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="stop measuring new configs after this long per shape")
    parser.add_argument("--force", action="store_true",
                        help="tune even where the cache has an entry, and overwrite it")
    parser.add_argument("--top", type=int, default=10,
                        help="rows of the final table (default: 10)")
    parser.add_argument("--show", action="store_true",
                        help="list the tuning cache (every device and stack) and exit")
    parser.add_argument("--export-defaults", metavar="FILE",
                        help="write this device's cache as a shipped-defaults file "
                             "(ssmc/autotune/defaults/<gpu>.json) and exit")


def _tune_device(text: str | None):
    if text is None:
        if not torch.cuda.is_available():
            raise CLIError("no CUDA GPU here: tuning measures on the device (pass --device cpu "
                           "to tune the CPU backends, or --show to list the cache)")
        return torch.device("cuda", torch.cuda.current_device())
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {text!r} is not a torch device (cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: no CUDA GPU here")
    if device.type not in ("cuda", "cpu"):
        raise CLIError(f"--device {text!r}: only cuda and cpu are tuned")
    return device


def _ms(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _tune_table(record: dict, top: int) -> list[str]:
    results = record.get("results", [])
    default_ms = record.get("default_ms")
    ok = sorted((r for r in results if r["status"] == "ok"), key=lambda r: r["median_ms"])
    bad = [r for r in results if r["status"] not in ("ok", "skipped")]
    skipped = sum(r["status"] == "skipped" for r in results)
    rows = [("#", "config", "median ms", "speedup", "status")]
    winner = record.get("config")
    for i, r in enumerate(ok[:top], 1):
        speed = f"{default_ms / r['median_ms']:.2f}x" if default_ms and r["median_ms"] else "-"
        mark = " *" if r["config"] == winner else ""
        rows.append((str(i), Config.from_json(r["config"]).label() + mark, _ms(r["median_ms"]),
                     speed, r["status"]))
    for r in bad[:top]:
        rows.append(("-", Config.from_json(r["config"]).label(), "-", "-",
                     f"{r['status']}: {r['error'][:60]}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]
           for row in rows]
    n_ok = len(ok)
    out.append(f"{n_ok} ok, {len(bad)} failed/timed out/mismatched, {skipped} skipped, "
               f"{record.get('pruned', 0)} pruned before measuring; * = stored")
    return out


def device_slug_of(cache) -> str:
    return device_slug(cache.env)


def _show_cache() -> int:
    root = config.cache_dir() / "autotune"
    caches = all_caches(root)
    if not any(entries for _, _, entries in caches):
        print(f"no tuned configs under {root}")
        return 0
    for directory, env, entries in caches:
        if not entries:
            continue
        env = env or {}
        stack = ", ".join(f"{k} {env[k]}" for k in ("capability", "cuda", "driver", "triton",
                                                      "tvm", "torch", "ssmc") if k in env)
        gpu = env.get("gpu", "?")
        print(f"== {gpu if gpu != 'none' else env.get('cpu_model', 'cpu')}"
              f" ({stack}) [{directory.parent.name}/{directory.name}]")
        rows = [("key", "config", "median ms", "speedup", "tuned shape")]
        for path, rec in entries:
            if rec is None:
                rows.append((path.stem, "(corrupt: will be re-tuned)", "-", "-", "-"))
                continue
            sp_ = rec.get("speedup")
            shape = ",".join(f"{a}={v}" for a, v in rec.get("shape", {}).items())
            rows.append((rec.get("key", path.stem), rec.get("label", "?"),
                         _ms(rec.get("median_ms")), "-" if sp_ is None else f"{sp_:.2f}x",
                         shape))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def run_tune(args: argparse.Namespace) -> int:
    """Measure configs (lowering, chunk, blocks, warps, stages) on this GPU and cache the best."""
    if args.show:
        return _show_cache()
    if args.export_defaults:
        device = _tune_device(args.device)
        cache = TuneCache.for_device(device)
        model = gpu_model(device) or device_slug_of(cache)
        n = export_defaults(cache, model, Path(args.export_defaults))
        print(f"wrote {n} tuned configs for {cache.env.get('gpu')} to {args.export_defaults}")
        return 0
    if not args.definition:
        raise CLIError("give a definition (MODULE:FUNCTION), --show or --export-defaults")
    if not args.shape:
        raise CLIError("--shape is required (e.g. --shape b=8,t=4096,h=80,p=64,n=128,g=1)")
    if args.max_configs <= 0:
        raise CLIError(f"--max-configs must be positive, got {args.max_configs}")
    definition = load_definition(args.definition)
    program = definition.program
    device = _tune_device(args.device)
    dtype_name = TORCH_DTYPES[DTYPES[args.dtype][0]]
    dtype = getattr(torch, dtype_name)
    limits = DeviceLimits.from_device(device)
    cache = TuneCache.for_device(device)
    settings = Settings(max_configs=args.max_configs, budget_s=args.budget)
    tuner = tuner_mod.default_tuner(settings, progress=None)
    backend_name = args.backend
    if backend_name == "auto":
        backend_name = config.backend()
    policy = "auto" if args.lowering == "all" else args.lowering
    status = 0
    for text in args.shape:
        sizes, ignored = resolve_sizes(program, parse_shape(text))
        base = Plan(program=program, lowering="scan", dtype=dtype_name,
                    has_initial_state=args.initial_state, return_final_state=args.final_state)
        allowed = candidates(program, backend_name, device, base)
        if policy != "auto":
            if policy not in allowed:
                raise CLIError(f"--lowering {policy}: not legal or not implemented for "
                               f"{program.name} on {device} (available: {', '.join(allowed)})")
            allowed = [policy]
        if not allowed:
            raise CLIError(f"no backend implements any lowering of {program.name} on {device}")
        default_lowering = choose(program, backend_name, device, sizes, base,
                                  among=allowed)[0].lowering
        base = dataclasses.replace(base, lowering=default_lowering)
        shape_text = " ".join(f"{a}={sizes[a]}" for a in AXES if a in sizes)
        print(f"{program.name} {shape_text} {args.dtype} lowering={args.lowering} on "
              f"{limits.name}" + (f" (ignored: {' '.join(ignored)})" if ignored else ""))

        def task_for(style):
            first = tuner_mod.random_set(program, sizes, dtype, device, style,
                                         initial_state=args.initial_state,
                                         directions=len(program.recurrence.directions))
            return tuner_mod.make_task(
                program, backend_name=backend_name, lowering_policy=policy, lowerings=allowed,
                default_lowering=default_lowering, base=base, sizes=sizes, device=device,
                input_sets=tuner_mod.rotating_sets(first, limits.l2_bytes), limits=limits,
                device_model=device_model(device), max_configs=args.max_configs)

        def tune():
            task = None
            for style in tuner_mod.INPUT_STYLES:  # inputs on which the default is finite
                task = task_for(style)
                try:
                    out = task.build(task.space.default)(0)
                    if bool(torch.isfinite(out[0]).all()):
                        break
                except Exception:  # noqa: BLE001 - the tuner records the failure itself
                    break
            print(f"  {len(task.space)} configs to measure, {len(task.space.pruned)} pruned")
            result = tuner.tune(task, device)
            return result.record()

        key = TuneKey.make(program, backend=backend_name, lowering=policy, dtype=dtype_name,
                           sizes=sizes, has_initial_state=args.initial_state,
                           return_final_state=args.final_state)
        if args.force:
            record = tune()
            how = "tuned"
            if record is not None:
                cache.store(key, record)
        else:
            record, how = cache.get_or_tune(key, tune)
        if record is None:
            print("  every config failed; nothing stored", file=sys.stderr)
            status = 1
            continue
        if how != "tuned":
            print(f"  cached ({how}); --force to tune again")
        print("\n".join("  " + line for line in _tune_table(record, args.top)))
        speed = record.get("speedup")
        print(f"  stored {key.text()}: {record['label']} {_ms(record['median_ms'])} ms"
              + ("" if speed is None else f" ({speed:.2f}x over the default)"))
    return status


# -- compile ----------------------------------------------------------------------------

EMIT_LOWERINGS = ("all",) + lowering_names()
EXPORT_LOWERINGS = EMIT_LOWERINGS[1:]


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition", metavar="MODULE:FUNCTION",
                        help="an ssmc definition, e.g. ssmc.ops.ssd:mamba2")
    parser.add_argument("--emit", required=True, choices=("triton", "tvm"),
                        help="print the generated kernel source of this backend")
    parser.add_argument("--lowering", default="all", choices=EMIT_LOWERINGS,
                        help="which lowering (default: every legal one)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="input dtype (default: bf16)")
    parser.add_argument("--shape", default=None,
                        help="axis sizes; needed for --emit tvm, which specialises h, g, n, p")
    add_kernel_features(parser)


def add_kernel_features(parser: argparse.ArgumentParser) -> None:
    """The call features a kernel is built for (compile and export build one kernel each)."""
    parser.add_argument("--initial-state", action="store_true",
                        help="the kernel takes an initial_state")
    parser.add_argument("--final-state", action="store_true",
                        help="the kernel returns the final state")
    parser.add_argument("--varlen", action="store_true",
                        help="packed sequences (cu_seqlens, int32)")


def run_compile(args: argparse.Namespace) -> int:
    """Print the kernel source a backend generates for a definition."""
    definition = load_definition(args.definition)
    program = definition.program
    legal = legal_lowerings(program)
    lowerings = legal if args.lowering == "all" else (args.lowering,)
    if args.lowering != "all" and args.lowering not in legal:
        raise CLIError(f"--lowering {args.lowering} is not legal for decay kind "
                       f"{program.decay_kind.value!r}; legal: {', '.join(legal)}")
    backend = registered().get(args.emit)
    if backend is None or not backend.is_available():
        raise CLIError(f"the {args.emit} backend is not available here")
    sizes = None
    if args.emit == "tvm":
        if args.shape is None:
            raise CLIError("--emit tvm needs --shape (TVM kernels specialise h, g, n and p)")
        sizes, _ = resolve_sizes(program, parse_shape(args.shape))
    dtype = TORCH_DTYPES[DTYPES[args.dtype][0]]
    for lowering in lowerings:
        plan = Plan(program=program, lowering=lowering, dtype=dtype,
                    has_initial_state=args.initial_state, return_final_state=args.final_state,
                    varlen=args.varlen)
        why = backend.supports(plan)
        print(f"# ==== {args.emit} / {lowering} / {plan.cache_key(backend.cache_tag())} ====")
        if why is not None:
            print(f"# not supported: {why}\n")
            continue
        print(backend.source(plan, sizes))
    return 0


# -- export -----------------------------------------------------------------------------

#: axes an export leaves symbolic: each call may have its own batch and length
SYMBOLIC_AXES = ("b", "t")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition", metavar="MODULE:FUNCTION",
                        help="an ssmc definition, e.g. ssmc.ops.gla:definition or model.py:mamba2")
    parser.add_argument("--target", required=True, choices=TARGETS,
                        help="llvm (the CPU; generic x86-64 code) or cuda (built with "
                             "nvcc for --arch)")
    parser.add_argument("--arch", default=None,
                        help="CUDA architecture of --target cuda (default: sm_90)")
    parser.add_argument("--shape", required=True,
                        help="sizes of the axes h, g, n, p the definition uses, e.g. "
                             "h=8,g=1,n=64,p=64; b and t stay free at call time")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="the inputs' and output's dtype (default: fp32)")
    parser.add_argument("--lowering", default="scan", choices=EXPORT_LOWERINGS,
                        help="scan (every decay, every target), chunked, or quadratic (llvm "
                             "only) (default: scan)")
    parser.add_argument("--chunk", type=int, default=64,
                        help="chunk size of the chunked lowering (default: 64)")
    add_kernel_features(parser)
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="directory to write (created if missing)")


def run_export(args: argparse.Namespace) -> int:
    """Compile one specialisation ahead of time into a directory that ssmc.load() runs."""
    if args.arch is not None and args.target != "cuda":
        raise CLIError(f"--arch {args.arch} applies to --target cuda only")
    if args.chunk <= 0:
        raise CLIError(f"--chunk must be positive, got {args.chunk}")
    definition = load_definition(args.definition)
    program = definition.program
    given = parse_shape(args.shape)
    sizes, ignored = resolve_sizes(program, given, optional=SYMBOLIC_AXES)
    free = [a for a in SYMBOLIC_AXES if a in given]
    if free:
        print(f"note: {' and '.join(free)} {'stay' if len(free) > 1 else 'stays'} free in an "
              "export; the size given is ignored", file=sys.stderr)
    if ignored:
        print(f"note: {program.name} does not use axis {', '.join(ignored)}; ignored",
              file=sys.stderr)
    dtype = TORCH_DTYPES[DTYPES[args.dtype][0]]
    arch = args.arch or "sm_90"
    out = export(definition, target=args.target, arch=arch,
                 shapes={a: sizes[a] for a in "hgnp"}, out_dir=args.output,
                 lowering=args.lowering, dtype=dtype, initial_state=args.initial_state,
                 return_final_state=args.final_state, varlen=args.varlen, chunk_size=args.chunk)
    where = f"{args.target} {arch}" if args.target == "cuda" else args.target
    print(f"exported {program.name}: {args.lowering} lowering for {where}, "
          + " ".join(f"{a}={sizes[a]}" for a in "hgnp") + f", {dtype}; b and t free")
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    print(f"load it with ssmc.load({str(out)!r})")
    return 0


Subcommand = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: name -> (add_arguments, run); one entry per subcommand
SUBCOMMANDS: dict[str, Subcommand] = {
    "explain": (add_explain_arguments, run_explain),
    "tune": (add_tune_arguments, run_tune),
    "compile": (add_compile_arguments, run_compile),
    "export": (add_export_arguments, run_export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Compile state-space-model "
                                     "recurrences into fast kernels.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, run) in SUBCOMMANDS.items():
        help_text = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run, _command=name)
    return parser


#: the exit status of a command whose reader went away (`ssmc explain ... | head -1`): 128 +
#: SIGPIPE, what a shell reports for a tool that SIGPIPE ended
BROKEN_PIPE_STATUS = 141


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's final flush
        return status
    except BrokenPipeError:
        # the rest of the output has nowhere to go: point stdout at /dev/null so that the
        # interpreter's flush at exit does not report the same error again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout is not a file (captured output)
            pass
        return BROKEN_PIPE_STATUS


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f"{PROG} {args._command}: error: {e}", file=sys.stderr)
        return 2
    except SSMCError as e:  # a bad definition (SpecError) and the like: no traceback
        print(f"{PROG} {args._command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
