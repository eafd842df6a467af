"""`CompiledOp.step`: a decode loop reproduces the full-sequence forward, and bad input is
reported before anything runs (ssmc/step.py)."""
from __future__ import annotations

import importlib
import inspect
import types

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.ops.ssd import mamba2
from tests.helpers import TorchOps

# the modules, not the functions of the same name that ssmc.ops exports
gla_module = importlib.import_module("ssmc.ops.gla")
selective_scan_module = importlib.import_module("ssmc.ops.selective_scan")

#: fp32 decode vs forward: both run the same scan in fp32, so only reassociation differs
TOL_FP32 = 1e-5
#: bf16 outputs: one bf16 rounding of the same fp32 value at most
TOL_BF16 = 1e-2

BACKENDS = ("triton", "reference")


def _custom():
    """Per-key sigmoid decay, groups, and an epilogue with a per-head skip and a tanh gate."""
    axes = {"q": "b t g n", "k": "b t g n", "v": "b t h p", "a": "b t h n", "w": "h",
            "z": "b t h p"}

    def custom(*args):
        q, k, v, a, w, z = args
        y = S.recurrence(decay=S.sigmoid(a + 1.5), key=k * 0.5, value=v, query=q)
        return (y + w * v) * S.tanh(z)

    custom.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for n, a in axes.items()])
    return ssmc.ssm(custom, name="custom_step")


def _directional(direction):
    def body(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], a: S.In["b t h"]):
        return S.recurrence(decay=S.sigmoid(a), key=k, value=v, query=q, direction=direction)
    return ssmc.ssm(body, name=f"step_{direction}")


#: name -> (definition, sizes, {input: (low, high) for uniform inputs; others standard normal})
CASES = {
    "ssd": (mamba2, dict(b=2, h=2, g=1, n=4, p=3), {"A": (-2.0, -0.5)}),
    "selective_scan": (selective_scan_module.build(has_D=True, has_z=True, delta_softplus=True),
                       dict(b=1, h=3, g=1, n=4, p=1), {"A": (-2.0, -0.5)}),
    "gla": (gla_module.build(scale=0.5), dict(b=1, h=2, g=2, n=4, p=5), {"g": (-0.3, -0.01)}),
    "custom": (_custom(), dict(b=1, h=4, g=2, n=3, p=2), {}),
}


