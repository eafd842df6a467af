"""`ssmc.export` and `ssmc.load` as public API: an LLVM export of a built-in definition called
like a compiled op, and the calls and requests an export does not cover, refused before the
library runs with an `ssmc.SSMCError` naming expected and actual."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import ssmc
import ssmc.ops
from tests.helpers import compare, gla_inputs, random_state, reference_of

pytest.importorskip("tvm")

GLA = ssmc.ops.gla.definition
SIZES = dict(b=2, t=9, h=3, n=4, p=5)
TOL32 = 2e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """gla's definition for llvm, h=3 n=4 p=5 float32, with initial and final states."""
    out = tmp_path_factory.mktemp("export") / "gla"
    ssmc.export(GLA, target="llvm", shapes=dict(h=3, n=4, p=5), out_dir=out,
                initial_state=True, return_final_state=True)
    return out


@pytest.fixture(scope="module")
def kernel(exported):
    return ssmc.load(exported)


def _inputs(**changes):
    s = {**SIZES, **changes}
    return gla_inputs(s["b"], s["t"], s["h"], s["n"], s["p"], seed=1)


def _close(name, actual, expected):
    result = compare(name, actual, expected, TOL32)
    assert result.ok, str(result)


def test_load_round_trip_matches_reference(kernel):
    assert isinstance(kernel, ssmc.ExportedKernel)
    x, h0 = _inputs(), random_state(2, 3, 4, 5, seed=2)
    y, final = kernel(**x, initial_state=h0)
    ry, rfinal = reference_of(GLA)(**{k: v.double() for k, v in x.items()},
                                   initial_state=h0.double(), return_final_state=True)
    _close("y", y, ry)
    _close("final_state", final, rfinal)
    # by position, another b and t (symbolic in the export), without the final state
    x = _inputs(b=1, t=17)
    y = kernel(*x.values(), return_final_state=False)
    _close("y (b=1, t=17)", y, reference_of(GLA)(*(v.double() for v in x.values())))


def test_missing_initial_state_is_zero(kernel):
    x = _inputs()
    y, final = kernel(**x)
    y0, final0 = kernel(**x, initial_state=torch.zeros(2, 3, 4, 5))
    assert torch.equal(y, y0) and torch.equal(final, final0)


