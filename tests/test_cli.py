"""The `ssmc` command line: explain (and its defaults), compile, tune and export of built-in
and file definitions, argument errors, and the subcommand registry."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ssmc.ops
from ssmc import cli
from ssmc.devices import device_model
from ssmc.lowerings import choose_lowering
from tests.helpers import compare, gla_inputs, random_state, reference_of

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
    code, out, _ = run(capsys, "explain", "ssmc.ops.ssd:mamba2", "--shape", SHAPE, "--device",
                       "h100")
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
    _, bf16, _ = run(capsys, "explain", "ssmc.ops:mamba2", "--shape", SHAPE, "--device", "h100")
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
    assert "g=1" in out  # one group where no input has the axis, as at call time
    assert "kind: none" in out


@pytest.mark.parametrize("shape, message", [
    ("b=8,t=x,h=80,p=64,n=128,g=1", "--shape item 't=x': size 'x' is not an integer"),
    ("b=8,q=3,h=80,p=64,n=128,g=1", "--shape item 'q=3': unknown axis 'q' "
                                    "(expected one of b k t h g n p)"),
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
    ("ssmc.ops.ssd:nope", "ssmc.ops.ssd has no attribute 'nope'; definitions there: "
                          "definition, mamba2"),
    ("ssmc.ops.ssd:build", "ssmc.ops.ssd:build is a function, not an ssmc definition"),
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
            "(expected one of b k t h g n p)") in err


def test_explain_dotted_attribute(capsys):
    code, out, err = run(capsys, "explain", "ssmc:ops.mamba2", "--shape", SHAPE, "--device",
                         "h100")
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
                          "--shape", "b=8,t=16,h=80,p=64,n=128,g=1", "--device", "h100"],
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


# -- the device at hand, built-in definitions, export --------------------------------------

def ssmc_command(*argv, env=None, cwd=REPO):
    """`python -m ssmc.cli ARGV` in a fresh process, as the `ssmc` script runs it."""
    env = dict(os.environ, **(env or {}),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ssmc.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_explain_defaults_to_the_device_at_hand():
    done = ssmc_command("explain", "ssmc.ops.ssd:mamba2", "--shape", SHAPE)
    assert done.returncode == 0, done.stderr
    if torch.cuda.is_available():
        model = device_model(torch.device("cuda"))
        assert f"dtype: bf16 (E=2 bytes)   device: {model}" in done.stdout
        assert f"device {model} by default: the GPU here, " in done.stdout
    else:
        assert "dtype: fp32 (E=4 bytes)   device: cpu" in done.stdout
        assert ("device cpu by default: no CUDA GPU here, so the CPU and TVM's LLVM target "
                "(--device overrides)") in done.stdout
        assert "dtype fp32 by default on cpu (--dtype overrides)" in done.stdout


@pytest.mark.parametrize("flags, shown, defaults", [
    (("--device", "a100"), "dtype: bf16 (E=2 bytes)   device: a100",
     ["dtype bf16 by default on a100"]),
    (("--dtype", "fp16"), "dtype: fp16 (E=2 bytes)   device: ", ["device "]),
    (("--device", "cpu", "--dtype", "fp64"), "dtype: fp64 (E=8 bytes)   device: cpu", []),
])
def test_explain_flags_override_the_defaults(capsys, flags, shown, defaults):
    code, out, err = run(capsys, "explain", "ssmc.ops.ssd:mamba2", "--shape", SHAPE, *flags)
    assert code == 0, err
    assert shown in out
    said = [ln for ln in out.splitlines() if "by default" in ln]
    assert [ln[:len(d)] for ln, d in zip(said, defaults)] == defaults and len(said) == len(
        defaults)


BUILTINS = {  # keyword function -> the name of its definition's program, a shape it takes
    "ssd": ("ssd", "b=1,t=64,h=4,g=1,n=16,p=8"),
    "selective_scan": ("selective_scan", "b=1,t=64,h=16,g=1,n=4,p=1"),
    "gla": ("gla", "b=1,t=64,h=4,n=16,p=8"),
    "retention": ("retention", "b=1,t=64,h=4,n=16,p=8"),
    "linear_attention": ("linear_attention", "b=1,t=64,h=4,n=16,p=8"),
}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_explain_every_builtin(capsys, name):
    program, shape = BUILTINS[name]
    definition = getattr(ssmc.ops, name).definition
    code, out, err = run(capsys, "explain", f"ssmc.ops.{name}:definition", "--shape", shape)
    assert code == 0, err
    assert ssmc.ir.print_program(definition.program) in out and err == ""
    # the keyword function stands for its definition, and says so
    code, by_function, err = run(capsys, "explain", f"ssmc.ops.{name}:{name}", "--shape", shape)
    assert code == 0, err
    assert (f"note: ssmc.ops.{name}:{name} is a function; using its definition "
            f"ssmc.ops.{name}:{name}.definition ({program})") in err
    assert by_function.split("\n", 1)[1] == out.split("\n", 1)[1]


def test_compile_builtin_definition(capsys):
    assert cli.main(["compile", "ssmc.ops.retention:retention", "--emit", "tvm", "--lowering",
                     "scan", "--dtype", "fp32", "--shape", "b=1,t=8,h=2,n=4,p=4"]) == 0
    out, err = capsys.readouterr()
    assert "def ssmc_scan_fwd" in out and "retention.definition" in err


def test_tune_builtin_function(tmp_path):
    """`ssmc tune` of a keyword function tunes its definition (on the CPU backend here)."""
    done = ssmc_command("tune", "ssmc.ops.linear_attention:linear_attention", "--shape",
                        "b=1,t=8,h=2,n=4,p=4", "--dtype", "fp32", "--device", "cpu",
                        "--max-configs", "2", env={"SSMC_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "linear_attention b=1 t=8 h=2 g=1 n=4 p=4 fp32 lowering=all on cpu" in done.stdout
    assert "stored linear-attention_auto_fp32_" in done.stdout
    assert "linear_attention.definition" in done.stderr


def test_export_then_load_round_trip(tmp_path):
    """`ssmc export` in one process, `ssmc.load` in this one: equal to the reference."""
    out = tmp_path / "gla"
    done = ssmc_command("export", "ssmc.ops.gla:definition", "--target", "llvm", "--shape",
                        "b=2,h=3,n=4,p=5", "--initial-state", "--final-state", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert ("exported gla: scan lowering for llvm, h=3 g=1 n=4 p=5, float32; b and t free"
            in done.stdout)
    assert f"load it with ssmc.load({str(out)!r})" in done.stdout
    assert "note: b stays free in an export; the size given is ignored" in done.stderr
    kernel = ssmc.load(out)
    x = gla_inputs(2, 11, 3, 4, 5, seed=1)
    h0 = random_state(2, 3, 4, 5, seed=2)
    y, final = kernel(**x, initial_state=h0)
    ry, rfinal = reference_of(ssmc.ops.gla.definition)(
        **{k: v.double() for k, v in x.items()}, initial_state=h0.double(),
        return_final_state=True)
    for name, actual, expected in (("y", y, ry), ("final_state", final, rfinal)):
        result = compare(name, actual, expected, 2e-5)
        assert result.ok, str(result)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_export_cuda_sources(capsys, tmp_path):
    """No GPU needed to export for one: nvcc builds the library from the generated source."""
    out = tmp_path / "ssd"
    assert cli.main(["export", "ssmc.ops.ssd:mamba2", "--target", "cuda", "--arch", "sm_80",
                     "--shape", "h=4,g=2,n=16,p=8", "--dtype", "bf16", "--lowering",
                     "chunked", "--final-state", "-o", str(out)]) == 0
    assert "chunked lowering for cuda sm_80, h=4 g=2 n=16 p=8, bfloat16" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == "sm_80" and manifest["dtype"] == "bfloat16"
    assert "__global__" in (out / "kernel.cu").read_text()
    assert (out / manifest["library"]).stat().st_size > 0


@pytest.mark.parametrize("argv, code, message", [
    (("--target", "llvm", "--arch", "sm_80", "--shape", "h=4,n=8,p=8"), 2,
     "error: --arch sm_80 applies to --target cuda only"),
    (("--target", "llvm", "--shape", "h=4,n=8"), 2, "--shape lacks axis 'p'"),
    (("--target", "llvm", "--shape", "h=4,n=8,p=8", "--chunk", "0"), 2,
     "--chunk must be positive, got 0"),
    (("--target", "cuda", "--arch", "90", "--shape", "h=4,n=8,p=8"), 1,
     "ConfigError: export(): arch='90' is not a CUDA architecture like sm_90"),
    (("--target", "cuda", "--lowering", "quadratic", "--shape", "h=4,n=8,p=8"), 1,
     "UnsupportedError: export(): the TVM backend has no 'quadratic' lowering for target "
     "'cuda'"),
])
def test_export_errors(capsys, tmp_path, argv, code, message):
    out = tmp_path / "never"
    assert cli.main(["export", "ssmc.ops.gla:definition", *argv, "-o", str(out)]) == code
    assert message in capsys.readouterr().err
    assert not out.exists()