def _inputs(program, sizes, ranges, t, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = dict(sizes, t=t)
    out = {}
    for inp in program.inputs:
        shape = tuple(sizes[a] for a in inp.axes)
        if inp.name in ranges:
            lo, hi = ranges[inp.name]
            x = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
        else:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
        out[inp.name] = x.to(dtype)
    return out


def _at(program, inputs, i):
    """The inputs of step i: every input over t indexed at i along its t axis."""
    return {inp.name: inputs[inp.name].select(inp.axes.index("t"), i) if "t" in inp.axes
            else inputs[inp.name] for inp in program.inputs}


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _decode(op, inputs, state, t, keywords=False):
    names = op.program.input_names
    ys = []
    for i in range(t):
        step_inputs = _at(op.program, inputs, i)
        if keywords:
            ys.append(op.step(state, **step_inputs))
        else:
            ys.append(op.step(state, *(step_inputs[n] for n in names)))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_step_decode_loop_matches_forward(name, backend):
    definition, sizes, ranges = CASES[name]
    op = ssmc.compile(definition, backend=backend, lowering="scan")
    T = 24
    inputs = _inputs(op.program, sizes, ranges, T)
    b, h, n, p = (sizes[a] for a in "bhnp")
    h0 = torch.randn(b, h, n, p, generator=torch.Generator().manual_seed(1))
    y_full, h_full = op(**inputs, initial_state=h0, return_final_state=True)

    state = h0.clone()
    ptr = state.data_ptr()
    y_dec = _decode(op, inputs, state, T, keywords=name == "gla")
    assert state.data_ptr() == ptr  # updated in place, never replaced
    assert y_dec.shape == y_full.shape and y_dec.dtype == y_full.dtype
    assert torch.isfinite(y_dec).all() and torch.isfinite(state).all()
    assert _rel(y_dec, y_full) <= TOL_FP32, _rel(y_dec, y_full)
    assert _rel(state, h_full) <= TOL_FP32, _rel(state, h_full)
    # and both agree with the float64 reference, so the comparison is not vacuous
    y_ref, h_ref = ssmc.compile(definition, backend="reference", lowering="scan")(
        **{k: v.double() for k, v in inputs.items()}, initial_state=h0.double(),
        return_final_state=True)
    assert _rel(y_dec, y_ref) <= TOL_FP32 and _rel(state, h_ref) <= TOL_FP32


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_bf16_inputs_keep_an_fp32_state(backend):
    definition, sizes, ranges = CASES["ssd"]
    op = ssmc.compile(definition, backend=backend, lowering="scan")
    T = 6
    inputs = _inputs(op.program, sizes, ranges, T, dtype=torch.bfloat16, seed=3)
    y_full, h_full = op(**inputs, return_final_state=True)
    b, h, n, p = (sizes[a] for a in "bhnp")
    state = torch.zeros(b, h, n, p)
    y_dec = _decode(op, inputs, state, T)
    assert y_dec.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert _rel(y_dec, y_full) <= TOL_BF16
    assert _rel(state, h_full) <= TOL_FP32


def test_step_returns_output_axes_without_t():
    op = ssmc.compile(mamba2, backend="reference")
    sizes = dict(b=3, h=4, g=2, n=5, p=6)
    inputs = _at(op.program, _inputs(op.program, sizes, {"A": (-1.0, -0.5)}, 1), 0)
    state = torch.zeros(3, 4, 5, 6)
    y = op.step(state, **inputs)
    assert y.shape == (3, 4, 6) and y.dtype == torch.float32
    assert state.abs().sum() > 0


def test_step_ignores_the_ops_lowering():
    """A decode step is always the scan, whatever lowering the op was compiled for."""
    definition, sizes, ranges = CASES["gla"]
    op_q = ssmc.compile(definition, backend="reference", lowering="quadratic")
    op_s = ssmc.compile(definition, backend="reference", lowering="scan")
    inputs = _at(op_q.program, _inputs(op_q.program, sizes, ranges, 1), 0)
    s1, s2 = torch.ones(1, 2, 4, 5), torch.ones(1, 2, 4, 5)
    torch.testing.assert_close(op_q.step(s1, **inputs), op_s.step(s2, **inputs))
    torch.testing.assert_close(s1, s2)


# --------------------------------------------------------------------------- errors

def _ssd_step_args(sizes=dict(b=2, h=2, g=1, n=4, p=3)):
    op = ssmc.compile(mamba2, backend="reference")
    inputs = _at(op.program, _inputs(op.program, sizes, {"A": (-1.0, -0.5)}, 1), 0)
    state = torch.zeros(sizes["b"], sizes["h"], sizes["n"], sizes["p"])
    return op, inputs, state


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_step_rejects_non_causal_definitions(direction):
    op = ssmc.compile(_directional(direction), backend="reference")
    q, k, a = torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(1, 2)
    with pytest.raises(ssmc.UnsupportedError, match=f"direction='{direction}'.*forward"):
        op.step(torch.zeros(1, 2, 3, 4), q, k, torch.randn(1, 2, 4), a)


@pytest.mark.parametrize("bad, error, pattern", [
    (torch.zeros(2, 2, 3, 4), ssmc.ShapeError,
     r"'state' has shape \(2, 2, 3, 4\); expected \(b, h, n, p\) = \(2, 2, 4, 3\)"),
    (torch.zeros(2, 2, 4), ssmc.ShapeError, r"'state' has shape \(2, 2, 4\); expected"),
    (torch.zeros(2, 2, 4, 3, dtype=torch.float64), ssmc.DTypeError,
     r"'state' has dtype torch.float64; expected one of torch.float32, torch.bfloat16, "
     r"torch.float16 for torch.float32 inputs"),
    (torch.zeros(2, 2, 4, 1).expand(2, 2, 4, 3), ssmc.ShapeError,
     r"'state' has overlapping elements"),
    ([[0.0]], ssmc.DTypeError, r"'state' must be a torch.Tensor"),
    (torch.zeros(2, 2, 4, 3, device="meta"), ssmc.DeviceError,
     r"'state' is on meta but the inputs are on cpu"),
])
def test_step_state_errors(bad, error, pattern):
    op, inputs, _ = _ssd_step_args()
    with pytest.raises(error, match=pattern):
        op.step(bad, **inputs)


def test_step_state_that_requires_grad_is_rejected():
    op, inputs, state = _ssd_step_args()
    with pytest.raises(ssmc.ConfigError, match="'state' requires grad") as info:
        op.step(state.requires_grad_(), **inputs)
    assert isinstance(info.value, ValueError)


def test_step_input_with_time_axis_is_rejected():
    op, inputs, state = _ssd_step_args()
    inputs["x"] = inputs["x"].unsqueeze(1)  # (b, 1, h, p): a full-call shape, not a step's
    with pytest.raises(ssmc.ShapeError, match=r"'x' is annotated \"b t h p\"; one step takes "
                       r"it without the time axis, \"b h p\" \(3 axes\), but it has shape "
                       r"\(2, 1, 2, 3\)"):
        op.step(state, **inputs)


def test_step_size_mismatch_is_reported_as_the_steps():
    op, inputs, state = _ssd_step_args()
    inputs["C"] = torch.randn(2, 1, 5)  # n=5 against B's n=4
    with pytest.raises(ssmc.ShapeError, match=r"^ssd\.step\(\): 'C' has n=5 but 'B' has n=4"):
        op.step(state, **inputs)


def test_step_errors_leave_the_state_untouched():
    op, inputs, state = _ssd_step_args()
    state.fill_(3.0)
    inputs["dt"] = inputs["dt"].to(torch.int32)
    with pytest.raises(ssmc.DTypeError, match=r"ssd\.step\(\): 'dt' has dtype torch.int32"):
        op.step(state, **inputs)
    assert (state == 3.0).all()


@pytest.mark.parametrize("extra", ["initial_state", "return_final_state", "cu_seqlens"])
def test_step_rejects_full_call_options(extra):
    op, inputs, state = _ssd_step_args()
    with pytest.raises(ssmc.ArgumentError, match=f"'{extra}'") as info:
        op.step(state, **inputs, **{extra: None})
    assert isinstance(info.value, TypeError)


def test_step_argument_count_errors():
    op, inputs, state = _ssd_step_args()
    names = op.program.input_names
    args = [inputs[n] for n in names]
    with pytest.raises(ssmc.ArgumentError, match=r"^ssd\.step\(\) missing tensor argument"):
        op.step(state, *args[:-1])
    with pytest.raises(ssmc.ArgumentError, match="takes the state and 7 tensor arguments"):
        op.step(state, *args, args[0])
    with pytest.raises(ssmc.ArgumentError, match=r"^ssd\.step\(\) got an unexpected keyword "
                       r"argument 'w'"):
        op.step(state, *args, w=args[0])
    with pytest.raises(ssmc.ShapeError, match=r"'x' is annotated \"b t h p\"; one step"):
        op.step(*args)  # forgot the state: x is taken as the state and dt (b, h) as x




# --------------------------------------------------------------------------- serving

def _raw_decay(axes):
    """A decay that is an input as it is: any real number (zero, negative, underflowing)."""
    def body(q, k, v, a, z):
        y = S.recurrence(decay=a, key=k, value=v, query=q)
        return y * S.sigmoid(z)

    annotations = {"q": "b t g n", "k": "b t g n", "v": "b t h p", "a": axes, "z": "b t h p"}
    body.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for n, a in annotations.items()])
    return ssmc.ssm(body, name="raw_decay_" + axes.replace(" ", ""))


