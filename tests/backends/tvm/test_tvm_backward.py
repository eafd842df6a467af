"""`kernel.backward` of the TVM backend (TIR compiled for the LLVM target) against the reference
backend's backward (autograd through the float64 sequential scan), and
`torch.autograd.gradcheck` in float64 through `ssmc.compile(defn, backend="tvm")`.

Covered: every built-in (ssd with D, z, dt_bias, softplus, a clamp and groups g < h;
selective_scan; retention; gla; linear_attention) in every direction (the built-ins' look-alikes
for reverse and bidirectional), with initial states and grad_final, without them, packed
sequences (empty ones inside and at the end, one longer than a 16-step checkpoint segment),
t = 20 and 40 (several segments, the last partial), bf16 inputs; the custom definitions of
test_tvm_forward.py (every decay kind in reverse and bidirectional form, `gated_tanh`,
`clamped_per_key`); and that the three forward lowerings share one backward (the same function
has the same gradient).

Tolerances, relative L2 error of every gradient against the float64 reference on the same
rounded inputs: fp32 1e-5, fp64 1e-10, bf16 inputs 3e-2 (gradients are rounded to bf16).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import ssmc
from ssmc.backends import get_backend
from ssmc.lowerings import legal_lowerings
from ssmc.plan import Plan
from tests.backends.triton.conftest import gradient_problems, rel_l2
from tests.backends.triton.test_scan import (
    BUILTINS,
    builtin,
    cu_seqlens,
    inputs_for,
    state_for,
)
from tests.backends.tvm.test_tvm_forward import (
    DECAY_AXES,
    clamped_per_key,
    gated_tanh,
    make_definition,
)

DIRECTIONS = ("forward", "reverse", "bidirectional")
#: packed sequence lengths: empty ones inside and at the end, one longer than a segment (16)
LENGTHS = (3, 0, 20, 1, 0)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")


_CUSTOM: dict = {}


def custom(decay: str, direction: str):
    """The forward tests' custom definition (q, k, v, z, D, a decay of the given kind)."""
    key = (decay, direction)
    if key not in _CUSTOM:
        _CUSTOM[key] = make_definition(decay, direction)
    return _CUSTOM[key]


def _plan(defn, lowering, dtype, h0, gF, varlen):
    return Plan(program=defn.program, lowering=lowering, dtype=str(dtype).split(".")[1],
                has_initial_state=h0, return_final_state=gF, varlen=varlen)


def check_backward(defn, sizes: dict, *, lowering="scan", dtype=torch.float32, h0=True,
                   grad_final=True, lengths=None, seed=0, tol=None):
    """Compare the TVM kernel's backward with the reference backend's (float64, same rounded
    inputs); returns the TVM gradients."""
    if lowering not in legal_lowerings(defn.program):
        pytest.skip(f"{lowering} is not legal for {defn.program.decay_kind.value}")
    program = defn.program
    inputs = inputs_for(defn, sizes, dtype=dtype, seed=seed)
    S = sizes["b"] if lengths is None else len(lengths)
    state = state_for(defn, sizes, num_states=S, seed=seed + 1) if h0 else None
    if state is not None and dtype == torch.float64:
        state = state.double()
    cu = None if lengths is None else cu_seqlens(lengths)
    kernel = get_backend("tvm").compile(_plan(defn, lowering, dtype, h0, grad_final,
                                              cu is not None))
    ref = get_backend("reference").compile(_plan(defn, "scan", torch.float64, h0, grad_final,
                                                 cu is not None))
    gen = torch.Generator().manual_seed(seed + 2)
    B, T, H, N, P = (sizes[a] for a in "bthnp")
    grad_out = torch.randn(B, T, H, P, generator=gen).to(dtype)
    gF = None
    if grad_final:
        ndir = len(program.recurrence.directions)
        gF = torch.randn(((ndir,) if ndir > 1 else ()) + (S, H, N, P), generator=gen)
        if dtype == torch.float64:
            gF = gF.double()
    grads, g_h0 = kernel.backward(inputs, sizes, state, cu, grad_out, gF)
    r_grads, r_h0 = ref.backward({k: v.double() for k, v in inputs.items()}, sizes,
                                 None if state is None else state.double(), cu,
                                 grad_out.double(), None if gF is None else gF.double())
    tol = TOL[dtype] if tol is None else tol
    problems, _ = gradient_problems(grads, g_h0, r_grads, r_h0, inputs,
                                    state if h0 else None, tol)
    if problems:
        raise AssertionError(
            f"tvm-{lowering} backward of {program.name} ({dtype}, {sizes}, h0={h0}, "
            f"grad_final={grad_final}, lengths={lengths}) disagrees with the reference:\n  "
            + "\n  ".join(problems))
    return grads, g_h0


