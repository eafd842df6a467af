"""The README's quickstart runs and checks itself against the float64 reference."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs(tmp_path):
    env = dict(os.environ, SSMC_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "output y: (2, 64, 4, 8) torch.float32" in text
    assert re.search(r"backend: \w+   lowering: (scan|chunked|quadratic)", text)
    errors = [float(e) for e in re.findall(r"max \|y - reference\| = ([0-9.e+-]+)", text)]
    assert len(errors) == 2 and max(errors) < 1e-4
    assert "final state: (2, 4, 16, 8)" in text
    assert "attention matrix: (2, 4, 64, 64) = (b, h, t, t), lower-triangular: True" in text


def test_distill_attention_runs_shortened(tmp_path):
    """examples/distill_attention.py with few steps (the full run takes ~30 s on a CPU): both
    stages print their losses, and matching the matrices lowers the first."""
    env = dict(os.environ, SSMC_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(REPO / "examples" / "distill_attention.py"),
                          "--steps1", "20", "--steps2", "3"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    stage1 = [float(v) for v in re.findall(r"stage 1 .* ([0-9.]+)\n", out.stdout)]
    stage2 = [float(v) for v in re.findall(r"stage 2 .* ([0-9.]+)\n", out.stdout)]
    assert len(stage1) == 2 and stage1[1] < 0.5 * stage1[0], out.stdout
    assert len(stage2) == 2 and all(v < 1.0 for v in stage2), out.stdout
