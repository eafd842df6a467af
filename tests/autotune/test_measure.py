"""Measurement with a fake clock: the first run untimed, warm-up, median of repeats, rotating
inputs, the time limit, and failures recorded instead of raised."""
import math

import pytest
import torch

from ssmc.autotune.measure import (ClockStopwatch, ClockTimer, Settings, TimeLimitExceeded,
                                   bench, measure, outputs_match, rotation_count)
from ssmc.autotune.space import Config


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_run(clock, costs_ms, calls):
    """run(i) advances the clock by the next cost (the last one repeats) and logs i."""
    def run(i):
        k = len(calls)
        calls.append(i)
        clock.now += costs_ms[min(k, len(costs_ms) - 1)] / 1e3
    return run


def test_first_run_is_not_timed_and_median_is_robust():
    clock, calls = FakeClock(), []
    # a 600 ms first run (compile), then 2 ms runs with one 50 ms outlier among the repeats
    costs = [600.0] + [2.0] * 30 + [50.0] + [2.0] * 200
    s = Settings(warmup_ms=10, rep_ms=40, min_reps=5, max_reps=100, time_limit_ms=1000)
    times = bench(fake_run(clock, costs, calls), 4, s, ClockStopwatch(clock))
    assert 600.0 not in times
    assert len(times) == 20               # rep_ms / estimate = 40 / 2
    assert sorted(times)[len(times) // 2] == pytest.approx(2.0)
    assert len(calls) == 1 + 1 + 5 + 20   # first, estimate, warm-up (10 / 2), repeats


def test_inputs_rotate():
    clock, calls = FakeClock(), []
    s = Settings(warmup_ms=4, rep_ms=20, min_reps=3)
    bench(fake_run(clock, [1.0], calls), 3, s, ClockStopwatch(clock))
    assert set(calls) == {0, 1, 2}
    # consecutive runs never reuse the same input set
    assert all(a != b for a, b in zip(calls, calls[1:]))


def test_reps_are_clamped():
    clock, calls = FakeClock(), []
    s = Settings(warmup_ms=1, rep_ms=1e6, min_reps=5, max_reps=17)
    assert len(bench(fake_run(clock, [1.0], calls), 1, s, ClockStopwatch(clock))) == 17
    s = Settings(warmup_ms=1, rep_ms=0.001, min_reps=5, max_reps=17)
    assert len(bench(fake_run(clock, [1.0], []), 1, s, ClockStopwatch(clock))) == 5


def test_time_limit():
    clock = FakeClock()
    s = Settings(time_limit_ms=100)
    calls = []
    with pytest.raises(TimeLimitExceeded):
        bench(fake_run(clock, [5.0, 500.0], calls), 2, s, ClockStopwatch(clock))
    assert len(calls) == 2  # the first run and one timed run: no repeats of a slow config
    timer = ClockTimer(clock)
    m, run = measure(Config("scan"), lambda c: fake_run(clock, [5.0, 500.0], []), timer, 2, s)
    assert m.status == "timeout" and run is None and "time limit" in m.error


def test_failures_are_recorded():
    s = Settings()
    clock = FakeClock()
    timer = ClockTimer(clock)

    def no_compile(cfg):
        raise RuntimeError("out of resource: shared memory, Required: 300000")
    m, run = measure(Config("chunked"), no_compile, timer, 1, s)
    assert m.status == "failed" and m.error.startswith("compile: RuntimeError: out of resource")
    assert run is None and math.isnan(m.median_ms)

    def too_big(i):
        raise RuntimeError("CUDA error: too many resources requested for launch")
    m, _ = measure(Config("chunked"), lambda c: too_big, timer, 1, s)
    assert m.status == "failed" and m.error.startswith("run: RuntimeError: CUDA error")

    # a sticky CUDA error loses the process's device context: "lost", not just "failed"
    def faults(i):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    m, _ = measure(Config("chunked"), lambda c: faults, timer, 1, s)
    assert m.status == "lost" and m.error.startswith("run: RuntimeError: CUDA error: an illegal")

    m, _ = measure(Config("scan"), lambda c: (lambda i: None), lambda *a: [1.0, math.nan], 1, s)
    assert m.status == "failed" and "no valid timings" in m.error

    m, run = measure(Config("scan"), lambda c: (lambda i: None), lambda *a: [3.0, 1.0, 2.0], 1, s)
    assert m.ok and m.median_ms == 2.0 and run is not None
    assert m.summary()["min_ms"] == 1.0 and m.summary()["reps"] == 3


def test_rotation_count():
    l2 = 50 << 20
    assert rotation_count(1 << 20, l2) == 16             # small sets: capped
    assert rotation_count(1 << 20, l2, max_sets=200) == 101
    assert rotation_count(500 << 20, l2) == 2            # one set is larger than L2
    assert rotation_count(600 << 20, l2, max_total_bytes=1 << 30) == 1  # memory budget
    assert rotation_count(1 << 20, 0) == 1               # no L2 (CPU): no rotation needed


def test_outputs_match():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 8, 3, generator=gen)
    assert outputs_match((ref.clone(), None), (ref, None), "float32") is None
    close = (ref * (1 + 1e-3)).to(torch.bfloat16)
    assert outputs_match((close, None), (ref, None), "bfloat16") is None
    off = ref + 0.2 * torch.randn(ref.shape, generator=gen)
    assert "relative RMS error" in outputs_match((off, None), (ref, None), "float32")
    nan = ref.clone()
    nan[0, 0, 0] = math.nan
    assert "non-finite" in outputs_match((nan, None), (ref, None), "float32")
    fin = torch.ones(2, 2)
    assert "final state" in outputs_match((ref, fin * 2), (ref, fin), "float32")
    assert "final state" in outputs_match((ref, None), (ref, fin), "float32")
    assert "shape" in outputs_match((ref[:1], None), (ref, None), "float32")


def test_outputs_match_a_slice_at_a_time(monkeypatch):
    """Large outputs are compared in slices: a non-finite value in a later slice is found, and
    the error is the whole tensor's, not one slice's."""
    import sys
    m = sys.modules["ssmc.autotune.measure"]   # the package re-exports a function of that name
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(10, 7, generator=gen)
    off = ref.clone()
    off[:5] += 0.05 * torch.randn(5, 7, generator=gen)   # only the first half is off
    whole = float((off - ref).norm() / ref.norm())
    monkeypatch.setattr(m, "COMPARE_SLICE", 8)
    assert outputs_match((off, None), (ref, None), "float32") == \
        f"output: relative RMS error {whole:.3g} > 0.002"
    late = ref.clone()
    late[9, 6] = math.inf
    assert "non-finite" in outputs_match((late, None), (ref, None), "float32")
    both = ref.clone()
    both[9, 6] = math.inf
    assert outputs_match((both, None), (both.clone(), None), "float32") is None