# --------------------------------------------------------------- kernel.backward vs reference

T20 = dict(b=2, t=20, h=4, g=2, n=4, p=5)


def _sizes(name, **over):
    sizes = dict(T20, **over)
    if name == "selective_scan":
        sizes["p"] = 1
    return sizes


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(BUILTINS))
def test_backward_builtin(name, direction):
    check_backward(builtin(name, direction), _sizes(name))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(BUILTINS))
def test_backward_builtin_varlen(name, direction):
    sizes = _sizes(name, b=1, t=sum(LENGTHS))
    check_backward(builtin(name, direction), sizes, lengths=LENGTHS, seed=6)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_backward_builtin_without_states(name):
    check_backward(builtin(name), _sizes(name, t=40), h0=False, grad_final=False, seed=3)


def test_backward_initial_state_without_grad_final():
    check_backward(builtin("gla", "bidirectional"), _sizes("gla"), grad_final=False, seed=4)


@pytest.mark.parametrize("name", ["ssd", "gla", "selective_scan"])
def test_backward_bf16(name):
    check_backward(builtin(name), _sizes(name, t=33), dtype=torch.bfloat16, seed=8)


@pytest.mark.parametrize("decay", list(DECAY_AXES))
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_backward_custom_directions(direction, decay):
    check_backward(custom(decay, direction), dict(b=2, t=19, h=4, g=2, n=3, p=4), seed=9)


@pytest.mark.parametrize("defn", [gated_tanh, clamped_per_key], ids=lambda d: d.name)
def test_backward_user_definitions(defn):
    check_backward(defn, dict(b=2, t=18, h=4, g=2, n=3, p=4), seed=10)


def test_lowerings_share_one_backward():
    """scan, chunked and quadratic compute the same function: one backward, same gradients."""
    defn = builtin("ssd", "bidirectional")
    sizes = _sizes("ssd")
    base = check_backward(defn, sizes, lowering="scan", seed=11)
    for lowering in ("chunked", "quadratic"):
        other = check_backward(defn, sizes, lowering=lowering, seed=11)
        for k, v in base[0].items():
            assert torch.equal(v, other[0][k]), (lowering, k)
        assert torch.equal(base[1], other[1])


def test_backward_float64_matches_reference():
    check_backward(builtin("ssd", "reverse"), _sizes("ssd"), dtype=torch.float64, seed=12)


def test_backward_empty_input():
    """t = 0: no gradient flows into the inputs; the state's gradient is grad_final."""
    defn = builtin("gla")
    sizes = _sizes("gla", t=0)
    kernel = get_backend("tvm").compile(_plan(defn, "scan", torch.float32, True, True, False))
    inputs = inputs_for(defn, sizes)
    state = state_for(defn, sizes)
    gF = torch.randn_like(state)
    grads, g_h0 = kernel.backward(inputs, sizes, state, None, torch.zeros(2, 0, 4, 5), gF)
    assert all(g.shape == inputs[k].shape and not g.any() for k, g in grads.items())
    assert torch.equal(g_h0, gF)


