"""The TVM backend's forward kernels on the LLVM (CPU) target against the float64 reference.

Every built-in x legal lowering, custom definitions for the reverse and bidirectional
directions and every decay kind, with groups, initial/final states and packed sequences
(cu_seqlens, including an empty one), in fp32 and bf16 (plus fp16/fp64 spot checks).

Tolerances, relative to the reference's scale (max |reference|), on outputs and final states:
    fp32 / fp64 compute: relative RMS error <= 1e-5 and max error <= 2e-5 * max|ref|
    bf16 / fp16 inputs and outputs: <= 1e-2 (the reference sees the same rounded inputs; what
    is left is the output's rounding and fp32 accumulation).
Compiled kernels are cached in memory per plan (ssmc.ops / CompiledOp) and on disk in a
per-session directory; t = 75 and 90 cover several chunks of 64.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

import ssmc  # noqa: E402
import ssmc.ops  # noqa: E402
from ssmc import dsl as S  # noqa: E402
from ssmc import reference  # noqa: E402
from ssmc.backends import get_backend  # noqa: E402
from ssmc.lowerings import legal_lowerings  # noqa: E402
from ssmc.validate import bind  # noqa: E402

LOWERINGS = ("scan", "chunked", "quadratic")
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")


# ------------------------------------------------------------------------------ helpers

def _rel_errors(actual, expected):
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "non-finite values (an unwritten output is NaN in tests)"
    scale = max(float(e.abs().max()), 1e-30)
    diff = a - e
    return float(diff.norm() / max(float(e.norm()), 1e-30)), float(diff.abs().max()) / scale


def check(program, out, args, kwargs, dtype, what=""):
    """Compare an op's result with ssmc.reference.scan on the same (upcast) inputs."""
    b = bind(program, args, kwargs)
    ref_out, ref_final = reference.scan(program, b.tensors, b.sizes, b.initial_state,
                                        b.cu_seqlens, b.return_final_state)
    tol = TOL[dtype]
    got = out if isinstance(out, tuple) else (out, None)
    assert got[0].dtype == dtype, f"output dtype {got[0].dtype}, expected {dtype}"
    pairs = [("y", got[0], ref_out)]
    if b.return_final_state:
        want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert got[1].dtype == want_dtype
        pairs.append(("final_state", got[1], ref_final))
    for name, a, e in pairs:
        rms, mx = _rel_errors(a, e)
        assert rms <= tol and mx <= 2 * tol, \
            f"{what} {name}: rel RMS {rms:.2e}, rel max {mx:.2e} (tol {tol:.0e})"


