"""`CompiledOp.step`: a decode loop reproduces the full-sequence forward, and bad input is
reported before anything runs (ssmc/step.py)."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.ops.ssd import mamba2

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
    T = 64
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


