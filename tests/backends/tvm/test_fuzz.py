"""Differential fuzzing of the TVM backend on LLVM (the grammar, setups and cases are in
tests/fuzzing.py): every legal lowering the backend runs, outputs and (fp32) gradients against
the float64 sequential reference.

Each drawn definition builds its kernels with LLVM (seconds apiece) and then checks
`CASES_PER_DEFINITION` cases with them (milliseconds each); `--fuzz-count N` runs N cases.
"""
from __future__ import annotations

import pytest
import torch

import ssmc
from ssmc import dsl as S
from tests.fuzzing import (EPILOGUE_EPS, FUZZ_TOL, LOWERINGS, case_inputs,
                           compares_gradients, fuzz, output_scale, parametrize_shards)
from tests.helpers import check_against_reference

#: cases in CI, split over the shards
DEFAULT_CASES = 80
CASES_PER_DEFINITION = 10


def pytest_generate_tests(metafunc):
    parametrize_shards(metafunc)


def test_fuzz_tvm_against_reference(pytestconfig, shard):
    def check(defn, setup, case, lowering):
        inputs, kwargs = case_inputs(defn, setup, case, "cpu")
        check_against_reference(defn, inputs, tol=FUZZ_TOL[setup.dtype], backend="tvm",
                                lowering=lowering, output_scale=output_scale(defn, inputs, kwargs),
                                epilogue_eps=EPILOGUE_EPS,
                                grad=compares_gradients(setup, case, "tvm", lowering), **kwargs)

    ran = fuzz(pytestconfig, shard, "tvm", check, default_cases=DEFAULT_CASES,
               per_definition=CASES_PER_DEFINITION)
    assert ran["stopped"] or (ran["cases"] > 0 and "scan" in ran["lowerings"])


@ssmc.ssm
def head_gate(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], a: S.In["h"]):
    return S.recurrence(decay=S.sigmoid(a), key=k, value=v, query=q)


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("edge", [float("-inf"), -1e4, -200.0, -88.5])
def test_zero_decay_gradient(lowering, edge):
    """sigmoid(-inf) is an exact reset with derivative 0 (and sigmoid(-88.5) one below fp32's
    normal range, which kernels take as exactly 0), so the gradient of its head is 0 (the other
    head, all but open, has a small one, which sets the scale). The fuzz test found about 4e-7
    there: the chunk identity's d log_decay (q dq - k dk) left the other steps' rounding; the
    chain rule now zeroes d log_decay at resets."""
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(1, 5, 2, 2, generator=gen) for name in "qkv"}
    inputs["a"] = torch.tensor([19.5, edge])
    check_against_reference(head_gate, inputs, tol=2e-5, backend="tvm", lowering=lowering)


@ssmc.ssm
def channel_gate(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                 a: S.In["b t h p n"]):
    return S.recurrence(decay=S.sigmoid(a), key=k, value=v, query=q)


def test_saturated_decay_gradient():
    """sigmoid(19.5) is 1.0 in fp32, but its derivative 3.4e-9 is not 0: the gradient of a
    gate that is all but open, times the initial state, is small, not missing (the derivative
    was sigmoid (1 - sigmoid), 0 in fp32 there; it is sigmoid(a) sigmoid(-a) now)."""
    lowering = "scan"   # the only lowering of a decay over p
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(1, 1, 1, 2, generator=gen) for name in "qkv"}
    inputs["a"] = torch.full((1, 1, 1, 2, 2), 19.5)
    check_against_reference(channel_gate, inputs, tol=2e-5, backend="tvm", lowering=lowering,
                            initial_state=torch.randn(1, 1, 2, 2, generator=gen))


@pytest.mark.parametrize("direction, p, case", [
    ("cross2d", 1, dict(b=2, t=2, lengths=None, edges=0.0, seed=910931048343655641,
                        grid=(1, 2))),
    ("forward", 2, dict(b=2, t=17, lengths=None, edges=0.0, seed=2014778559842358803,
                        grid=None))])
def test_time_invariant_decay_gradient_without_cancellation(direction, p, case):
    """Found by the campaign at seed 20261209: a per-head decay sigmoid(a + 1.5), fp32, with the
    final state returned. The chunked backward formed d log-decay as the suffix sum of
    q dq - k dk, whose pairs after each step cancel; grad a (their sum over every step) was
    3.8e-5 and 4.1e-5 off. The pairs each decay sits between are summed directly now."""
    from tests.fuzzing import Case, Setup, Spec, build_definition
    spec = Spec(decay="h", squash="sigmoid", direction=direction, kq="g", extras=(),
                decay_mod=None, key_mod=None, value_mod=None, query_mod=None, epilogue=None)
    setup = Setup(h=1, g=1, n=1, p=p, dtype=torch.float32, h0=False, final=False,
                  varlen=False, grad=True)
    defn = build_definition(spec)
    inputs, kwargs = case_inputs(defn, setup, Case(**case), "cpu")
    for lowering in ("scan", "chunked"):
        check_against_reference(defn, inputs, tol=FUZZ_TOL[torch.float32], backend="tvm",
                                lowering=lowering, **kwargs)


@ssmc.ssm
def log_key(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], e0: S.In["b t h"],
            a: S.In["h"]):
    return S.recurrence(decay=S.sigmoid(a), key=k * S.log(S.softplus(e0) + 0.1), value=v,
                        query=q)


def test_ill_conditioned_key_is_judged_by_its_fp32_evaluation():
    """A key k log(softplus(e0) + 0.1) with softplus(e0) + 0.1 = 1.00025 (campaign seed
    20261212): the log of a number 2.5e-4 above 1 is ~3e-5 relative off in any fp32
    evaluation, so the kernel's key, final state and gradients are too, however exact its
    recurrence. The judge allows what evaluating the operands in fp32 moves the float64
    reference (`tests.helpers.check_against_reference`, `prologue_rounding`)."""
    gen = torch.Generator().manual_seed(5)
    inputs = {name: torch.randn(1, 16, 2, 4, generator=gen) for name in "qk"}
    inputs["v"] = torch.randn(1, 16, 2, 3, generator=gen)
    inputs["e0"] = torch.full((1, 16, 2), 0.37859) + 1e-5 * torch.randn(1, 16, 2, generator=gen)
    inputs["a"] = torch.tensor([-0.16, 0.3])
    check_against_reference(log_key, inputs, tol=2e-5, backend="tvm", lowering="scan",
                            initial_state=torch.randn(1, 2, 4, 3, generator=gen),
                            return_final_state=True)