def _randn(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def builtin_inputs(name, b, t, h, g, n, p, gen):
    """(op, positional tensors, keyword options) for a built-in of ssmc.ops."""
    if name == "ssd":
        return ssmc.ops.ssd, [_randn(b, t, h, p, gen=gen), _randn(b, t, h, gen=gen, scale=0.5),
                              -(0.5 + 1.5 * torch.rand(h, generator=gen, dtype=torch.float64)),
                              _randn(b, t, g, n, gen=gen), _randn(b, t, g, n, gen=gen)], \
            dict(D=_randn(h, gen=gen), z=_randn(b, t, h, p, gen=gen),
                 dt_bias=_randn(h, gen=gen, scale=0.5), dt_softplus=True)
    if name == "selective_scan":  # h channels, p = 1
        return ssmc.ops.selective_scan, [
            _randn(b, t, h, gen=gen), _randn(b, t, h, gen=gen, scale=0.5),
            -(0.5 + 1.5 * torch.rand(h, n, generator=gen, dtype=torch.float64)),
            _randn(b, t, g, n, gen=gen), _randn(b, t, g, n, gen=gen)], \
            dict(D=_randn(h, gen=gen), z=_randn(b, t, h, gen=gen),
                 delta_bias=_randn(h, gen=gen, scale=0.5), delta_softplus=True)
    qkv = [_randn(b, t, h, n, gen=gen), _randn(b, t, h, n, gen=gen), _randn(b, t, h, p, gen=gen)]
    if name == "retention":
        return ssmc.ops.retention, qkv + [0.5 + 0.49 * torch.rand(h, generator=gen,
                                                                   dtype=torch.float64)], {}
    if name == "gla":
        g_ = torch.nn.functional.logsigmoid(_randn(b, t, h, n, gen=gen) + 2.0)
        return ssmc.ops.gla, qkv + [g_], {}
    return ssmc.ops.linear_attention, qkv, {}


BUILTINS = ("ssd", "selective_scan", "retention", "gla", "linear_attention")
#: name -> decay kind (decides the legal lowerings)
# retention's gamma is an input that may be 0 or negative: the chunked lowering refuses it
# (tests/backends/test_decay_domain.py)
BUILTIN_LEGAL = {"ssd": LOWERINGS, "selective_scan": LOWERINGS,
                 "retention": tuple(lw for lw in LOWERINGS if lw != "chunked"),
                 "gla": LOWERINGS, "linear_attention": LOWERINGS}
FEATURES = ("plain", "states", "varlen", "bf16")


def _builtin_cases():
    for name in BUILTINS:
        for lowering in BUILTIN_LEGAL[name]:
            for feature in FEATURES:
                yield pytest.param(name, lowering, feature, id=f"tvm-{lowering}-{name}-{feature}")


def _as(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


@pytest.mark.parametrize("name,lowering,feature", list(_builtin_cases()))
def test_builtin_forward(name, lowering, feature):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{lowering}{feature}".encode()))
    dtype = torch.bfloat16 if feature == "bf16" else torch.float32
    h, g = (4, 2) if name in ("ssd", "selective_scan") else (3, 3)
    n, p = 8, (1 if name == "selective_scan" else 6)
    if feature == "varlen":
        b, t, lengths = 1, 90, [17, 0, 63, 10]
    else:
        b, t, lengths = 2, 75, None
    op, args, opts = builtin_inputs(name, b, t, h, g, n, p, gen)
    args = [_as(a, dtype) for a in args]
    opts = {k: _as(v, dtype) for k, v in opts.items()}
    extra = {}
    if feature in ("states", "varlen"):
        nseq = b if lengths is None else len(lengths)
        shape = (nseq, h, n) if name == "selective_scan" else (nseq, h, n, p)
        extra = dict(initial_state=_randn(*shape, gen=gen).float(), return_final_state=True)
    if lengths is not None:
        extra["cu_seqlens"] = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)),
                                           dtype=torch.int32)
    out = op(*args, **opts, **extra, backend="tvm", lowering=lowering)
    # the reference: the same built-in on the reference backend, in float64
    ref = op(*[_as(a, torch.float64) for a in args],
             **{k: _as(v, torch.float64) for k, v in opts.items()},
             **{k: _as(v, torch.float64) for k, v in extra.items()},
             backend="reference", lowering="scan")
    got = out if isinstance(out, tuple) else (out,)
    want = ref if isinstance(ref, tuple) else (ref,)
    assert got[0].dtype == dtype
    tol = TOL[dtype]
    for what, a, e in zip(("y", "final_state"), got, want):
        rms, mx = _rel_errors(a, e)
        assert rms <= tol and mx <= 2 * tol, \
            f"{name} {lowering} {feature} {what}: rel RMS {rms:.2e}, rel max {mx:.2e}"


# ------------------------------------------------------------ custom definitions, directions

DECAY_AXES = {"none": None, "time_invariant": "h n", "scalar": "b t h", "diagonal": "b t h n",
              "full": "b t h n p"}


def make_definition(decay, direction):
    """q, k: "b t g n"; v, z: "b t h p"; a: the decay's axes (sigmoid(a + 2) in (0, 1));
    D: "h". Returns (y + D v) * silu(z)."""
    axes = {"q": "b t g n", "k": "b t g n", "v": "b t h p", "z": "b t h p", "D": "h"}
    if DECAY_AXES[decay] is not None:
        axes["a"] = DECAY_AXES[decay]

    def body(*args):
        v = dict(zip(axes, args))
        dec = S.sigmoid(v["a"] + 2) if "a" in v else None
        y = S.recurrence(decay=dec, key=v["k"], value=v["v"], query=v["q"], direction=direction)
        return (y + v["D"] * v["v"]) * S.silu(v["z"])

    body.__signature__ = inspect.Signature([
        inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for k, a in axes.items()])
    return ssmc.ssm(body, name=f"{decay}_{direction}")


def random_inputs(program, sizes, gen, dtype=torch.float32):
    return [_randn(*(sizes[a] for a in i.axes), gen=gen).to(dtype) for i in program.inputs]


def _direction_cases():
    for direction in ("reverse", "bidirectional"):
        for decay in DECAY_AXES:
            defn = make_definition(decay, "forward")  # legality depends on the decay only
            for lowering in legal_lowerings(defn.program):
                yield pytest.param(decay, direction, lowering,
                                   id=f"tvm-{lowering}-{decay}-{direction}")


_DEFS: dict = {}


def _definition(decay, direction):
    key = (decay, direction)
    if key not in _DEFS:
        _DEFS[key] = make_definition(decay, direction)
    return _DEFS[key]


