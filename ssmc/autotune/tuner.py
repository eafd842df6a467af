"""The tuner and the policy: measure a search space, check the winner, store it; and decide, per
call signature, whether to look up, tune, or leave the cost model's plan alone.

`SSMC_AUTOTUNE` (ssmc.config.autotune):

- `off`: the cost model's lowering with the backends' built-in tiles; no cache, no measuring.
- `cached`: the tuning cache, then the shipped defaults (`defaults/<gpu>.json`); never measures.
- `full` (the default): as `cached`, and a shape bucket found in neither is tuned on first use,
  with a one-line log and, on a terminal, a progress bar.

Implicit tuning happens only on CUDA devices (`FORCE_CPU` lets tests tune on the CPU; a config
stored for the CPU by `ssmc tune` is used there) and never
while torch.compile traces. Any failure in here falls back to the untuned plan with a one-time
message: tuning can make an op faster, never break it.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import config
from .._version import __version__
from ..backends.base import compile_plan, first_available
from ..devices import device_model, gpu_model
from ..errors import DeviceLostError
from ..ir.orders import default_grid
from ..plan import Plan
from .cache import TuneCache, TuneKey, packaged_defaults, record_config, report_once
from .measure import (Measurement, Settings, Timer, default_timer, device_lost, measure,
                      outputs_match, rotation_count, tensors_bytes)
from .space import Config, DeviceLimits, Space, search_space

#: tests set this to tune implicitly on the CPU; real CPU runs never tune implicitly
FORCE_CPU = False
#: settings of implicit (first-use) tuning: a bounded search, so a first call stays tolerable
IMPLICIT_SETTINGS = Settings(warmup_ms=10.0, rep_ms=40.0, budget_s=120.0, max_configs=32)
#: a search with more configs than this shows a progress bar (on a terminal)
PROGRESS_MIN_CONFIGS = 8


# --------------------------------------------------------------------------- tasks

@dataclass
class InputSet:
    tensors: dict[str, torch.Tensor]
    initial_state: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None


@dataclass
class Task:
    """What to tune: a key, its search space, and how to build a runnable config."""

    key: TuneKey
    space: Space
    build: Callable[[Config], Callable[[int], Any]]   # run(i) -> (output, final state)
    n_inputs: int
    dtype: str
    shape: dict[str, int] = field(default_factory=dict)
    device: str = ""

    def describe(self) -> str:
        shape = " ".join(f"{a}={v}" for a, v in self.shape.items())
        where = f" on {self.device}" if self.device else ""
        return (f"{self.key.name} {self.key.lowering} {self.dtype} {shape}{where} "
                f"({len(self.space)} configs)")


def make_task(program, *, backend_name: str, lowering_policy: str, lowerings: list[str],
              default_lowering: str, base: Plan, sizes: dict[str, int], device,
              input_sets: list[InputSet], limits: DeviceLimits | None = None,
              device_model: str = "h100", max_configs: int | None = 64) -> Task:
    """A Task over the backend's real kernels, run on `input_sets` (rotated)."""
    device = torch.device(device)
    if program.on_grid and "grid_h" not in sizes:   # a cross2d kernel reads a grid's shape
        sizes = dict(sizes, **dict(zip(("grid_h", "grid_w"), default_grid(sizes["t"]))))
    limits = limits or DeviceLimits.from_device(device)
    elem = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get(base.dtype, 4)
    space_backend = first_available(backend_name, device)
    space = search_space(program, backend=space_backend,
                         lowerings=lowerings, default_lowering=default_lowering,
                         sizes=sizes, dtype=base.dtype, limits=limits, device_model=device_model,
                         elem_bytes=elem, has_initial_state=base.has_initial_state,
                         return_final_state=base.return_final_state, varlen=base.varlen,
                         max_configs=max_configs)
    key = TuneKey.make(program, backend=backend_name, lowering=lowering_policy,
                       dtype=base.dtype, sizes=sizes, has_initial_state=base.has_initial_state,
                       return_final_state=base.return_final_state, varlen=base.varlen)
    sets = list(input_sets)

    def build(cfg: Config):
        kernel = compile_plan(backend_name, device, cfg.apply(base, space_backend))

        def run(i: int):
            s = sets[i % len(sets)]
            return kernel(s.tensors, sizes, s.initial_state, s.cu_seqlens)
        return run

    return Task(key, space, build, len(sets), base.dtype, dict(sizes), str(device))


