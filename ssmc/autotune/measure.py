"""Measurement that can be trusted: device-side timing, warm-up, median of repeats, rotating
input buffers, a time limit, and failures recorded instead of raised.

`bench(run, n_inputs, settings, stopwatch)` is the one timing loop. `run(i)` launches the
kernel on input set `i % n_inputs`; the sets are copies of the inputs at different addresses, so
that a shape whose inputs fit in L2 is not timed out of a warm cache. A `Stopwatch` marks points
on the device's timeline: `CudaStopwatch` records CUDA events (the GPU's own clock, so host
overhead between launches is not counted); `ClockStopwatch` reads a host clock after a
synchronize (CPU backends, and tests with a fake clock).

A `Timer` is what the tuner calls: `timer(run, config, n_inputs, settings) -> [ms, ...]`. Tests
inject a fake one; `EventTimer` / `ClockTimer` wrap `bench`.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


class TimeLimitExceeded(Exception):
    """A config whose single run takes longer than the settings allow."""


@dataclass(frozen=True)
class Settings:
    warmup_ms: float = 25.0         # warm-up time after the first (compiling) run
    rep_ms: float = 100.0           # measured time per config
    min_reps: int = 5
    max_reps: int = 200
    max_warmup: int = 50
    time_limit_ms: float = 1000.0   # one run longer than this: the config is abandoned
    budget_s: float | None = None   # whole search; configs not reached are recorded "skipped"
    max_configs: int | None = 64


@dataclass
class Measurement:
    """The outcome for one config. status: ok | failed | timeout | mismatch | skipped | lost
    (it faulted and took the device context with it)."""

    config: Any
    status: str
    median_ms: float = math.nan
    times_ms: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> dict:
        t = self.times_ms
        return {"config": self.config.to_json(), "status": self.status,
                "median_ms": None if math.isnan(self.median_ms) else self.median_ms,
                "min_ms": min(t) if t else None, "max_ms": max(t) if t else None,
                "reps": len(t), "error": self.error}


class Stopwatch(Protocol):
    def mark(self) -> Any: ...
    def elapsed_ms(self, start, end) -> float: ...
    def synchronize(self) -> None: ...


class CudaStopwatch:
    """CUDA events on the current stream: device time, read after one synchronize."""

    def __init__(self, device=None):
        self.device = device

    def mark(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class ClockStopwatch:
    """A host clock (seconds) read after `sync()`; both injectable."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sync: Callable[[], None] = lambda: None):
        self.clock, self.sync = clock, sync

    def mark(self):
        self.sync()
        return self.clock()

    def elapsed_ms(self, start, end) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        self.sync()


def bench(run: Callable[[int], Any], n_inputs: int, settings: Settings,
          stopwatch: Stopwatch) -> list[float]:
    """Per-run times in ms. The first run (module load, JIT compile) is not timed; one timed run
    then estimates the cost, abandons the config past `time_limit_ms`, and sizes the warm-up
    and the repeats so that the measurement takes about `rep_ms`. Every repeat is timed on its
    own, so the caller can take the median."""
    n_inputs = max(int(n_inputs), 1)
    run(0)
    stopwatch.synchronize()
    start = stopwatch.mark()
    run(1 % n_inputs)
    end = stopwatch.mark()
    stopwatch.synchronize()
    first = stopwatch.elapsed_ms(start, end)
    if first > settings.time_limit_ms:
        raise TimeLimitExceeded(f"one run took {first:.1f} ms > time limit "
                                f"{settings.time_limit_ms:g} ms")
    est = max(first, 1e-4)
    n_warmup = min(max(round(settings.warmup_ms / est), 1), settings.max_warmup)
    n_rep = min(max(round(settings.rep_ms / est), settings.min_reps), settings.max_reps)
    i = 2
    for _ in range(n_warmup):
        run(i % n_inputs)
        i += 1
    marks = []
    for _ in range(n_rep):
        s = stopwatch.mark()
        run(i % n_inputs)
        marks.append((s, stopwatch.mark()))
        i += 1
    stopwatch.synchronize()
    return [stopwatch.elapsed_ms(s, e) for s, e in marks]


class Timer(Protocol):
    def __call__(self, run: Callable[[int], Any], config, n_inputs: int,
                 settings: Settings) -> list[float]: ...


class EventTimer:
    """The GPU timer: `bench` with CUDA events."""

    def __init__(self, device=None):
        self.device = device

    def __call__(self, run, config, n_inputs, settings):
        with torch.cuda.device(self.device) if self.device is not None else _null():
            return bench(run, n_inputs, settings, CudaStopwatch(self.device))


