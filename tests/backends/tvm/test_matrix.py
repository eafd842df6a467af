"""The TVM backend's hidden attention matrix (lowerings/matrix.py, LLVM) against the float64
reference: it is what `ssmc.attention_matrix` runs on the CPU, so tests/test_attention_matrix.py
covers every decay structure, sign, direction, `reduce=` and `window=` through it; here, that
it is the kernel serving, its dtypes, groups, bf16 inputs, empty sizes and the refusals."""
import pytest
import torch

import ssmc
from ssmc import reference
from ssmc.backends import get_backend
from ssmc.backends import tvm as tvm_backend
from ssmc.plan import Plan
from ssmc.validate import bind
from tests.helpers import compare, make_definition, random_inputs

SIZES = dict(b=2, t=11, h=4, g=2, n=3, p=2)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    matrix = tvm_backend.TVMKernel.matrix

    def spy(self, tensors, sizes):
        calls.append(self.plan.dtype)
        return matrix(self, tensors, sizes)

    monkeypatch.setattr(tvm_backend.TVMKernel, "matrix", spy)
    return calls


def reference_matrix(defn, x):
    b = bind(defn.program, (), {k: v.double() for k, v in x.items()})
    return reference.attention_matrix(defn.program, b.tensors, b.sizes)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10),
                                        (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("decay, direction", [("diagonal", "bidirectional"),
                                              ("scalar", "reverse"), ("none", "forward")])
def test_the_cpu_matrix_is_the_tvm_kernel(kernel_calls, decay, direction, dtype, tol):
    """`auto` on the CPU runs the kernel, in fp32 (fp64 for fp64 inputs) from the inputs as
    given (bf16 ones too: the reference sees the same rounded values), groups g < h."""
    f = make_definition(decay, direction)
    x = random_inputs(f, SIZES, dtype=dtype, seed=1)
    M = ssmc.attention_matrix(f, **x)
    assert kernel_calls and M.dtype == (torch.float64 if dtype == torch.float64 else
                                        torch.float32)
    r = compare("M", M, reference_matrix(f, x), tol)
    assert r.ok, str(r)


def test_zero_negative_and_underflowing_decays_are_exact_products(kernel_calls):
    """The walk multiplies decays (no logs): a zero is an exact reset, a negative decay flips
    the sign, exp(-1e4) and exp(-inf) are zeros, with no NaN."""
    f = make_definition("diagonal", "forward")
    x = random_inputs(f, SIZES, seed=2)
    a = x["a"]
    a.view(-1)[::4] = 0.0
    a.view(-1)[1::4] = -0.9
    a.view(-1)[2::7] = float(torch.exp(torch.tensor(-1e4)))
    M = ssmc.attention_matrix(f, **x)
    assert kernel_calls and torch.isfinite(M).all()
    r = compare("M", M, reference_matrix(f, x), 2e-5)
    assert r.ok, str(r)


def test_empty_batch_and_sequence(kernel_calls):
    f = make_definition("scalar", "forward")
    for sizes in (dict(SIZES, b=0), dict(SIZES, t=0)):
        x = random_inputs(f, sizes, seed=3)
        M = ssmc.attention_matrix(ssmc.compile(f, backend="tvm"), **x)
        assert M.shape == (sizes["b"], sizes["h"], sizes["t"], sizes["t"])


def test_refuses_plans_it_does_not_build():
    """A chunked plan, and a decay over p (no quadratic lowering): an UnsupportedError, which
    the matrix op's routing takes as "ask the next backend"."""
    backend = get_backend("tvm")
    f = make_definition("scalar", "forward")
    x = random_inputs(f, SIZES, seed=4)
    b = bind(f.program, (), x)
    with pytest.raises(ssmc.UnsupportedError, match="quadratic"):
        backend.attention_matrix(Plan(program=f.program, lowering="chunked", dtype="float32"),
                                 b.tensors, b.sizes)
    full = make_definition("full", "forward")
    assert backend.supports(Plan(program=full.program, lowering="quadratic",
                                 dtype="float32")) is not None