def rotating_sets(first: InputSet, l2_bytes: int) -> list[InputSet]:
    """`first` plus copies at other addresses, enough to cover twice the L2 between reuses."""
    n = rotation_count(tensors_bytes(first.tensors, first.initial_state), l2_bytes)
    sets = [first]
    for _ in range(n - 1):
        sets.append(InputSet({k: v.clone() for k, v in first.tensors.items()},
                             None if first.initial_state is None else first.initial_state.clone(),
                             first.cu_seqlens))
    return sets


#: ways to draw inputs whose outputs are finite: most decays are exp(negative) (Mamba, GLA),
#: some are a probability itself (RetNet's gamma)
INPUT_STYLES = ("negative", "unit", "normal")


def random_set(program, sizes: dict[str, int], dtype: torch.dtype, device, style: str,
               seed: int = 0, initial_state: bool = False, directions: int = 1) -> InputSet:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for inp in program.inputs:
        shape = tuple(sizes[a] for a in inp.axes)
        if style == "unit":
            x = 0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=torch.float64)
        else:
            x = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
            if style == "negative":
                x = -x.abs()
        tensors[inp.name] = x.to(dtype=dtype, device=device)
    h0 = None
    if initial_state:
        shape = (sizes["b"], sizes["h"], sizes["n"], sizes["p"])
        if directions > 1:
            shape = (directions,) + shape
        h0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(torch.float32).to(device)
    return InputSet(tensors, h0)


# --------------------------------------------------------------------------- the tuner

@dataclass
class TuneResult:
    task: Task
    measurements: list[Measurement]
    best: Measurement | None
    default: Measurement
    checked: bool
    seconds: float

    @property
    def speedup(self) -> float:
        if self.best is None or not self.default.ok or not self.best.ok:
            return math.nan
        return self.default.median_ms / self.best.median_ms

    def record(self) -> dict | None:
        if self.best is None:
            return None
        return {
            "config": self.best.config.to_json(),
            "label": self.best.config.label(),
            "median_ms": self.best.median_ms,
            "default_ms": self.default.median_ms if self.default.ok else None,
            "default_config": self.default.config.to_json(),
            "speedup": None if math.isnan(self.speedup) else self.speedup,
            "checked_against_default": self.checked,
            "shape": self.task.shape,
            "dtype": self.task.dtype,
            "tuned_seconds": round(self.seconds, 3),
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ssmc_version": __version__,
            "results": [m.summary() for m in self.measurements],
            "pruned": len(self.task.space.pruned),
        }