@pytest.mark.parametrize("decay,direction,lowering", list(_direction_cases()))
def test_custom_directions(decay, direction, lowering):
    defn = _definition(decay, direction)
    op = ssmc.compile(defn, backend="tvm", lowering=lowering)
    gen = torch.Generator().manual_seed(7)
    D = 2 if direction == "bidirectional" else 1
    # a plain batch with initial and final states
    sizes = dict(b=2, t=75, h=4, g=2, n=5, p=6)
    args = random_inputs(defn.program, sizes, gen)
    h0 = _randn(*((D,) if D > 1 else ()), 2, 4, 5, 6, gen=gen).float()
    kw = dict(initial_state=h0, return_final_state=True)
    check(defn.program, op(*args, **kw), args, kw, torch.float32, f"{decay}/{direction}")
    # packed sequences, one of them empty
    sizes = dict(b=1, t=90, h=4, g=2, n=5, p=6)
    args = random_inputs(defn.program, sizes, gen)
    cu = torch.tensor([0, 30, 30, 90], dtype=torch.int64)
    h0 = _randn(*((D,) if D > 1 else ()), 3, 4, 5, 6, gen=gen).float()
    kw = dict(initial_state=h0, return_final_state=True, cu_seqlens=cu)
    check(defn.program, op(*args, **kw), args, kw, torch.float32, f"{decay}/{direction} varlen")
    # no state at all, bf16
    sizes = dict(b=2, t=33, h=4, g=2, n=5, p=6)
    args = random_inputs(defn.program, sizes, gen, torch.bfloat16)
    check(defn.program, op(*args), args, {}, torch.bfloat16, f"{decay}/{direction} bf16")


# ------------------------------------------------------------ user-style definitions

@ssmc.ssm
def gated_tanh(x: S.In["b t h p"], a: S.In["b t h"], k: S.In["b t g n"], q: S.In["b t g n"],
               w: S.In["h p"]):
    """A sigmoid-gated scalar decay, keys normalised with sqrt, a tanh epilogue."""
    key = k / S.sqrt(1 + k * k)
    y = S.recurrence(decay=S.sigmoid(a), key=key, value=x * (1 - S.sigmoid(a)), query=q)
    return S.tanh(y) * w + x / (1 + S.abs(x))


@ssmc.ssm
def clamped_per_key(v: S.In["b t h p"], f: S.In["b t h n"], k: S.In["b t h n"],
                    q: S.In["b t h n"], s: S.In["h"]):
    """A per-key decay exp(-clamp(softplus(f), 0.05, 3)), a clamp and a power in the epilogue."""
    decay = S.exp(-S.clamp(S.softplus(f), 0.05, 3.0))
    y = S.recurrence(decay=decay, key=k * s, value=v, query=q ** 2 - 0.5)
    return S.clamp(y, -4.0, 4.0) + S.maximum(v, 0) * S.minimum(s, 1.0)


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("defn", [gated_tanh, clamped_per_key], ids=lambda d: d.name)
def test_user_definitions(defn, lowering):
    op = ssmc.compile(defn, backend="tvm", lowering=lowering)
    gen = torch.Generator().manual_seed(3)
    sizes = dict(b=2, t=70, h=4, g=2, n=7, p=5)
    args = random_inputs(defn.program, sizes, gen)
    h0 = _randn(2, 4, 7, 5, gen=gen).float() * 0.1
    kw = dict(initial_state=h0, return_final_state=True)
    check(defn.program, op(*args, **kw), args, kw, torch.float32, defn.name)
    args16 = [a.bfloat16() for a in args]
    check(defn.program, op(*args16), args16, {}, torch.bfloat16, defn.name + " bf16")


# ------------------------------------------------------------ dtypes, layout, backend API

def test_fp16_and_fp64():
    defn = _definition("scalar", "forward")
    gen = torch.Generator().manual_seed(11)
    sizes = dict(b=2, t=40, h=4, g=2, n=5, p=6)
    for dtype in (torch.float16, torch.float64):
        for lowering in LOWERINGS:
            op = ssmc.compile(defn, backend="tvm", lowering=lowering)
            args = random_inputs(defn.program, sizes, gen, dtype)
            kw = dict(return_final_state=True)
            check(defn.program, op(*args, **kw), args, kw, dtype, f"{dtype} {lowering}")


