"""The tuner with a fake timer: winner selection, failed and mismatching configs, the search
budget, the progress bar; the SSMC_AUTOTUNE policy through a real op (reference backend, CPU
tuning forced); and two processes tuning the same key at once."""
import io
import multiprocessing as mp
import os
import time

import pytest
import torch

import ssmc
import ssmc.ops
from ssmc.autotune import tuner as tuner_mod
from ssmc.autotune.cache import TuneCache, TuneKey
from ssmc.autotune.measure import Settings
from ssmc.autotune.tuner import Progress, Tuner

from ..helpers import ssd_inputs
from .fakes import C, FakeTimer, fake_task, fake_tuner

CONFIGS = [C("chunked"), C("chunked", {"BT": 32}), C("chunked", {"BT": 128}), C("scan"),
           C("quadratic")]
TIMES = {"chunked (defaults)": 2.0, "chunked BT=32": 1.5, "chunked BT=128": 0.9,
         "scan (defaults)": 3.0, "quadratic (defaults)": 1.2}


def test_fastest_config_wins():
    result = fake_tuner(TIMES).tune(fake_task(CONFIGS))
    assert result.best.config == C("chunked", {"BT": 128}) and result.checked
    assert result.speedup == pytest.approx(2.0 / 0.9)
    rec = result.record()
    assert rec["config"] == {"lowering": "chunked", "tile": {"BT": 128}}
    assert rec["median_ms"] == 0.9 and rec["default_ms"] == 2.0
    assert [r["status"] for r in rec["results"]] == ["ok"] * 5


def test_failed_configs_are_recorded_not_raised():
    times = dict(TIMES, **{"scan (defaults)": RuntimeError("too many resources requested for "
                                                           "launch")})
    task = fake_task(CONFIGS, broken={"chunked BT=128"})
    result = fake_tuner(times).tune(task)
    status = {m.config.label(): (m.status, m.error) for m in result.measurements}
    assert status["chunked BT=128"][0] == "failed" and "compile" in status["chunked BT=128"][1]
    assert status["scan (defaults)"][0] == "failed" and "too many" in status["scan (defaults)"][1]
    assert result.best.config == C("quadratic")


STICKY = RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")


def test_a_config_that_loses_the_device_stops_the_search():
    # after a sticky CUDA error every launch of the process fails: the later configs are not
    # measured (their failures would mean nothing) and no record is made
    tuner = fake_tuner(dict(TIMES, **{"chunked BT=128": STICKY}))
    with pytest.raises(ssmc.DeviceLostError, match=r"'chunked BT=128' faulted on the device "
                                                    r"\(run: RuntimeError: .*illegal memory"):
        tuner.tune(fake_task(CONFIGS))
    assert [c.label() for c in tuner.timer.timed] == [
        "chunked (defaults)", "chunked BT=32", "chunked BT=128"]


def test_a_check_run_that_loses_the_device_raises():
    task = fake_task(CONFIGS)
    calls = {}
    build = task.build

    def faulting_on_second_run(cfg):
        run = build(cfg)

        def again(i):
            calls[cfg.label()] = calls.get(cfg.label(), 0) + 1
            if cfg.label() == "chunked BT=128" and calls[cfg.label()] > 1:
                raise STICKY
            return run(i)
        return again
    task.build = faulting_on_second_run
    with pytest.raises(ssmc.DeviceLostError, match=r"'chunked BT=128'.*\(check: RuntimeError"):
        fake_tuner(TIMES).tune(task)


def test_winner_that_disagrees_with_the_default_is_rejected():
    task = fake_task(CONFIGS, outputs={"chunked BT=128": 1.5})  # computes something else
    result = fake_tuner(TIMES).tune(task)
    bad = next(m for m in result.measurements if m.config.label() == "chunked BT=128")
    assert bad.status == "mismatch" and "relative RMS error" in bad.error
    assert result.best.config == C("quadratic") and result.checked


