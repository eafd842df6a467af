"""The user-facing API: `ssmc.ssm`, `ssmc.compile` and the ops they return."""
import pytest
import torch

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc.ops import mamba2
from tests.helpers import (check_against_reference, make_definition, random_inputs,
                           random_state, ssd_inputs)

TOL32 = 1e-5  # float32 op against the float64 reference


def mamba2_args(b=2, t=7, h=4, g=2, n=3, p=5, dtype=torch.float32, seed=0):
    x = ssd_inputs(b, t, h, g, n, p, dt_bias=False, dtype=dtype, seed=seed)
    return tuple(x[k] for k in ("x", "dt", "A", "B", "C", "D", "z"))


def test_compile_rejects_bad_backend_and_lowering():
    """ConfigError for an option's value, ArgumentError for a non-definition: SSMCErrors that
    are still the ValueError / TypeError they were reported as before."""
    with pytest.raises(ssmc.ConfigError, match=r"^backend='cuda' is not valid; valid values: "
                       r"auto, triton, tvm, reference$") as info:
        ssmc.compile(mamba2, backend="cuda")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ssmc.ConfigError, match=r"^lowering='fast' is not valid; valid values: "
                       r"auto, scan, chunked, quadratic$"):
        ssmc.compile(mamba2, lowering="fast")
    with pytest.raises(ssmc.ArgumentError, match=r"^ssmc.compile expects a function decorated "
                       r"with @ssmc.ssm, got function$") as info:
        ssmc.compile(lambda x: x)
    assert isinstance(info.value, TypeError)
    with pytest.raises(ssmc.ArgumentError, match=r"got function; pass its definition, "
                       r"gla\.definition$"):
        ssmc.compile(ssmc.ops.gla)


def test_attention_matrix_rejects_a_non_op():
    with pytest.raises(ssmc.ArgumentError, match=r"^attention_matrix expects an ssmc definition "
                       r"or compiled op, got function$") as info:
        ssmc.attention_matrix(lambda x: x, torch.zeros(1))
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("lowering", ["chunked", "quadratic"])
def test_compile_rejects_lowering_illegal_for_decay_kind(lowering):
    full = make_definition("full")  # the decay varies over p: scan only
    with pytest.raises(ssmc.UnsupportedError, match=rf"^full_forward: lowering='{lowering}' is "
                       r"not legal for decay kind 'full'; legal lowerings: scan$"):
        ssmc.compile(full, lowering=lowering)
    assert isinstance(ssmc.UnsupportedError(), NotImplementedError)
    assert ssmc.compile(full, lowering="scan").lowering == "scan"


@pytest.mark.parametrize("decay", ["none", "time_invariant", "scalar", "diagonal"])
def test_every_lowering_is_legal_without_a_p_axis(decay):
    for lowering in ("scan", "chunked", "quadratic"):
        assert ssmc.compile(make_definition(decay), lowering=lowering).lowering == lowering


