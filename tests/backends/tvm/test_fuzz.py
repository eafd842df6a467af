"""Differential fuzzing of the TVM backend on LLVM (the grammar, setups and cases are in
tests/fuzzing.py): every legal lowering the backend runs, outputs and (fp32) gradients against
the float64 sequential reference.

Each drawn definition builds its kernels with LLVM (seconds apiece) and then checks
`CASES_PER_DEFINITION` cases with them (milliseconds each); `--fuzz-count N` runs N cases.
"""
from __future__ import annotations

from tests.fuzzing import FUZZ_TOL, case_inputs, compares_gradients, fuzz, parametrize_shards
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
                                lowering=lowering,
                                grad=compares_gradients(setup, case, "tvm", lowering), **kwargs)

    ran = fuzz(pytestconfig, shard, "tvm", check, default_cases=DEFAULT_CASES,
               per_definition=CASES_PER_DEFINITION)
    assert ran["cases"] > 0 and "scan" in ran["lowerings"]