def test_every_other_config_wrong_keeps_the_default():
    task = fake_task(CONFIGS, outputs={c.label(): 7.0 for c in CONFIGS[1:]})
    assert fake_tuner(TIMES).tune(task).best.config == C("chunked")


def test_default_failed_stores_fastest_unchecked(capsys):
    task = fake_task(CONFIGS, broken={"chunked (defaults)"})
    result = fake_tuner(TIMES).tune(task)
    assert result.best.config == C("chunked", {"BT": 128}) and not result.checked
    assert result.record()["default_ms"] is None and result.record()["speedup"] is None
    assert "without a correctness check" in capsys.readouterr().err


def test_everything_failed():
    task = fake_task(CONFIGS, broken={c.label() for c in CONFIGS})
    result = fake_tuner(TIMES).tune(task)
    assert result.best is None and result.record() is None


def test_budget_skips_the_rest():
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]
    tuner = fake_tuner(TIMES, settings=Settings(budget_s=2.5), clock=clock)
    result = tuner.tune(fake_task(CONFIGS))
    status = [m.status for m in result.measurements]
    assert status[:2] == ["ok", "ok"] and set(status[2:]) == {"skipped"}
    assert result.best.config == C("chunked", {"BT": 32})


def test_progress_bar():
    stream = io.StringIO()
    fake_tuner(TIMES, stream=stream, progress=True).tune(fake_task(CONFIGS))
    text = stream.getvalue()
    assert "5/5" in text and "best 0.9 ms" in text and text.endswith("\n")
    quiet = io.StringIO()
    p = Progress(100, quiet)  # not a terminal: no bar
    p.update("x", 1.0)
    p.close()
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------- the policy

SHAPE = dict(b=1, t=16, h=2, g=1, n=4, p=4)


def mamba2_inputs(**kw):
    return ssd_inputs(**SHAPE, dt_bias=False, **kw)


class LoweringTimer(FakeTimer):
    """Times by lowering; scan is the fastest (the cost model picks quadratic at t=16 on CPU)."""

    def __init__(self):
        super().__init__(lambda c: {"scan": 1.0, "chunked": 2.0, "quadratic": 3.0}[c.lowering])


@pytest.fixture
def fake_tuning(monkeypatch):
    timer = LoweringTimer()
    monkeypatch.setattr(tuner_mod, "FORCE_CPU", True)
    monkeypatch.setattr(tuner_mod, "default_tuner",
                        lambda settings=tuner_mod.IMPLICIT_SETTINGS, progress=None:
                        Tuner(timer=timer, settings=settings, progress=progress))
    return timer



def test_policy_full_tunes_once_and_reuses(fake_tuning, monkeypatch, capsys):
    monkeypatch.setenv("SSMC_AUTOTUNE", "full")
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    y = op(**mamba2_inputs())
    assert torch.isfinite(y).all()
    assert op.last_plan.lowering == "scan"
    assert {c.lowering for c in fake_tuning.timed} == {"scan", "chunked", "quadratic"}
    err = capsys.readouterr().err
    assert err.count("ssmc: autotune: tuning ssd auto") == 1
    assert "scan (defaults)" in err
    # a new op (e.g. another process) finds the entry: no measuring
    n = len(fake_tuning.timed)
    monkeypatch.setattr(tuner_mod, "_caches", {})
    op2 = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op2(**mamba2_inputs(seed=1))
    assert op2.last_plan.lowering == "scan" and len(fake_tuning.timed) == n
    # another shape in the same bucket (t=13 -> 16): no measuring either
    op2(**ssd_inputs(**dict(SHAPE, t=13), dt_bias=False))
    assert len(fake_tuning.timed) == n
    # a new bucket is tuned
    op2(**ssd_inputs(**dict(SHAPE, t=40), dt_bias=False))
    assert len(fake_tuning.timed) > n


def test_policy_default_is_full(fake_tuning):
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == "scan" and fake_tuning.timed


