"""Differential fuzzing of the TVM backend on LLVM (the grammar, decay values and calls are in
tests/fuzzing.py): every legal lowering the backend runs, outputs and (fp32) gradients against
the float64 sequential reference.

Fewer examples by default than the Triton fuzz test (each new definition builds its kernels
with LLVM, seconds apiece); `--fuzz-count N` runs N.
"""
from __future__ import annotations

import pytest
import torch

from tests.fuzzing import FUZZ_TOL, SHARDS, call_inputs, fuzz
from tests.helpers import check_against_reference

#: examples in CI, split over SHARDS tests
DEFAULT_EXAMPLES = 40


@pytest.mark.parametrize("shard", range(SHARDS))
def test_fuzz_tvm_against_reference(pytestconfig, shard):
    def check(defn, call, lowering):
        inputs, kwargs = call_inputs(defn, call, "cpu")
        check_against_reference(defn, inputs, tol=FUZZ_TOL[call["dtype"]], backend="tvm",
                                lowering=lowering,
                                grad=call["dtype"] == torch.float32 and call["grad"], **kwargs)

    checked = fuzz(pytestconfig, shard, "tvm", DEFAULT_EXAMPLES, check)
    assert checked["calls"] > 0 and "scan" in checked["lowerings"]
