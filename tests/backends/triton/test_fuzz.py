"""Differential fuzzing of the Triton backend (the grammar, setups and cases are in
tests/fuzzing.py): every legal lowering the backend runs, against the float64 sequential
reference, on the GPU when there is one and under the interpreter otherwise.

`DEFAULT_CASES` in CI; `--fuzz-count N` runs N (tens of thousands on a GPU:
scripts/fuzz_campaign.sh).
"""
from __future__ import annotations

import pytest
import torch

import ssmc
from ssmc import dsl as S
from tests.fuzzing import (EDGE_DECAY_GRADIENT_BUGS, EMPTY_BATCH_BACKWARD_BUGS, FUZZ_TOL,
                           case_inputs, compares_gradients, fuzz, parametrize_shards)
from tests.helpers import check_against_reference, make_definition, random_inputs

#: cases in CI, split over the shards. Under the interpreter a case costs its kernels' runs
#: (builds are free): about one of the one to three calls each example of the former
#: one-definition-per-case fuzzer made
DEFAULT_CASES = 160
#: Where the kernels run: the GPU when there is one, else the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: cases per definition: on a GPU each definition's kernels take seconds to build and a case
#: milliseconds to run; under the interpreter building is free and a new definition costs its
#: analysis (sympy) only
CASES_PER_DEFINITION = 50 if DEVICE == "cuda" else 10


def pytest_generate_tests(metafunc):
    parametrize_shards(metafunc)


def test_fuzz_triton_against_reference(pytestconfig, triton_check, shard):
    def check(defn, setup, case, lowering):
        inputs, kwargs = case_inputs(defn, setup, case, DEVICE)
        tol = FUZZ_TOL[setup.dtype]
        if compares_gradients(setup, case, "triton", lowering):   # and every gradient
            check_against_reference(defn, inputs, tol=tol, backend="triton", lowering=lowering,
                                    **kwargs)
        else:
            triton_check(defn, inputs, lowering=lowering, tol=tol, **kwargs)

    ran = fuzz(pytestconfig, shard, "triton", check, default_cases=DEFAULT_CASES,
               per_definition=CASES_PER_DEFINITION, long=DEVICE == "cuda")
    assert ran["stopped"] or (ran["cases"] > 0 and "scan" in ran["lowerings"])


@pytest.mark.parametrize("lowering", sorted(lw for be, lw in EMPTY_BATCH_BACKWARD_BUGS
                                            if be == "triton"))
@pytest.mark.parametrize("b, t", [(0, 3), (2, 0)])
@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="the backward reshapes a zero-size tensor with -1 (a known bug, "
                          "skipped by the fuzz test: EMPTY_BATCH_BACKWARD_BUGS)")
def test_empty_batch_backward(lowering, b, t):
    """An empty batch (no sequences, or no steps with the initial state returned) has gradients
    (zeros, or the final state's cotangent for the initial state) on every lowering."""
    defn = make_definition("scalar", "forward")
    inputs = random_inputs(defn, dict(b=b, t=t, h=2, g=1, n=3, p=4), device=DEVICE, seed=0)
    state = torch.randn(b, 2, 3, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    check_against_reference(defn, inputs, tol=2e-5, backend="triton", lowering=lowering,
                            initial_state=state, return_final_state=True)


@ssmc.ssm
def saturated_gate(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                   a: S.In["b t h"]):
    return S.recurrence(decay=S.sigmoid(a), key=k, value=v, query=q)


@pytest.mark.parametrize("lowering", sorted(lw for be, lw in EDGE_DECAY_GRADIENT_BUGS
                                            if be == "triton"))
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="grad a is 0 where the decay rounds to 1 in fp32 (a known bug, "
                          "skipped by the fuzz test: EDGE_DECAY_GRADIENT_BUGS)")
def test_saturated_decay_gradient(lowering):
    """sigmoid(19.5) is 1.0 in fp32, but its derivative 3.4e-9 is not 0: the gradient of a
    gate that is all but open is small, not missing (the fuzz test found it with every decay
    value at the +18 edge)."""
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(1, 2, 1, 2, generator=gen).to(DEVICE) for name in "qkv"}
    inputs["a"] = torch.full((1, 2, 1), 19.5, device=DEVICE)
    check_against_reference(saturated_gate, inputs, tol=2e-5, backend="triton",
                            lowering=lowering)