def test_policy_off_and_cached_never_measure(fake_tuning, monkeypatch):
    untuned = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    monkeypatch.setenv("SSMC_AUTOTUNE", "off")
    untuned(**mamba2_inputs())
    default_lowering = untuned.last_plan.lowering
    assert default_lowering != "scan" and untuned.last_plan.tile is None
    monkeypatch.setenv("SSMC_AUTOTUNE", "cached")
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == default_lowering and not fake_tuning.timed
    # once tuned, `cached` uses the entry and `off` still ignores it
    monkeypatch.setenv("SSMC_AUTOTUNE", "full")
    ssmc.compile(ssmc.ops.mamba2, backend="reference")(**mamba2_inputs())
    monkeypatch.setenv("SSMC_AUTOTUNE", "cached")
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == "scan"
    monkeypatch.setenv("SSMC_AUTOTUNE", "off")
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == default_lowering


def test_shipped_defaults_are_used_on_their_gpu_model(fake_tuning, monkeypatch):
    from ssmc.autotune import cache as cache_mod
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    key = _key(op)
    shipped = {"format": 1, "key": key.text(), "config": {"lowering": "chunked", "tile": {}},
               "median_ms": 1.0}
    cache_mod._packaged_memo["h100"] = {key.text(): shipped}
    monkeypatch.setenv("SSMC_AUTOTUNE", "cached")
    monkeypatch.setattr(tuner_mod, "gpu_model", lambda device: "h100")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == "chunked" and not fake_tuning.timed
    # another GPU model: not used
    monkeypatch.setattr(tuner_mod, "gpu_model", lambda device: None)
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == "quadratic"


def test_policy_invalid_value(monkeypatch):
    monkeypatch.setenv("SSMC_AUTOTUNE", "always")
    with pytest.raises(ValueError, match="SSMC_AUTOTUNE='always' is not valid; valid values: "
                                         "off, cached, full"):
        ssmc.config.autotune()


def test_cpu_is_not_tuned_unless_forced(monkeypatch, tmp_path):
    monkeypatch.setenv("SSMC_AUTOTUNE", "full")
    monkeypatch.setattr(tuner_mod, "default_tuner", lambda *a, **k: pytest.fail("tuned on CPU"))
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    assert not (tmp_path / "cache" / "autotune").exists()


def test_cpu_uses_a_stored_config_without_tuning(fake_tuning, monkeypatch):
    """A config stored for the CPU (as `ssmc tune --device cpu` stores it) is used by later
    ops; only the implicit tuning of a new shape is left to CUDA devices."""
    monkeypatch.setenv("SSMC_AUTOTUNE", "full")
    ssmc.compile(ssmc.ops.mamba2, backend="reference")(**mamba2_inputs())   # tunes: scan
    monkeypatch.setattr(tuner_mod, "FORCE_CPU", False)
    monkeypatch.setattr(tuner_mod, "_caches", {})
    monkeypatch.setattr(tuner_mod, "default_tuner", lambda *a, **k: pytest.fail("tuned on CPU"))
    untuned = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    monkeypatch.setenv("SSMC_AUTOTUNE", "off")
    untuned(**mamba2_inputs())
    assert untuned.last_plan.lowering != "scan"   # the cost model's choice
    monkeypatch.setenv("SSMC_AUTOTUNE", "full")
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == "scan"        # the stored config
    op(**ssd_inputs(**dict(SHAPE, t=40), dt_bias=False))   # a new shape: not tuned


def test_fixed_lowering_tunes_within_it(fake_tuning):
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference", lowering="chunked")
    op(**mamba2_inputs())
    assert op.last_plan.lowering == "chunked"
    assert {c.lowering for c in fake_tuning.timed} == {"chunked"}


def test_tuning_failure_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(tuner_mod, "FORCE_CPU", True)

    def broken(*a, **k):
        raise RuntimeError("tuner exploded")
    monkeypatch.setattr(tuner_mod, "default_tuner", broken)
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    y = op(**mamba2_inputs())
    assert torch.isfinite(y).all()
    op(**ssd_inputs(**dict(SHAPE, t=40), dt_bias=False))
    err = capsys.readouterr().err
    assert err.count("tuning failed (RuntimeError: tuner exploded)") == 1