def test_backward_checker_detects_a_mismatch():
    with pytest.raises(AssertionError, match="relative L2 error"):
        check_backward(builtin("gla"), _sizes("gla"), tol=1e-14)


# -------------------------------------------------- gradcheck through ssmc.compile(backend="tvm")

def _gradcheck(defn, sizes, *, lengths=None, lowering="auto", seed=20):
    op = ssmc.compile(defn, backend="tvm", lowering=lowering)
    names = list(defn.program.input_names)
    inputs = inputs_for(defn, sizes, dtype=torch.float64, seed=seed)
    S = sizes["b"] if lengths is None else len(lengths)
    h0 = state_for(defn, sizes, num_states=S, seed=seed + 1).double() * 0.5
    kw = dict(return_final_state=True)
    if lengths is not None:
        kw["cu_seqlens"] = cu_seqlens(lengths)
    leaves = [inputs[n].clone().requires_grad_(True) for n in names]
    h0 = h0.requires_grad_(True)

    def fn(h0, *tensors):
        return op(*tensors, initial_state=h0, **kw)

    assert torch.autograd.gradcheck(fn, (h0, *leaves), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)
    # the gradients really came from the TVM kernel's backward
    kernels = list(op._kernels.values())
    assert kernels and all(type(k).__name__ == "TVMKernel" for k in kernels)
    assert any(k._bwd_functions for k in kernels)


TINY = dict(b=2, t=5, h=2, g=1, n=2, p=2)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_gradcheck_builtin(name):
    sizes = dict(TINY, p=1) if name == "selective_scan" else dict(TINY)
    if name == "ssd":
        sizes.update(h=4, g=2)   # groups of heads
    _gradcheck(builtin(name), sizes)


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
@pytest.mark.parametrize("name", ["ssd", "selective_scan", "gla"])
def test_gradcheck_builtin_directions(name, direction):
    sizes = dict(TINY, p=1) if name == "selective_scan" else dict(TINY)
    _gradcheck(builtin(name, direction), sizes, seed=21)


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
@pytest.mark.parametrize("decay", ["scalar", "full"])
def test_gradcheck_custom_directions(decay, direction):
    _gradcheck(custom(decay, direction), dict(TINY, g=2, h=2), seed=22)


@pytest.mark.parametrize("lowering", ["scan", "chunked", "quadratic"])
@pytest.mark.parametrize("defn", [gated_tanh, clamped_per_key], ids=lambda d: d.name)
def test_gradcheck_user_definitions(defn, lowering):
    _gradcheck(defn, dict(TINY, h=2, g=2), lowering=lowering, seed=23)


@pytest.mark.parametrize("name,direction", [("ssd", "bidirectional"), ("retention", "forward"),
                                            ("linear_attention", "reverse")])
def test_gradcheck_varlen(name, direction):
    lengths = (2, 0, 3, 1)
    sizes = dict(TINY, b=1, t=sum(lengths))
    _gradcheck(builtin(name, direction), sizes, lengths=lengths, seed=24)


def test_auto_backend_on_cpu_differentiates_with_tvm(monkeypatch):
    """backend="auto" on the CPU runs TVM; its own backward now serves autograd (no fallback)."""
    monkeypatch.delenv("SSMC_BACKEND", raising=False)
    defn = builtin("gla", "bidirectional")
    op = ssmc.compile(defn)
    sizes = dict(TINY, t=7)
    inputs = inputs_for(defn, sizes, dtype=torch.float64, seed=25)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    op(**leaves).square().sum().backward()
    ref = ssmc.compile(defn, backend="reference", lowering="scan")
    r_leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    ref(**r_leaves).square().sum().backward()
    kernels = list(op._kernels.values())
    assert [type(k).__name__ for k in kernels] == ["TVMKernel"] and kernels[0]._bwd_functions
    for k in inputs:
        assert rel_l2(leaves[k].grad, r_leaves[k].grad)[0] <= 1e-10, k
