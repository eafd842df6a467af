"""The `ssmc` command line: explain, its argument errors, and the subcommand registry."""
import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ssmc.ops
from ssmc import cli
from ssmc.passes import choose_lowering

REPO = Path(__file__).resolve().parents[1]
SHAPE = "b=8,t=4096,h=80,p=64,n=128,g=1"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("t, lowering", [(16, "quadratic"), (64, "quadratic"),
                                         (4096, "chunked"), (16384, "chunked")])
def test_explain_mamba2_chosen_lowering(capsys, t, lowering):
    code, out, err = run(capsys, "explain", "ssmc.ops.ssd:mamba2", "--shape",
                         f"b=8,t={t},h=80,p=64,n=128,g=1", "--device", "h100")
    assert code == 0, err
    assert f"chosen lowering: {lowering}" in out
    expected = choose_lowering(ssmc.ops.mamba2.program,
                               dict(b=8, t=t, h=80, p=64, n=128, g=1), "h100")
    assert f"why: {expected.explanation}" in out


def test_explain_sections(capsys):
    code, out, _ = run(capsys, "explain", "ssmc.ops.ssd:mamba2", "--shape", SHAPE)
    assert code == 0
    # the IR, as the printer writes it
    assert ssmc.ir.print_program(ssmc.ops.mamba2.program) in out
    assert "kind: scalar" in out
    assert "legal lowerings: scan, chunked, quadratic" in out
    # formulas with their values at the shape (bf16: E = 2)
    assert "dtype: bf16 (E=2 bytes)" in out
    assert "serial steps       t  =  4096" in out
    assert "serial steps       t/Q  =  64" in out
    assert "b*h*t**2*(n + p)" in out
    for lowering in ("scan", "chunked", "quadratic"):
        assert f"\n{lowering}: estimated " in out


def test_explain_dtype_and_device_change_estimates(capsys):
    _, bf16, _ = run(capsys, "explain", "ssmc.ops:mamba2", "--shape", SHAPE)
    _, fp32, _ = run(capsys, "explain", "ssmc.ops:mamba2", "--shape", SHAPE, "--dtype", "fp32",
                     "--device", "a100")
    assert "E=4 bytes" in fp32 and "device: a100" in fp32 and "on a100" in fp32
    assert bf16.split("== cost")[1] != fp32.split("== cost")[1]


def test_explain_full_decay_lists_illegal_lowerings(capsys, tmp_path):
    path = tmp_path / "model_s6.py"
    path.write_text(textwrap.dedent("""
        import ssmc
        from ssmc import dsl as S

        @ssmc.ssm
        def s6(u: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h p n"], B: S.In["b t n"]):
            return S.recurrence(decay=S.exp(dt * A), key=B, value=u * dt, query=B)
    """))
    code, out, err = run(capsys, "explain", f"{path}:s6", "--shape", "b=2,t=64,h=16,p=1,n=16")
    assert code == 0, err
    assert "kind: full" in out
    assert "legal lowerings: scan\n" in out
    assert "quadratic: not legal for decay kind 'full'" in out
    assert "chosen lowering: scan" in out


def test_explain_example_file(capsys):
    code, out, err = run(capsys, "explain", f"{REPO / 'examples' / 'quickstart.py'}:mamba2",
                         "--shape",
                         "b=2,t=64,h=4,g=2,n=16,p=8", "--device", "cpu", "--dtype", "fp32")
    assert code == 0, err
    assert "program mamba2(x: [b t h p]" in out
    assert "shape: b=2 t=64 h=4 g=2 n=16 p=8   dtype: fp32 (E=4 bytes)   device: cpu" in out
    assert "chosen lowering: " in out