def _no_decay():
    def body(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q)
    return ssmc.ssm(body, name="no_decay")


def _invariant():
    def body(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], a: S.In["h"]):
        return S.recurrence(decay=S.sigmoid(a), key=k, value=v, query=q)
    return ssmc.ssm(body, name="invariant_decay")


#: decays the language accepts and the kernels must get exactly right
EDGE_DECAYS = (0.0, -0.7, 1e-39, -1e-40, 1.0 - 1e-7, 1.0, -1.0, 1e-30)

#: name -> (definition, sizes, ranges) covering every decay kind
KINDS = {
    "none": (_no_decay(), dict(b=2, h=2, g=2, n=3, p=4), {}),
    "invariant": (_invariant(), dict(b=1, h=3, g=3, n=4, p=2), {}),
    "scalar-signed": (_raw_decay("b t h"), dict(b=2, h=4, g=2, n=3, p=3), {"a": (-1.2, 1.2)}),
    "per-key-signed": (_raw_decay("b t h n"), dict(b=1, h=2, g=1, n=5, p=3),
                       {"a": (-1.2, 1.2)}),
    "full-signed": (_raw_decay("b t h p n"), dict(b=1, h=2, g=2, n=3, p=4),
                    {"a": (-1.2, 1.2)}),
}


def _with_edge_decays(program, inputs, seed):
    """Every tenth or so decay value replaced by one of EDGE_DECAYS."""
    if "a" not in inputs or "t" not in program.input("a").axes:
        return inputs
    a = inputs["a"].clone()
    gen = torch.Generator().manual_seed(seed)
    pick = torch.rand(a.shape, generator=gen) < 0.3
    edges = torch.tensor(EDGE_DECAYS, dtype=a.dtype)
    a[pick] = edges[torch.randint(len(EDGE_DECAYS), (int(pick.sum()),), generator=gen)]
    return dict(inputs, a=a)