class ClockTimer:
    """`bench` with a host clock (CPU backends)."""

    def __init__(self, clock=time.perf_counter, sync=lambda: None):
        self.stopwatch = ClockStopwatch(clock, sync)

    def __call__(self, run, config, n_inputs, settings):
        return bench(run, n_inputs, settings, self.stopwatch)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def default_timer(device) -> Timer:
    device = torch.device(device)
    return EventTimer(device) if device.type == "cuda" else ClockTimer()


#: CUDA's sticky errors: after one, every launch in the process fails, so no later measurement
#: (nor the winner's check) means anything
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure",
                      "illegal instruction", "misaligned address", "device-side assert",
                      "hardware stack error")


def device_lost(error: BaseException) -> bool:
    return any(s in str(error) for s in STICKY_CUDA_ERRORS)


def measure(config, build: Callable[[Any], Callable[[int], Any]], timer: Timer, n_inputs: int,
            settings: Settings) -> tuple[Measurement, Callable | None]:
    """Build and time one config; every failure becomes a Measurement, never an exception."""
    try:
        run = build(config)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is data
        return Measurement(config, "failed", error=f"compile: {type(e).__name__}: {e}"[:500]), None
    try:
        times = list(timer(run, config, n_inputs, settings))
    except TimeLimitExceeded as e:
        return Measurement(config, "timeout", error=str(e)), None
    except Exception as e:  # noqa: BLE001 - nor does one that faults at run time
        status = "lost" if device_lost(e) else "failed"
        return Measurement(config, status, error=f"run: {type(e).__name__}: {e}"[:500]), None
    if not times or any(not math.isfinite(x) or x < 0 for x in times):
        return Measurement(config, "failed", times_ms=times, error="no valid timings"), None
    return Measurement(config, "ok", statistics.median(times), times), run


# --------------------------------------------------------------------------- inputs

def rotation_count(set_bytes: int, l2_bytes: int, *, max_sets: int = 16,
                   max_total_bytes: int = 1 << 30) -> int:
    """How many input sets to rotate through so that consecutive runs do not find their inputs
    in L2: enough sets to cover twice the L2 size, within a memory budget."""
    if set_bytes <= 0:
        return 1
    want = 1 + math.ceil(2 * l2_bytes / set_bytes) if l2_bytes else 1
    afford = max(max_total_bytes // set_bytes, 1)
    return max(1, min(want, max_sets, afford))


def tensors_bytes(*objs) -> int:
    total = 0
    for o in objs:
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            total += tensors_bytes(*o.values())
        elif isinstance(o, (list, tuple)):
            total += tensors_bytes(*o)
    return total


# --------------------------------------------------------------------------- correctness

#: relative RMS error allowed between two configs' outputs, per plan dtype
TOLERANCE = {"float64": 1e-9, "float32": 2e-3, "float16": 1e-2, "bfloat16": 2e-2}


#: elements compared at a time: a float64 copy of a whole large output (335M values at b=4
#: t=16384 h=80 p=64) would take 2.7 GB; compared on the host, it also crossed the bus
COMPARE_SLICE = 1 << 24


def outputs_match(actual, expected, dtype: str) -> str | None:
    """None when `actual` (output, final state) agrees with `expected`; else what differs.
    Compared on their device, in float64, a slice at a time."""
    tol = TOLERANCE.get(dtype, 2e-2)
    pairs = [("output", actual[0], expected[0])]
    if expected[1] is not None or actual[1] is not None:
        pairs.append(("final state", actual[1], expected[1]))
    for name, a, b in pairs:
        if a is None or b is None:
            return f"{name}: one config returned none"
        if tuple(a.shape) != tuple(b.shape):
            return f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        a, b = a.detach().reshape(-1), b.detach().reshape(-1).to(a.device)
        diff = ref = a.new_zeros((), dtype=torch.float64)
        for i in range(0, a.numel(), COMPARE_SLICE):
            a64, b64 = a[i:i + COMPARE_SLICE].double(), b[i:i + COMPARE_SLICE].double()
            finite = torch.isfinite(b64)
            if not torch.equal(torch.isfinite(a64), finite):
                return f"{name}: non-finite values where the default config has finite ones"
            diff = diff + torch.where(finite, a64 - b64, 0.0).square().sum()
            ref = ref + torch.where(finite, b64, 0.0).square().sum()
        diff, ref = float(diff.sqrt()), float(ref.sqrt())
        rel = diff / ref if ref > 0 else diff
        if not rel <= tol:
            return f"{name}: relative RMS error {rel:.3g} > {tol:g}"
    return None