class Progress:
    """A one-line bar on a terminal: `[#####-----] 12/48 best 0.812 ms  <config>`."""

    def __init__(self, total: int, stream=None, enabled: bool | None = None, width: int = 24):
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = total >= PROGRESS_MIN_CONFIGS and getattr(self.stream, "isatty",
                                                                lambda: False)()
        self.enabled = enabled
        self.done = 0

    def update(self, label: str, best_ms: float | None) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = int(self.width * self.done / max(self.total, 1))
        best = f"best {best_ms:.4g} ms" if best_ms is not None else "best -"
        line = (f"\r  [{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} "
                f"{best}  {label}")
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class Tuner:
    """Measures every candidate of a task, picks the fastest one that agrees with the default
    config's output, and returns a TuneResult (the cache stores `result.record()`)."""

    def __init__(self, timer: Timer | None = None, settings: Settings = Settings(),
                 stream=None, progress: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.timer, self.settings = timer, settings
        self.stream, self.progress, self.clock = stream, progress, clock

    def tune(self, task: Task, device=None) -> TuneResult:
        timer = self.timer or default_timer(device or task.device or "cpu")
        s = self.settings
        start = self.clock()
        progress = Progress(len(task.space.candidates), self.stream, self.progress)
        measurements: list[Measurement] = []
        runs: dict[Config, Callable] = {}
        best_ms = None
        for cfg in task.space.candidates:
            if s.budget_s is not None and self.clock() - start > s.budget_s and measurements:
                m = Measurement(cfg, "skipped", error=f"search budget {s.budget_s:g} s spent")
            else:
                m, run = measure(cfg, task.build, timer, task.n_inputs, s)
                if run is not None:
                    runs[cfg] = run
                if m.ok and (best_ms is None or m.median_ms < best_ms):
                    best_ms = m.median_ms
            measurements.append(m)
            progress.update(cfg.label(), best_ms)
            if m.status == "lost":
                break
        progress.close()
        if measurements[-1].status == "lost":
            raise device_lost_error(task, measurements[-1].config, measurements[-1].error)

        default = measurements[0]
        best, checked = self._select(task, measurements, runs)
        return TuneResult(task, measurements, best, default, checked, self.clock() - start)

    def _select(self, task: Task, measurements: list[Measurement], runs: dict):
        """The fastest config whose output agrees with the default config's (a config that
        disagrees is marked `mismatch`). Without a working default, the fastest, unchecked."""
        default = measurements[0]
        ok = sorted((m for m in measurements if m.ok), key=lambda m: m.median_ms)
        if not ok:
            return None, False
        if not default.ok:
            report_once(f"unchecked:{task.key.text()}",
                        f"the default config of {task.key.name} failed ({default.error}); the "
                        "fastest config is stored without a correctness check",
                        self.stream)
            return ok[0], False
        try:
            expected = runs[default.config](0)
        except Exception as e:  # noqa: BLE001
            lost_on_check(task, default, e)
            default.status, default.error = "failed", f"check: {type(e).__name__}: {e}"
            return self._select(task, measurements, runs)
        for m in ok:
            if m is default:
                return m, True
            try:
                why = outputs_match(runs[m.config](0), expected, task.dtype)
            except Exception as e:  # noqa: BLE001
                lost_on_check(task, m, e)
                why = f"check run: {type(e).__name__}: {e}"
            if why is None:
                return m, True
            m.status, m.error = "mismatch", why
        return default, True


def device_lost_error(task: Task, config: Config, error: str) -> DeviceLostError:
    return DeviceLostError(
        f"autotuning {task.describe()}: config {config.label()!r} faulted on the device "
        f"({error}); the device context of this process is lost, so nothing was stored. "
        "Restart the process; SSMC_AUTOTUNE=cached or off skips tuning")


def lost_on_check(task: Task, m: Measurement, error: Exception) -> None:
    """Re-running a measured config to check its output faulted the device: raise."""
    if device_lost(error):
        raise device_lost_error(task, m.config, f"check: {type(error).__name__}: {error}")


# --------------------------------------------------------------------------- the policy

_caches: dict[str, TuneCache] = {}
_caches_lock = threading.Lock()
#: one tuning at a time per process (threads of one process share the device)
_tune_lock = threading.Lock()


def cache_for(device) -> TuneCache:
    device = torch.device(device)
    name = str(device) if device.type == "cuda" else "cpu"
    root = config.cache_dir() / "autotune"
    memo = f"{name}|{root}"
    with _caches_lock:
        if memo not in _caches:
            _caches[memo] = TuneCache.for_device(device, root)
        return _caches[memo]


def default_tuner(settings: Settings = IMPLICIT_SETTINGS, progress: bool | None = None) -> Tuner:
    """The tuner implicit tuning and `ssmc tune` use (the device's timer); tests replace it with
    one that has a fake timer."""
    return Tuner(settings=settings, progress=progress)


def tuned_plan(program, backend_name: str, lowering_policy: str, bound, plan: Plan,
               lowerings: list[str]) -> Plan:
    """The planner's last step (`ssmc.planner.make_plan`), after the cost model's choice: the
    plan with the tuned config for this call's key, or `plan` itself (off, CPU, nothing cached,
    failure). `lowerings` are those the tuned config may pick. On the CPU a config stored by
    `ssmc tune` is used, but nothing is tuned implicitly."""
    mode = config.autotune()
    if mode == "off":
        return plan
    if bound.device.type != "cuda" and not FORCE_CPU:
        mode = "cached"
    try:
        return _tuned_plan(program, backend_name, lowering_policy, bound, plan, lowerings,
                           mode)
    except DeviceLostError:  # every launch after it fails: say why here, not at the next one
        raise
    except Exception as e:  # noqa: BLE001 - tuning never breaks the op
        report_once(f"error:{program.name}",
                    f"{program.name}: tuning failed ({type(e).__name__}: {e}); using the "
                    "cost model's plan")
        return plan


def _apply(record: dict, plan: Plan, lowerings: list[str], backend: str) -> Plan | None:
    cfg = record_config(record)
    if cfg.lowering not in lowerings:
        return None
    return cfg.apply(plan, backend)


def _tuned_plan(program, backend_name: str, lowering_policy: str, bound, plan: Plan,
                lowerings: list[str], mode: str) -> Plan:
    lowerings = list(lowerings) or [plan.lowering]
    key = TuneKey.make(program, backend=backend_name, lowering=lowering_policy, dtype=plan.dtype,
                       sizes=bound.sizes, has_initial_state=plan.has_initial_state,
                       return_final_state=plan.return_final_state, varlen=plan.varlen)
    space_backend = first_available(backend_name, bound.device)
    cache = cache_for(bound.device)
    record = cache.load(key)
    model = gpu_model(bound.device)
    if record is None and model is not None:
        record = packaged_defaults(model).get(key.text())
    if record is not None:
        return _apply(record, plan, lowerings, space_backend) or plan
    if mode != "full" or _compiling() or not _real_tensors(bound):
        return plan

    def tune() -> dict | None:
        limits = DeviceLimits.from_device(bound.device)
        h0 = bound.initial_state
        first = InputSet({k: v.detach() for k, v in bound.tensors.items()},
                         None if h0 is None else h0.detach(), bound.cu_seqlens)
        task = make_task(program, backend_name=backend_name, lowering_policy=lowering_policy,
                         lowerings=lowerings, default_lowering=plan.lowering,
                         base=dataclasses.replace(plan, tile=None), sizes=dict(bound.sizes),
                         device=bound.device, input_sets=rotating_sets(first, limits.l2_bytes),
                         limits=limits, device_model=device_model(bound.device),
                         max_configs=tuner.settings.max_configs)
        print(f"ssmc: autotune: tuning {task.describe()}; cached in {cache.dir.name} "
              "(SSMC_AUTOTUNE=off|cached to skip)", file=sys.stderr)
        with torch.no_grad():
            result = tuner.tune(task, bound.device)
        rec = result.record()
        if rec is not None:
            speed = "" if rec["speedup"] is None else f", {rec['speedup']:.2f}x over the default"
            print(f"ssmc: autotune: {key.name}: {rec['label']} {rec['median_ms']:.4g} ms{speed}",
                  file=sys.stderr)
        return rec

    tuner = default_tuner()
    with _tune_lock:
        record, _ = cache.get_or_tune(key, tune)
    if record is None:
        return plan
    return _apply(record, plan, lowerings, space_backend) or plan


def _real_tensors(bound) -> bool:
    """False for fake / meta tensors (tracing): there is nothing to time."""
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        def is_fake(t):
            return False
    return all(not is_fake(t) and t.device.type != "meta" for t in bound.tensors.values())


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # noqa: BLE001
        return False