def _reference(definition, inputs, h0):
    op = ssmc.compile(definition, backend="reference", lowering="scan")
    return op(**{k: v.double() for k, v in inputs.items()}, initial_state=h0.double(),
              return_final_state=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_step_and_decode_match_the_forward_for_every_decay_kind(kind):
    """One token at a time and all tokens in one decode call both reproduce the forward (and
    the float64 reference), zero, negative and underflowing decays included."""
    definition, sizes, ranges = KINDS[kind]
    op = ssmc.compile(definition, backend="triton", lowering="scan")
    T = 5
    inputs = _with_edge_decays(op.program, _inputs(op.program, sizes, ranges, T, seed=7), 8)
    b, h, n, p = (sizes[a] for a in "bhnp")
    h0 = torch.randn(b, h, n, p, generator=torch.Generator().manual_seed(9))
    y_full, h_full = op(**inputs, initial_state=h0, return_final_state=True)
    y_ref, h_ref = _reference(definition, inputs, h0)

    state = h0.clone()
    y_step = _decode(op, inputs, state, T)
    many = h0.clone()
    y_many = op.decode(many, **inputs)
    assert y_many.shape == y_full.shape
    for y, s in ((y_step, state), (y_many, many)):
        assert _rel(y, y_full) <= TOL_FP32 and _rel(s, h_full) <= TOL_FP32
        assert _rel(y, y_ref) <= TOL_FP32 and _rel(s, h_ref) <= TOL_FP32


def test_step_zero_decay_resets_the_state_exactly():
    definition, sizes, _ = KINDS["scalar-signed"]
    op = ssmc.compile(definition, backend="triton", lowering="scan")
    inputs = _at(op.program, _inputs(op.program, sizes, {}, 1, seed=2), 0)
    for decay in (0.0, 1e-39, -1e-40):
        inputs["a"] = torch.full_like(inputs["a"], decay)
        state = torch.full((2, 4, 3, 3), 1e30)
        op.step(state, **inputs)
        k = inputs["k"].repeat_interleave(2, dim=1)       # (b, h, n) from the groups
        torch.testing.assert_close(state, k[..., :, None] * inputs["v"][..., None, :],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_step_low_precision_states(dtype, tol):
    """A bf16/fp16 state, fp32 math: each step rounds the stored state once, as the reference
    backend's step does; outputs are in the inputs' dtype."""
    definition, sizes, ranges = CASES["ssd"]
    ops = {be: ssmc.compile(definition, backend=be) for be in ("triton", "reference")}
    T = 4
    inputs = _inputs(ops["triton"].program, sizes, ranges, T, seed=4)
    b, h, n, p = (sizes[a] for a in "bhnp")
    h0 = torch.randn(b, h, n, p, generator=torch.Generator().manual_seed(5)).to(dtype)
    states = {be: h0.clone() for be in ops}
    ys = {be: _decode(op, inputs, states[be], T) for be, op in ops.items()}
    assert states["triton"].dtype == dtype and ys["triton"].dtype == torch.float32
    assert _rel(ys["triton"], ys["reference"]) <= tol
    assert _rel(states["triton"], states["reference"]) <= tol
    y_full, h_full = ops["reference"](**inputs, initial_state=h0.float(),
                                      return_final_state=True)
    assert _rel(states["triton"], h_full) <= 4 * tol   # rounding accumulates over the steps


@pytest.mark.parametrize("backend", ["triton", "tvm", "reference"])
def test_step_state_cache_slots_with_padding(backend):
    """state_batch_indices: each sequence reads and writes its own slot; padding (negative) and
    slots past the cache are skipped (zeros out, nothing written); other slots are untouched."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    definition, sizes, ranges = CASES["custom"]
    op = ssmc.compile(definition, backend=backend, lowering="scan")
    sizes = dict(sizes, b=4)
    inputs = _at(op.program, _inputs(op.program, sizes, ranges, 1, seed=6), 0)
    h, n, p = (sizes[a] for a in "hnp")
    cache = torch.randn(6, h, n, p, generator=torch.Generator().manual_seed(7))
    before = cache.clone()
    slots = torch.tensor([4, -1, 0, 9] if backend != "reference" else [4, -1, 0, -1])
    y = op.step(cache, **inputs, state_batch_indices=slots)

    dense = before[[4, 0, 0, 0]].clone()   # rows 1 and 3 are padding; their values unused
    y_dense = ssmc.compile(definition, backend="reference").step(dense, **inputs)
    torch.testing.assert_close(y[[0, 2]], y_dense[[0, 2]], rtol=1e-5, atol=1e-5)
    assert (y[[1, 3]] == 0).all()
    torch.testing.assert_close(cache[[4, 0]], dense[[0, 2]], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache[[1, 2, 3, 5]], before[[1, 2, 3, 5]])


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_decode_writes_the_state_after_each_token_to_slots(backend):
    """Speculative decoding: k draft tokens in one call, the state after each one written to
    the slot state_out_indices[b, t] names (negative: not written); the source slot is only
    read, so every accepted prefix's state is there to continue from."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    definition, sizes, ranges = CASES["gla"]
    op = ssmc.compile(definition, backend=backend, lowering="scan")
    sizes = dict(sizes, b=2)
    k = 3
    inputs = _inputs(op.program, sizes, ranges, k, seed=8)
    h, n, p = (sizes[a] for a in "hnp")
    cache = torch.zeros(9, h, n, p)
    h0 = torch.randn(2, h, n, p, generator=torch.Generator().manual_seed(9))
    cache[[7, 2]] = h0
    src = torch.tensor([7, 2], dtype=torch.int32)
    dst = torch.tensor([[0, 1, -1], [3, 4, 5]])
    y = op.decode(cache, **inputs, state_batch_indices=src, state_out_indices=dst)

    ref = ssmc.compile(definition, backend="reference", lowering="scan")
    y_full = ref(**inputs, initial_state=h0)
    torch.testing.assert_close(y, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[[7, 2]], h0)        # sources untouched
    for j in range(k):
        prefix = {name: x.narrow(1, 0, j + 1) if x.dim() > 1 and name != "w" else x
                  for name, x in inputs.items()}
        _, h_j = ref(**prefix, initial_state=h0, return_final_state=True)
        for i in range(2):
            if dst[i, j] >= 0:
                torch.testing.assert_close(cache[dst[i, j]], h_j[i], rtol=1e-5, atol=1e-5)
    assert (cache[[6, 8]] == 0).all()


def test_step_writes_through_a_transposed_state():
    """The state in (b, h, p, n) memory (mamba_ssm's layout) seen as (b, h, n, p) by a
    transpose: updated in place through its strides."""
    definition, sizes, ranges = CASES["ssd"]
    op = ssmc.compile(definition, backend="triton")
    inputs = _inputs(op.program, sizes, ranges, 2, seed=10)
    b, h, n, p = (sizes[a] for a in "bhnp")
    h0 = torch.randn(b, h, n, p, generator=torch.Generator().manual_seed(11))
    mem = h0.transpose(2, 3).contiguous()          # (b, h, p, n)
    dense = h0.clone()
    y1 = _decode(op, inputs, mem.transpose(2, 3), 2)
    y2 = _decode(op, inputs, dense, 2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(mem.transpose(2, 3), dense, rtol=0, atol=0)


def test_step_repeated_call_skips_the_checks(monkeypatch):
    """After the first call of a signature, a step is the launch alone: no binding, planning
    or compiling; a call with other metadata is checked again."""
    op, inputs, state = _ssd_step_args()
    op.step(state, **inputs)
    step_module = importlib.import_module("ssmc.step")

    def boom(*a, **k):
        raise AssertionError("checked again")
    monkeypatch.setattr(step_module, "bind", boom)
    monkeypatch.setattr(step_module, "resolve_backend", boom)
    op.step(state, **inputs)
    with pytest.raises(AssertionError, match="checked again"):
        op.step(state, **dict(inputs, x=inputs["x"].clone().transpose(1, 2).contiguous()
                              .transpose(1, 2)))


@pytest.mark.parametrize("bad, error, pattern", [
    (dict(state_batch_indices=torch.tensor([0.0, 1.0])), ssmc.DTypeError,
     r"'state_batch_indices' has dtype torch.float32; expected int32 or int64"),
    (dict(state_batch_indices=torch.tensor([0, 1, 2])), ssmc.ShapeError,
     r"'state_batch_indices' has shape \(3,\); expected \(2,\)"),
    (dict(state_out_indices=torch.tensor([[0], [1]])), ssmc.ShapeError,
     r"'state_out_indices' has shape \(2, 1\); expected \(2,\)"),
    (dict(state_batch_indices=[0, 1]), ssmc.DTypeError,
     r"'state_batch_indices' must be a torch.Tensor"),
])
def test_step_index_errors(bad, error, pattern):
    op, inputs, state = _ssd_step_args()
    with pytest.raises(error, match=pattern):
        op.step(state, **inputs, **bad)


def test_decode_index_shape_is_per_token():
    op, inputs, state = _ssd_step_args()
    tokens = {k: (v.unsqueeze(1).expand(v.shape[0], 3, *v.shape[1:]) if v.dim() > 1 else v)
              for k, v in inputs.items()}
    with pytest.raises(ssmc.ShapeError, match=r"'state_out_indices' has shape \(2,\); "
                       r"expected \(2, 3\)"):
        op.decode(state, **tokens, state_out_indices=torch.tensor([0, 1]))


# ------------------------------------------------------------------ host cost of a repeated call

class RecordingKernel:
    """Stands for a generated step kernel: records each launch's positional arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(args)


def recording_step_kernel(monkeypatch) -> RecordingKernel:
    """Triton step launches built from now on record their arguments instead of running."""
    step_lowering = importlib.import_module("ssmc.backends.triton.lowerings.step")
    kernel = RecordingKernel()
    real = step_lowering.make_launch
    monkeypatch.setattr(step_lowering, "make_launch", lambda module, plan: real(
        types.SimpleNamespace(ssmc_step_fwd=kernel), plan))
    return kernel


ALLOCATION = {"aten.empty.memory_format", "aten.fill_.Scalar"}


@pytest.mark.parametrize("call", ["positional", "keywords", "decode-slots"])
def test_step_repeated_call_launches_on_the_callers_tensors(monkeypatch, call):
    """A decode loop's second call with tensors of the same metadata is the bound launch alone:
    the kernel gets the caller's tensors themselves (no views, copies or conversions; the
    state, here in mamba_ssm's (b, h, p, n) memory, is not rearranged) and no torch op runs
    but the output's allocation."""
    kernel = recording_step_kernel(monkeypatch)
    definition, sizes, ranges = CASES["ssd"]
    op = ssmc.compile(definition, backend="triton")
    names = op.program.input_names
    b, h, n, p = (sizes[a] for a in "bhnp")
    tokens = call == "decode-slots"
    state = torch.randn(5 if tokens else b, h, p, n).transpose(2, 3)
    extra = dict(state_batch_indices=torch.tensor([3, 0]),
                 state_out_indices=torch.tensor([[1, 4], [-1, 2]])) if tokens else {}
    step_module = importlib.import_module("ssmc.step")
    for seed in (0, 1):
        inputs = _inputs(op.program, sizes, ranges, 2, seed=seed)
        if not tokens:
            inputs = _at(op.program, inputs, 0)
        if seed:   # nothing is bound, planned or resolved again
            for name in ("bind", "resolve_backend", "_checked"):
                monkeypatch.setattr(step_module, name, None)
        with TorchOps() as mode:
            if call == "keywords":
                y = op.step(state, **inputs, **extra)
            elif tokens:
                y = op.decode(state, *(inputs[n] for n in names), **extra)
            else:
                y = op.step(state, *(inputs[n] for n in names))
    assert len(kernel.launches) == 2
    launched = kernel.launches[-1]
    k = len(names)
    assert all(a is inputs[n] for a, n in zip(launched, names))
    assert launched[k] is y and launched[k + 1] is state
    if tokens:
        assert launched[k + 2] is extra["state_batch_indices"]
        assert launched[k + 3] is extra["state_out_indices"]
    assert y.shape == ((b, 2, h, p) if tokens else (b, h, p))
    assert set(mode.ops) <= ALLOCATION and mode.ops.count("aten.empty.memory_format") == 1


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
def test_step_repeated_calls_are_bit_identical_to_checked_calls(state_dtype, keywords):
    """The bound launch of later calls gives the bits of a call checked in full (a new op per
    step), outputs and state."""
    definition, sizes, ranges = CASES["custom"]
    op = ssmc.compile(definition, backend="triton")
    inputs = _inputs(op.program, sizes, ranges, 3, seed=20)
    b, h, n, p = (sizes[a] for a in "bhnp")
    s1 = torch.randn(b, h, n, p, generator=torch.Generator().manual_seed(21)).to(state_dtype)
    s2 = s1.clone()
    y1 = _decode(op, inputs, s1, 3, keywords)
    ys = [ssmc.compile(definition, backend="triton").step(s2, **_at(op.program, inputs, i))
          for i in range(3)]
    assert torch.equal(y1, torch.stack(ys, 1))
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_step_strided_state_batch_indices(backend):
    """A state_batch_indices with a stride (every other entry of a larger index) names the
    same slots as its contiguous copy (the Triton kernel read it as contiguous once)."""
    _, inputs, _ = _ssd_step_args()
    op = ssmc.compile(mamba2, backend=backend)
    h, n, p = 2, 4, 3
    cache = torch.randn(5, h, n, p, generator=torch.Generator().manual_seed(22))
    c1, c2 = cache.clone(), cache.clone()
    index = torch.tensor([3, 9, 0, 9])[::2]
    for _ in range(2):   # the first call checked, the second the bound launch
        y1 = op.step(c1, **inputs, state_batch_indices=index)
        y2 = op.step(c2, **inputs, state_batch_indices=index.contiguous())
        assert torch.equal(y1, y2) and torch.equal(c1, c2)
    assert not torch.equal(c1[[0, 3]], cache[[0, 3]])


def test_step_bad_call_after_cached_calls_is_still_checked():
    """A call whose metadata differ from a cached call's is checked in full: the error names
    the argument, expected and actual, and nothing is launched."""
    op, inputs, state = _ssd_step_args()
    op.step(state, **inputs)
    op.step(state, **inputs)
    before = state.clone()
    with pytest.raises(ssmc.ShapeError, match=r"ssd\.step\(\): 'C' has n=5 but 'B' has n=4"):
        op.step(state, **dict(inputs, C=torch.randn(2, 1, 5)))
    with pytest.raises(ssmc.ConfigError, match="'state' requires grad"):
        op.step(state.clone().requires_grad_(), **inputs)
    with pytest.raises(ssmc.DTypeError, match="'state_batch_indices' must be a torch.Tensor"):
        op.step(state, **inputs, state_batch_indices=[0, 1])
    assert torch.equal(state, before)


# --------------------------------------------------------------------------- CUDA graphs (GPU)

#: tokens per case of the CUDA step tests
CUDA_STEPS = 5


def _cuda_step_case(b=4, slots=7, state_dtype=torch.float32):
    definition, sizes, ranges = CASES["ssd"]
    op = ssmc.compile(definition, backend="triton")
    sizes = dict(sizes, b=b)
    T = CUDA_STEPS
    inputs = {k: v.cuda() for k, v in _inputs(op.program, sizes, ranges, T, seed=12).items()}
    h, n, p = (sizes[a] for a in "hnp")
    cache = torch.randn(slots, h, n, p, device="cuda").to(state_dtype)
    index = torch.tensor([5, -1, 0, 3][:b], device="cuda", dtype=torch.int32)
    return op, inputs, cache, index, T


def _warm_up(fn):
    """Run fn on a side stream (kernels compiled, fast path cached) before a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_step_cuda_graph_replay_matches_eager(state_dtype):
    """op.step with cache slots and padding, captured once and replayed per token on new
    inputs copied into the captured buffers, equals eager steps bit for bit."""
    op, inputs, cache, index, T = _cuda_step_case(state_dtype=state_dtype)
    static = {k: v.clone() for k, v in _at(op.program, inputs, 0).items()}
    eager_cache = cache.clone()
    _warm_up(lambda: op.step(cache.clone(), **static, state_batch_indices=index))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = op.step(cache, **static, state_batch_indices=index)
    for t in range(T):
        for k, v in _at(op.program, inputs, t).items():
            static[k].copy_(v)
        graph.replay()
        y_eager = op.step(eager_cache, **{k: v.clone() for k, v in static.items()},
                          state_batch_indices=index)
        torch.testing.assert_close(y_static, y_eager, rtol=0, atol=0)
        torch.testing.assert_close(cache, eager_cache, rtol=0, atol=0)
    assert (y_static[1] == 0).all()


@pytest.mark.gpu
def test_decode_cuda_graph_replay_writes_per_token_slots():
    op, inputs, cache, index, T = _cuda_step_case(slots=8 + 4 * CUDA_STEPS)
    # slots apart from the sources (5, 0, 3) and from each other: no program reads a slot
    # another writes
    out_index = 8 + torch.arange(4 * T, device="cuda").view(4, T)
    out_index[1] = -1
    eager_cache = cache.clone()
    static = {k: v.clone() for k, v in inputs.items()}
    _warm_up(lambda: op.decode(cache.clone(), **static, state_batch_indices=index,
                               state_out_indices=out_index))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = op.decode(cache, **static, state_batch_indices=index,
                             state_out_indices=out_index)
    graph.replay()
    y_eager = op.decode(eager_cache, **inputs, state_batch_indices=index,
                        state_out_indices=out_index)
    torch.testing.assert_close(y_static, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(cache, eager_cache, rtol=0, atol=0)


@pytest.mark.gpu
def test_selective_state_update_cuda_graph_replay():
    """The mamba_ssm shim (Mamba-2's tied call, mamba_ssm's (b, h, p, n) state, slots with
    padding) captured and replayed equals eager calls."""
    from ssmc.compat.mamba_ssm import selective_state_update
    b, h, p, n, g = 4, 4, 8, 16, 2
    gen = torch.Generator().manual_seed(13)

    def r(*shape):
        return torch.randn(*shape, generator=gen).cuda()
    static = dict(x=r(b, h, p), dt=r(b, h)[..., None].expand(b, h, p),
                  A=(-torch.rand(h, generator=gen) - 0.5).cuda()[:, None, None].expand(h, p, n),
                  B=r(b, g, n), C=r(b, g, n), D=r(h)[:, None].expand(h, p), z=r(b, h, p),
                  dt_bias=r(h)[:, None].expand(h, p))
    cache = r(6, h, p, n)
    index = torch.tensor([2, -1, 5, 0], device="cuda")
    eager_cache = cache.clone()
    kw = dict(dt_softplus=True, state_batch_indices=index, backend="triton")
    _warm_up(lambda: selective_state_update(cache.clone(), **static, **kw))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = selective_state_update(cache, **static, **kw)
    for _ in range(3):
        static["x"].copy_(r(b, h, p))
        static["B"].copy_(r(b, g, n))
        graph.replay()
        y_eager = selective_state_update(eager_cache, **static, **kw)
        torch.testing.assert_close(y_static, y_eager, rtol=0, atol=0)
        torch.testing.assert_close(cache, eager_cache, rtol=0, atol=0)


@pytest.mark.gpu
def test_step_decode_loop_under_torch_compile_reduce_overhead():
    """A decode loop of op.step compiled with mode="reduce-overhead" equals the eager loop."""
    op, inputs, cache, index, T = _cuda_step_case()
    names = op.program.input_names

    def loop(state, *xs):
        ys = []
        for t in range(T):
            step_inputs = [x.select(op.program.input(nm).axes.index("t"), t)
                           if "t" in op.program.input(nm).axes else x
                           for nm, x in zip(names, xs)]
            ys.append(op.step(state, *step_inputs, state_batch_indices=index))
        return torch.stack(ys, 1)

    compiled = torch.compile(loop, mode="reduce-overhead")
    args = [inputs[nm] for nm in names]
    eager_cache = cache.clone()
    expected = loop(eager_cache, *args)
    for _ in range(3):    # warm-up, recording, replay
        state = cache.clone()
        got = compiled(state, *args)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state, eager_cache, rtol=1e-6, atol=1e-6)