@pytest.mark.parametrize("change, error, message", [
    (dict(h=4), ssmc.ShapeError, "h=4 (in 'q', 'k', 'v', 'g'); the export was compiled for h=3"),
    (dict(n=6), ssmc.ShapeError, "n=6 (in 'q', 'k', 'g'); the export was compiled for n=4"),
    (dict(p=2), ssmc.ShapeError, "p=2 (in 'v'); the export was compiled for p=5"),
])
def test_refuses_sizes(kernel, change, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernel(**_inputs(**change))


def test_refuses_dtype(kernel):
    x = _inputs()
    x["v"] = x["v"].double()
    with pytest.raises(ssmc.DTypeError, match="'v' has dtype float64; the export was compiled "
                                               "for float32"):
        kernel(**x)
    with pytest.raises(ssmc.DTypeError, match="'initial_state' has dtype float64; the export "
                                               "was compiled for float32"):
        kernel(**_inputs(), initial_state=random_state(2, 3, 4, 5, dtype=torch.float64))


def test_refuses_features_not_compiled_in(tmp_path, kernel):
    with pytest.raises(ssmc.ArgumentError, match="'cu_seqlens' was given but the export was "
                                                  "compiled without it"):
        kernel(**_inputs(b=1), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    plain = ssmc.load(ssmc.export(GLA, target="llvm", shapes=dict(h=3, n=4, p=5),
                                  out_dir=tmp_path / "plain"))
    y = plain(**_inputs())
    assert y.shape == (2, 9, 3, 5)
    with pytest.raises(ssmc.ArgumentError, match="'initial_state' was given but the export "
                                                  r"was compiled without it \(export with "
                                                  r"initial_state=True\)"):
        plain(**_inputs(), initial_state=random_state(2, 3, 4, 5))
    with pytest.raises(ssmc.ArgumentError, match="'return_final_state' was given"):
        plain(**_inputs(), return_final_state=True)


def test_call_errors_are_the_compiled_ops(kernel):
    """Binding is a compiled op's: missing and unknown arguments name the definition's."""
    x = _inputs()
    del x["g"]
    with pytest.raises(ssmc.ArgumentError, match="missing tensor argument"):
        kernel(**x)
    with pytest.raises(ssmc.ArgumentError, match="unexpected keyword argument 'w'"):
        kernel(**_inputs(), w=torch.ones(1))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_export_refuses_cpu_tensors(tmp_path):
    """A CUDA export loads on a machine without a GPU (tvm_ffi only) and refuses CPU tensors
    before anything runs."""
    out = ssmc.export(GLA, target="cuda", arch="sm_80", shapes=dict(h=3, n=4, p=5),
                      out_dir=tmp_path / "cuda")
    assert (out / "kernel.cu").exists()
    kernel = ssmc.load(out)
    with pytest.raises(ssmc.DeviceError, match="the inputs are on cpu; this cuda export runs "
                                                "on cuda tensors"):
        kernel(**_inputs())


def test_load_refuses_what_is_not_an_export(tmp_path, exported):
    with pytest.raises(ssmc.ConfigError, match="is not an ssmc export \\(no manifest.json"):
        ssmc.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ssmc.ConfigError, match="format 'other/1', expected 'ssmc-tvm-export/1'"):
        ssmc.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ssmc.ConfigError, match="cannot be read"):
        ssmc.load(tmp_path)
    # a library that does not match its manifest (changed in a copy: rewriting a library this
    # process has mapped would corrupt its pages)
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    lib = copy / json.loads((copy / "manifest.json").read_text())["library"]
    lib.write_bytes(lib.read_bytes() + b"\0")
    with pytest.raises(ssmc.ConfigError, match="does not match its manifest"):
        ssmc.load(copy)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(target="rocm"), ssmc.ConfigError, "target='rocm' is not valid; valid values: llvm, "
                                            "cuda"),
    (dict(target="cuda", arch="90"), ssmc.ConfigError, "arch='90' is not a CUDA architecture"),
    (dict(shapes=dict(h=3, p=5)), ssmc.ConfigError, "shapes needs sizes for n"),
    (dict(shapes=dict(h=3, n=4, p=5, q=2)), ssmc.ConfigError, "unknown axes q"),
    (dict(shapes=dict(h=3, n=0, p=5)), ssmc.ShapeError, "shapes\\['n'\\] must be a positive"),
    (dict(shapes=dict(h=3, g=2, n=4, p=5)), ssmc.ShapeError, "h=3 is not a multiple of groups"),
    (dict(dtype="bf16"), ssmc.ConfigError, "dtype='bf16' is not valid"),
    (dict(lowering="fast"), ssmc.ConfigError, "lowering='fast' is not valid"),
    (dict(input_dtypes=dict(x="float16")), ssmc.ConfigError, "input_dtypes names 'x', which "
                                                            "gla does not take"),
    (dict(target="cuda", lowering="quadratic"), ssmc.UnsupportedError, "no 'quadratic' "
                                                                       "lowering for target"),
])
def test_export_refuses_bad_requests(tmp_path, kwargs, error, message):
    request = {**dict(target="llvm", shapes=dict(h=3, n=4, p=5), out_dir=tmp_path / "e"),
               **kwargs}
    with pytest.raises(error, match=message):
        ssmc.export(GLA, **request)
    assert not (tmp_path / "e").exists()
    with pytest.raises(ssmc.ArgumentError, match="expects an ssmc definition or Program, got "
                                                  "function"):
        ssmc.export(ssmc.ops.gla, target="llvm", shapes=dict(h=3, n=4, p=5))
