"""Differential fuzzing of the Triton backend (the grammar, decay values and calls are in
tests/fuzzing.py): every legal lowering the backend runs, against the float64 sequential
reference, on the GPU when there is one and under the interpreter otherwise.

`DEFAULT_EXAMPLES` in CI; `--fuzz-count N` runs N (thousands on a GPU: scripts/fuzz_campaign.sh).
"""
from __future__ import annotations

import pytest
import torch

from tests.fuzzing import FUZZ_TOL, SHARDS, call_inputs, fuzz
from tests.helpers import check_against_reference

#: examples in CI (about 2.6 s each under the interpreter, gradients and edge values included:
#: 40 took 104 s on two workers), split over SHARDS tests
DEFAULT_EXAMPLES = 160
#: Where the kernels run: the GPU when there is one, else the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shard", range(SHARDS))
def test_fuzz_triton_against_reference(pytestconfig, triton_check, shard):
    def check(defn, call, lowering):
        inputs, kwargs = call_inputs(defn, call, DEVICE)
        tol = FUZZ_TOL[call["dtype"]]
        if call["dtype"] == torch.float32 and call["grad"]:   # outputs and every gradient
            check_against_reference(defn, inputs, tol=tol, backend="triton", lowering=lowering,
                                    **kwargs)
        else:
            triton_check(defn, inputs, lowering=lowering, tol=tol, **kwargs)

    checked = fuzz(pytestconfig, shard, "triton", DEFAULT_EXAMPLES, check)
    assert checked["calls"] > 0 and "scan" in checked["lowerings"]
