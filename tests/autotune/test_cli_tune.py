"""`ssmc tune`: the final table, the cache round trip through the CLI, --force, --show,
--export-defaults, and argument errors. CPU with the reference backend and a fake timer."""
import json

import pytest
import torch

from ssmc import cli
from ssmc.autotune import tuner as tuner_mod
from ssmc.autotune.cache import read_defaults
from ssmc.autotune.tuner import Tuner

from .fakes import FakeTimer

SHAPE = "b=1,t=16,h=2,p=4,n=4,g=1"
ARGS = ("tune", "ssmc.ops.ssd:mamba2", "--shape", SHAPE, "--dtype", "fp32", "--device", "cpu",
        "--backend", "reference")


@pytest.fixture
def timer(monkeypatch):
    t = FakeTimer(lambda c: {"scan": 1.0, "chunked": 2.0, "quadratic": 4.0}[c.lowering])
    monkeypatch.setattr(tuner_mod, "default_tuner",
                        lambda settings=tuner_mod.IMPLICIT_SETTINGS, progress=None:
                        Tuner(timer=t, settings=settings, progress=progress))
    return t


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tune_is_registered():
    assert "tune" in cli.SUBCOMMANDS
    assert "tune" in cli.build_parser().format_help()


def test_tune_prints_table_and_caches(capsys, timer):
    code, out, err = run(capsys, *ARGS)
    assert code == 0, err
    assert "ssd b=1 t=16 h=2 g=1 n=4 p=4 fp32 lowering=all on cpu" in out
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if "median ms" in l and "speedup" in l)
    rows = lines[header + 1:header + 4]
    assert rows[0].split()[1:5] == ["scan", "(defaults)", "*", "1"]
    assert any("chunked (defaults)" in r for r in rows) and any("quadratic" in r for r in rows)
    assert "3 ok, 0 failed" in out
    assert "stored ssd_auto_fp32_bt16_t16_h2_g1_n4_p4_" in out
    n = len(timer.timed)
    # again: found in the cache, nothing measured
    code, out, _ = run(capsys, *ARGS)
    assert code == 0 and "cached (hit)" in out and len(timer.timed) == n
    # --force measures again
    code, out, _ = run(capsys, *ARGS, "--force")
    assert code == 0 and len(timer.timed) == 2 * n and "cached" not in out


def test_tune_speedup_column(capsys, timer):
    code, out, _ = run(capsys, *ARGS)
    default = [l for l in out.splitlines() if l.strip()[:1].isdigit() and l.strip().endswith(" ok")]
    # the cost model's default at this shape is quadratic (4 ms): scan is 4x, chunked 2x
    speed = {l.split()[1]: l.split()[-2] for l in default}
    assert speed == {"scan": "4.00x", "chunked": "2.00x", "quadratic": "1.00x"}
    assert "(4.00x over the default)" in out


def test_tune_one_lowering_and_several_shapes(capsys, timer):
    code, out, err = run(capsys, *ARGS, "--lowering", "chunked", "--shape", "b=2,t=40,h=2,p=4,n=4,g=1")
    assert code == 0, err
    assert out.count("stored ssd_chunked_fp32_") == 2
    assert {c.lowering for c in timer.timed} == {"chunked"}


def test_show_and_export(capsys, timer, tmp_path):
    code, out, _ = run(capsys, "tune", "--show")
    assert code == 0 and "no tuned configs" in out
    run(capsys, *ARGS)
    code, out, _ = run(capsys, "tune", "--show")
    assert code == 0
    assert "ssd_auto_fp32_bt16_t16_h2_g1_n4_p4_" in out and "scan (defaults)" in out
    assert "4.00x" in out and "torch " in out
    target = tmp_path / "cpu.json"
    code, out, _ = run(capsys, "tune", "--export-defaults", str(target), "--device", "cpu")
    assert code == 0 and "wrote 1 tuned configs" in out
    entries = read_defaults(target.read_text())
    (rec,) = entries.values()
    assert rec["config"] == {"lowering": "scan", "tile": {}}
    assert json.loads(target.read_text())["environment"]["gpu"] == "none"


@pytest.mark.parametrize("argv, message", [
    (("tune",), "give a definition"),
    (("tune", "ssmc.ops.ssd:mamba2"), "--shape is required"),
    (("tune", "ssmc.ops.ssd:mamba2", "--shape", SHAPE, "--device", "tpu"), "--device"),
    (("tune", "ssmc.ops.ssd:mamba2", "--shape", SHAPE, "--device", "cpu", "--max-configs", "0"),
     "--max-configs must be positive"),
    (("tune", "ssmc.ops.ssd:nothing", "--shape", SHAPE, "--device", "cpu"), "no attribute"),
    (("tune", "ssmc.ops.ssd:mamba2", "--shape", "b=1,t=16", "--device", "cpu"), "lacks axis"),
])
def test_tune_argument_errors(capsys, timer, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err


S6 = """
import ssmc
from ssmc import dsl as S


@ssmc.ssm
def s6(x: S.In["b t h p"], dt: S.In["b t h p"], A: S.In["h p n"], B: S.In["b t g n"],
       C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C)
"""


def test_illegal_lowering(capsys, timer, tmp_path):
    path = tmp_path / "s6_model.py"
    path.write_text(S6)
    code, _, err = run(capsys, "tune", f"{path}:s6", "--shape", "b=1,t=8,h=2,g=1,n=4,p=3",
                       "--device", "cpu", "--backend", "reference", "--lowering", "quadratic")
    assert code == 2 and "--lowering quadratic: not legal or not implemented" in err, err
    code, out, err = run(capsys, "tune", f"{path}:s6", "--shape", "b=1,t=8,h=2,g=1,n=4,p=3",
                         "--device", "cpu", "--backend", "reference")
    assert code == 0, err
    assert "scan (defaults) *" in out and "quadratic" not in out  # the only legal lowering


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_no_gpu_message(capsys, timer):
    code, _, err = run(capsys, "tune", "ssmc.ops.ssd:mamba2", "--shape", SHAPE)
    assert code == 2 and "no CUDA GPU here" in err


def test_tune_a_cross2d_definition_on_a_square_grid(capsys, timer, tmp_path):
    """A cross2d kernel reads the grid's shape; tuning without a call picks the most nearly
    square grid of t (was: every config failed for want of a grid)."""
    module = tmp_path / "grid_defs.py"
    module.write_text("from ssmc.nn_vision import build_ss2d_scan\nss2d = build_ss2d_scan()\n")
    code, out, err = run(capsys, "tune", f"{module}:ss2d", "--shape",
                         "b=1,k=4,t=12,h=1,p=4,n=2", "--dtype", "fp32", "--device", "cpu",
                         "--backend", "reference")
    assert code == 0, err
    assert "every config failed" not in err and " ok" in out + err


def test_default_grid_is_nearly_square():
    from ssmc.ir.orders import default_grid
    assert [default_grid(t) for t in (12, 16, 7, 1, 0)] == [(3, 4), (4, 4), (1, 7), (1, 1),
                                                             (1, 0)]