def test_ssm_decorator_forms():
    @ssmc.ssm
    def la(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        """docstring kept"""
        return S.recurrence(key=k, value=v, query=q)

    @ssmc.ssm(name="renamed")
    def la2(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q)

    assert isinstance(la, ssmc.Definition) and la.__name__ == "la"
    assert la.__doc__ == "docstring kept" and la2.name == la2.program.name == "renamed"
    assert la.program.decay_kind.value == "none"


def test_definition_is_callable_and_matches_reference():
    """Calling a Definition runs its default compiled op (whatever backend serves the CPU)."""
    torch.manual_seed(0)
    a = mamba2_args(seed=1)
    y = mamba2(*a)
    assert y.shape == a[0].shape and y.dtype == torch.float32
    check_against_reference(mamba2, a, tol=TOL32, grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_reference_backend_returns_the_input_dtype(dtype):
    torch.manual_seed(0)
    op = ssmc.compile(mamba2, backend="reference")
    a = mamba2_args(dtype=dtype, seed=2)
    y, hT = op(*a, initial_state=random_state(2, 4, 3, 5, seed=3), return_final_state=True)
    assert y.dtype == dtype and y.shape == a[0].shape
    assert hT.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert hT.shape == (2, 4, 3, 5)
    tol = {torch.float32: TOL32, torch.float64: 1e-12}.get(dtype, 1e-2)
    check_against_reference(op, a, tol=tol, grad=False)


def test_reference_backend_mixed_dtypes_follow_x():
    op = ssmc.compile(mamba2, backend="reference")
    x, dt, A, B, C, D, z = mamba2_args(seed=4)
    y = op(x.bfloat16(), dt, A, B, C, D, z.bfloat16())
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("lowering", ["scan", "chunked", "quadratic"])
def test_reference_backend_every_lowering_agrees(lowering):
    torch.manual_seed(0)
    op = ssmc.compile(mamba2, backend="reference", lowering=lowering)
    a = mamba2_args(dtype=torch.float64, seed=5)
    check_against_reference(op, a, tol=1e-10, initial_state=random_state(
        2, 4, 3, 5, dtype=torch.float64, seed=6), return_final_state=True)
    assert op.last_plan.lowering == lowering


def test_autograd_through_reference_op_gradcheck():
    """Finite differences agree with autograd through a compiled op (reference backend)."""
    torch.manual_seed(0)
    d = make_definition("diagonal", "bidirectional", epilogue=True)
    op = ssmc.compile(d, backend="reference")
    x = random_inputs(d, dict(b=1, t=4, h=2, g=1, n=2, p=2), dtype=torch.float64, seed=7)
    names = list(x)
    h0 = random_state(1, 2, 2, 2, directions=2, dtype=torch.float64, seed=8)

    def f(*tensors):
        *inputs, state = tensors
        y, hT = op(**dict(zip(names, inputs)), initial_state=state, return_final_state=True)
        return y, hT

    leaves = tuple(t.clone().requires_grad_(True) for t in (*x.values(), h0))
    assert torch.autograd.gradcheck(f, leaves)


def test_autograd_through_default_op_on_cpu():
    """DESIGN.md: the compiled op works under autograd. On this machine (CPU), the default
    op's gradients w.r.t. every input and the initial state match the float64 reference's
    (with backend="auto", a forward backend without a backward of its own, such as TVM, takes
    its gradients from the next backend in the auto order that has one)."""
    torch.manual_seed(0)
    a = mamba2_args(seed=9)
    report = check_against_reference(mamba2, a, tol=TOL32, initial_state=random_state(
        2, 4, 3, 5, seed=10), return_final_state=True)
    assert {"grad x", "grad dt", "grad A", "grad B", "grad C", "grad D", "grad z",
            "grad initial_state"} <= {m.name for m in report}


def test_autograd_through_default_op_with_reference_backend_env(monkeypatch):
    """With SSMC_BACKEND=reference the default op is the differentiable reference."""
    torch.manual_seed(0)
    monkeypatch.setenv("SSMC_BACKEND", "reference")
    op = ssmc.compile(mamba2)
    assert op.backend_name == "reference"
    a = mamba2_args(seed=11)
    check_against_reference(op, a, tol=TOL32, initial_state=random_state(2, 4, 3, 5, seed=12),
                            return_final_state=True)


FINAL_STATE_CASES = [("triton", "chunked", "forward"), ("triton", "chunked", "bidirectional"),
                     ("triton", "scan", "reverse"), ("reference", "chunked", "forward"),
                     ("tvm", "chunked", "forward")]


@pytest.mark.parametrize("backend,lowering,direction", FINAL_STATE_CASES)
@pytest.mark.parametrize("t", [0, 150])
def test_final_state_is_the_ops_final_state(backend, lowering, direction, t):
    """`op.final_state` returns what `op(..., return_final_state=True)` does, forward and
    gradients (every input's and the initial state's), including an empty sequence."""
    definition = make_definition("scalar", direction)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    inputs = random_inputs(definition, dict(b=2, t=t, h=4, g=2, n=3, p=5), device=device,
                           seed=3)
    state = random_state(2, 4, 3, 5, directions=2 if direction == "bidirectional" else 1,
                         device=device, seed=4)
    leaves = [*inputs.values(), state]
    for x in leaves:
        x.requires_grad_(True)
    op = ssmc.compile(definition, backend=backend, lowering=lowering)
    alone = op.final_state(**inputs, initial_state=state)
    _, whole = op(**inputs, initial_state=state, return_final_state=True)
    torch.testing.assert_close(alone, whole, rtol=0, atol=0)
    cotangent = torch.randn_like(whole)
    expected = torch.autograd.grad((whole * cotangent).sum(), leaves, allow_unused=True)
    got = torch.autograd.grad((alone * cotangent).sum(), leaves, allow_unused=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_final_state_runs_no_output_pass(monkeypatch):
    """The Triton chunked lowering's final state alone is its state pass: the launch skips the
    output pass (the state a context-parallel shard hands on costs no output)."""
    from ssmc.backends.triton.lowerings import chunked_launch
    real, seen = chunked_launch.launch, []

    def spy(*args, output=True, **kwargs):
        seen.append(output)
        return real(*args, output=output, **kwargs)

    monkeypatch.setattr(chunked_launch, "launch", spy)
    definition = make_definition("scalar", "forward")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = random_inputs(definition, dict(b=1, t=70, h=2, g=1, n=3, p=4), device=device, seed=1)
    op = ssmc.compile(definition, backend="triton", lowering="chunked")
    final = op.final_state(**inputs)
    assert seen == [False]
    torch.testing.assert_close(final, op(**inputs, return_final_state=True)[1])