def test_mixed_dtypes_and_non_contiguous():
    defn = _definition("diagonal", "forward")
    op = ssmc.compile(defn, backend="tvm", lowering="chunked")
    gen = torch.Generator().manual_seed(5)
    sizes = dict(b=2, t=20, h=4, g=2, n=5, p=6)
    args = random_inputs(defn.program, sizes, gen)
    # a transposed view (non-contiguous) and a bf16 value alongside fp32 tensors
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    assert not args[0].is_contiguous()
    args[2] = args[2].bfloat16()
    check(defn.program, op(*args), args, {}, torch.bfloat16, "mixed")


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("b", [1, 3])
def test_empty_sequences_pass_the_state_through(b, lowering):
    """t = 0 with any batch: an empty output and the initial state as the final state (with
    b > 1 the kernels once got zero-size inputs whose strides TVM refused, a raw ValueError)."""
    defn = gated_tanh
    gen = torch.Generator().manual_seed(3)
    x = dict(x=torch.randn(b, 0, 2, 4), a=torch.randn(b, 0, 2), k=torch.randn(b, 0, 1, 3),
             q=torch.randn(b, 0, 1, 3), w=torch.randn(2, 4, generator=gen))
    h0 = torch.randn(b, 2, 3, 4, generator=gen)
    y, hT = ssmc.compile(defn, backend="tvm", lowering=lowering)(
        **x, initial_state=h0, return_final_state=True)
    assert y.shape == (b, 0, 2, 4) and torch.equal(hT, h0)
    _, hT = ssmc.compile(defn, backend="tvm", lowering=lowering)(**x, return_final_state=True)
    assert not hT.any()


def test_one_kernel_serves_all_lengths():
    defn = _definition("scalar", "forward")
    op = ssmc.compile(defn, backend="tvm", lowering="chunked")
    gen = torch.Generator().manual_seed(9)
    for b, t in ((1, 1), (3, 64), (2, 129)):
        args = random_inputs(defn.program, dict(b=b, t=t, h=4, g=2, n=5, p=6), gen)
        check(defn.program, op(*args), args, {}, torch.float32, f"b={b} t={t}")
    kernel = next(iter(op._kernels.values()))
    assert len(kernel._functions) == 1


def test_backend_contract():
    backend = get_backend("tvm")
    assert backend.is_available()
    assert "tvm-0." in backend.cache_tag()
    full = _definition("full", "forward")
    op = ssmc.compile(full, backend="tvm", lowering="scan")
    from ssmc.plan import Plan
    plan = Plan(program=full.program, lowering="chunked", dtype="float32")
    assert "not legal" in backend.supports(plan)
    assert backend.supports(Plan(program=full.program, lowering="scan", dtype="float32")) is None
    del op


def test_disk_cache_survives_corruption(tmp_path, monkeypatch):
    """A later process loads the cached library; a corrupt entry is rebuilt, not a crash."""
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    code = (
        "import torch, ssmc\n"
        "from ssmc import dsl as S\n"
        "@ssmc.ssm\n"
        "def f(x: S.In['b t h p'], a: S.In['b t h'], k: S.In['b t h n']):\n"
        "    return S.recurrence(decay=S.sigmoid(a), key=k, value=x, query=k)\n"
        "op = ssmc.compile(f, backend='tvm', lowering='scan')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "y = op(torch.randn(1, 9, 2, 3, generator=g), torch.randn(1, 9, 2, generator=g),"
        " torch.randn(1, 9, 2, 4, generator=g))\n"
        "print(float(y.double().sum()))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(ssmc.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    def run():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env=env)
    first = run()
    assert first.returncode == 0, first.stderr
    libs = list(tmp_path.rglob("kernel.so"))
    sources = list(tmp_path.rglob("kernel.tvmscript"))
    assert len(libs) == 1 and len(sources) == 1
    stamp = libs[0].stat().st_mtime_ns
    second = run()
    assert second.returncode == 0 and second.stdout == first.stdout
    assert libs[0].stat().st_mtime_ns == stamp, "the second process rebuilt instead of loading"
    libs[0].write_bytes(b"not a shared library")
    third = run()
    assert third.returncode == 0, third.stderr
    assert third.stdout == first.stdout


@ssmc.ssm
def clashing_names(out: S.In["b t h p"], cu: S.In["b t h"], T: S.In["b t h n"],
                   B: S.In["b t h n"], y_: S.In["h"]):
    """Input names that the generated code also uses (prefixed there, so no clash)."""
    return S.recurrence(decay=S.sigmoid(cu), key=T, value=out, query=B) + y_


def test_input_names_do_not_clash():
    gen = torch.Generator().manual_seed(4)
    sizes = dict(b=1, t=30, h=2, g=2, n=3, p=4)
    args = random_inputs(clashing_names.program, sizes, gen)
    kw = dict(cu_seqlens=torch.tensor([0, 10, 30]), return_final_state=True)
    for lowering in LOWERINGS:
        op = ssmc.compile(clashing_names, backend="tvm", lowering=lowering)
        check(clashing_names.program, op(*args, **kw), args, kw, torch.float32, lowering)