def test_explain_note_for_axes_the_definition_lacks(capsys, tmp_path):
    path = tmp_path / "la.py"
    path.write_text(textwrap.dedent("""
        import ssmc
        from ssmc import dsl as S

        @ssmc.ssm
        def la(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
            return S.recurrence(key=k, value=v, query=q)
    """))
    code, out, err = run(capsys, "explain", f"{path}:la", "--shape", SHAPE)
    assert code == 0, err
    assert "note: la does not use axis g; ignored" in out
    assert "g=80" in out  # g defaults to h, as at call time
    assert "kind: none" in out


@pytest.mark.parametrize("shape, message", [
    ("b=8,t=x,h=80,p=64,n=128,g=1", "--shape item 't=x': size 'x' is not an integer"),
    ("b=8,q=3,h=80,p=64,n=128,g=1", "--shape item 'q=3': unknown axis 'q' "
                                    "(expected one of b t h g n p)"),
    ("b=8,t,h=80", "--shape item 't' is not of the form axis=size"),
    ("b=8,t=0,h=80", "--shape item 't=0': size must be positive, got 0"),
    ("b=8,t=-4,h=80", "--shape item 't=-4': size must be positive, got -4"),
    ("b=8,,t=1", "has an empty item"),
    ("b=8,b=2", "--shape item 'b=2': axis 'b' is given twice"),
    ("b=8,t=64,h=80,p=64,g=1", "--shape lacks axis 'n' (state (key) dim), which ssd uses in "
                               "'B', 'C'"),
    ("b=8,t=64,p=64,n=128,g=1", "--shape lacks axis 'h' (heads), which ssd uses in 'x', 'dt', "
                                "'A', 'D', 'z'"),
    ("t=64", "--shape lacks axis 'b' (batch), which ssd uses in 'x', 'dt', 'B', 'C', 'z'; "
             "also missing: h g n p"),
    ("b=1,t=64,h=6,g=4,n=8,p=8", "--shape: heads h=6 is not a multiple of groups g=4"),
])
def test_explain_bad_shape(capsys, shape, message):
    code, out, err = run(capsys, "explain", "ssmc.ops.ssd:mamba2", "--shape", shape)
    assert code == 2
    assert out == ""
    assert err.startswith("ssmc explain: error: ")
    assert message in err


@pytest.mark.parametrize("target, message", [
    ("ssmc.ops.ssd", "is not of the form MODULE:FUNCTION"),
    ("ssmc.ops.ssd:", "is not of the form MODULE:FUNCTION"),
    ("ssmc.no_such_module:f", "no module named 'ssmc.no_such_module'"),
    ("ssmc.ops.ssd:nope", "ssmc.ops.ssd has no attribute 'nope'; definitions there: mamba2"),
    ("ssmc.ops.ssd:ssd", "ssmc.ops.ssd:ssd is a function, not an ssmc definition"),
    ("ssmc.ops.ssd:_signature", "is a function, not an ssmc definition"),
    ("ssmc.ir.nodes:AXES", "ssmc.ir.nodes:AXES is a tuple, not an ssmc definition"),
    ("no/such/file.py:f", "module file 'no/such/file.py' does not exist"),
])
def test_explain_bad_definition(capsys, target, message):
    code, out, err = run(capsys, "explain", target, "--shape", SHAPE)
    assert code == 2
    assert message in err


def test_explain_spec_error_in_file(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(textwrap.dedent("""
        import ssmc
        from ssmc import dsl as S

        @ssmc.ssm
        def broken(x: S.In["b t h p"], B: S.In["b t g q"]):
            return S.recurrence(key=B, value=x, query=B)
    """))
    code, _, err = run(capsys, "explain", f"{path}:broken", "--shape", SHAPE)
    assert code == 1
    assert ("SpecError: broken: 'B' is annotated \"b t g q\"; unknown axis 'q' "
            "(expected one of b t h g n p)") in err


def test_explain_dotted_attribute(capsys):
    code, out, err = run(capsys, "explain", "ssmc:ops.mamba2", "--shape", SHAPE)
    assert code == 0, err
    assert "chosen lowering: chunked" in out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["explain", "ssmc.ops:mamba2", "--shape", SHAPE, "--device", "tpu"])
    assert info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["explain", "ssmc.ops:mamba2"])
    assert "--shape" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "explain" in capsys.readouterr().err