def test_a_lost_device_is_raised_not_hidden(monkeypatch):
    monkeypatch.setattr(tuner_mod, "FORCE_CPU", True)

    def lost(*a, **k):
        raise ssmc.DeviceLostError("autotuning ssd: config 'chunked BP_out=32' faulted")
    monkeypatch.setattr(tuner_mod, "default_tuner", lost)
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    with pytest.raises(ssmc.DeviceLostError, match="BP_out=32"):
        op(**mamba2_inputs())


def test_corrupt_cache_never_breaks_the_op(fake_tuning, capsys):
    op = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    op(**mamba2_inputs())
    cache = tuner_mod.cache_for("cpu")
    for path in cache.dir.glob("ssd_*.json"):
        path.write_text("{ truncated")
    tuner_mod._caches.clear()
    n = len(fake_tuning.timed)
    op2 = ssmc.compile(ssmc.ops.mamba2, backend="reference")
    y = op2(**mamba2_inputs())
    assert torch.isfinite(y).all() and op2.last_plan.lowering == "scan"
    assert len(fake_tuning.timed) > n  # re-tuned and rewritten
    assert "corrupt cache entry" in capsys.readouterr().err
    assert all(TuneCache(cache.env, cache.root).load(k) is not None for k in [_key(op2)])


def _key(op):
    return TuneKey.make(op.program, backend="auto" if op.backend_name == "auto" else
                        op.backend_name, lowering=op.lowering, dtype="float32", sizes=SHAPE)


# --------------------------------------------------------------------------- two processes

ENV = {"gpu": "FAKE GPU", "capability": "9.0", "ssmc": "test"}


def _worker(root, barrier, log_path, results):
    cache = TuneCache(ENV, root)
    task = fake_task(CONFIGS)

    def tune():
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        record = Tuner(timer=FakeTimer(TIMES)).tune(task).record()
        time.sleep(1.0)  # a search long enough for the other process to arrive meanwhile
        return record

    barrier.wait()
    record, how = cache.get_or_tune(task.key, tune)
    results.put((os.getpid(), how, record["config"], record["median_ms"]))


def test_two_processes_tune_the_same_key_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    log = tmp_path / "tuned.log"
    procs = [ctx.Process(target=_worker, args=(tmp_path / "root", barrier, log, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    hows = sorted(how for _, how, _, _ in got)
    assert hows in (["tuned", "waited"], ["hit", "tuned"])
    assert len(log.read_text().split()) == 1  # one search in all
    assert got[0][2:] == got[1][2:] == ({"lowering": "chunked", "tile": {"BT": 128}}, 0.9)


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
def test_gpu_tunes_with_events_and_checks_the_winner(monkeypatch, capsys):
    """The real path: CUDA events, rotating inputs, Triton configs, the correctness check."""
    small = Settings(warmup_ms=2, rep_ms=5, max_configs=6, budget_s=120)
    monkeypatch.setattr(tuner_mod, "default_tuner",
                        lambda settings=None, progress=None: Tuner(settings=small))
    op = ssmc.compile(ssmc.ops.mamba2)
    inputs = ssd_inputs(b=2, t=256, h=4, g=1, n=64, p=64, dt_bias=False, dtype=torch.bfloat16,
                        device="cuda")
    y = op(**inputs)
    assert torch.isfinite(y).all()
    rec = tuner_mod.cache_for(y.device).load(_gpu_key(op))
    assert rec is not None and rec["median_ms"] > 0 and rec["checked_against_default"]
    assert sum(r["status"] == "ok" for r in rec["results"]) >= 2
    assert "ssmc: autotune: tuning ssd" in capsys.readouterr().err


def _gpu_key(op):
    return TuneKey.make(op.program, backend=op.backend_name, lowering=op.lowering,
                        dtype="bfloat16", sizes=dict(b=2, t=256, h=4, g=1, n=64, p=64))