def test_parse_shape():
    assert cli.parse_shape(" b=8, t = 4096 ") == {"b": 8, "t": 4096}


def test_subcommand_registry_extension(capsys, monkeypatch):
    """A new subcommand is one entry: (add_arguments, run)."""
    seen = {}

    def add_arguments(parser: argparse.ArgumentParser):
        parser.add_argument("--times", type=int, default=1)

    def run_hello(args):
        """Say hello."""
        seen["times"] = args.times
        print("hello " * args.times)
        return 3

    monkeypatch.setitem(cli.SUBCOMMANDS, "hello", (add_arguments, run_hello))
    assert cli.main(["hello", "--times", "2"]) == 3
    assert seen == {"times": 2}
    assert "hello hello" in capsys.readouterr().out
    cli.build_parser().print_help()
    assert "Say hello." in capsys.readouterr().out


def test_module_entry_point():
    """`python -m ssmc.cli` (what the `ssmc` console script calls) works end to end."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "ssmc.cli", "explain", "ssmc.ops.ssd:mamba2",
                          "--shape", "b=8,t=16,h=80,p=64,n=128,g=1"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "chosen lowering: quadratic" in out.stdout


def test_compile_emit_triton_prints_each_lowering(capsys):
    assert cli.main(["compile", "ssmc.ops.ssd:mamba2", "--emit", "triton"]) == 0
    out = capsys.readouterr().out
    for kernel in ("def ssmc_scan_fwd", "def ssmc_chunked_state_fwd", "def ssmc_chunked_out_fwd",
                   "def ssmc_quadratic_fwd"):
        assert kernel in out
    # the prologue is fused: softplus of dt and exp of the decay appear in the kernel text
    assert "tl.exp(" in out and "tl.log(1.0 + tl.exp(-tl.abs(" in out


def test_compile_emit_tvm_needs_shape(capsys):
    assert cli.main(["compile", "ssmc.ops.ssd:mamba2", "--emit", "tvm"]) == 2
    assert "--shape" in capsys.readouterr().err


def test_compile_emit_tvm_scan(capsys):
    assert cli.main(["compile", "ssmc.ops.ssd:mamba2", "--emit", "tvm", "--lowering", "scan",
                 "--shape", "b=1,t=8,h=2,p=4,n=8,g=1"]) == 0
    assert "def ssmc_scan_fwd" in capsys.readouterr().out


def test_compile_illegal_lowering(capsys, tmp_path):
    src = tmp_path / "s6.py"
    src.write_text(
        "import ssmc\nfrom ssmc import dsl as S\n\n@ssmc.ssm\n"
        "def s6(x: S.In['b t h p'], a: S.In['b t h p n'], B: S.In['b t h n']):\n"
        "    return S.recurrence(decay=S.sigmoid(a), key=B, value=x, query=B)\n")
    assert cli.main(["compile", f"{src}:s6", "--emit", "triton", "--lowering", "chunked"]) == 2
    assert "not legal" in capsys.readouterr().err


def test_closed_stdout_pipe_exits_quietly():
    """`ssmc explain ... | head -1`: a reader that goes away is no error worth a traceback; the
    exit status is 141 (128 + SIGPIPE), as for a tool that SIGPIPE ended. The whole output
    (about 2 KB) would fit in the pipe, so the reader closes its end before ssmc writes
    anything, which is what `head -1` does to a longer output after its first line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "ssmc.cli", "explain", "ssmc.ops.ssd:mamba2",
                             "--shape", "b=8,t=16,h=80,p=64,n=128,g=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    proc.stdout.close()  # before the child has imported ssmc, let alone written anything
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
    assert proc.returncode == cli.BROKEN_PIPE_STATUS == 141, err
