"""`ssmc.ops.retention` (RetNet) against the recurrent form written here as a float64 loop."""
import pytest
import torch

import ssmc
from ssmc.ops import retention
from ssmc.ops.retention import default_gamma
from tests.helpers import (SHAPES, check_against_reference, cu_seqlens, random_state,
                           retention_inputs)
from tests.ops.naive import REF, check_matches_naive, check_varlen_per_sequence, close, naive_loop

TOL32 = 1e-5   # float32 op against the float64 reference (outputs and gradients)


def naive_retention(q, k, v, gamma, scale=None, initial_state=None):
    """S_t = gamma S_{t-1} + k_t^T v_t (per head);  o_t = (scale q_t) S_t; scale = n^-0.5."""
    gamma = gamma.double()
    return naive_loop(q, k, v, lambda S, i: gamma[None, :, None, None] * S, scale, initial_state)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("scale", [None, 0.7])
def test_retention_matches_naive(shape, scale):
    check_matches_naive(retention, retention_inputs, naive_retention, shape, scale)


def test_retention_parallel_form():
    """RetNet's parallel form: o = (scale q k^T * D) v with D[t, s] = gamma^(t - s), s <= t."""
    torch.manual_seed(0)
    x = retention_inputs(2, 9, 3, 4, 5, dtype=torch.float64, seed=3)
    y = retention(**x, **REF)
    ts = torch.arange(9, dtype=torch.float64)
    diff = ts[:, None] - ts[None, :]
    D = torch.where(diff >= 0, x["gamma"][:, None, None] ** diff.clamp(min=0), 0.0)
    scores = torch.einsum("bthn,bshn->bhts", x["q"] * 4 ** -0.5, x["k"]) * D
    close("y", y, torch.einsum("bhts,bshp->bthp", scores, x["v"]))


def test_retention_default_gamma_is_retnets():
    """gamma_h = 1 - 2^(-5 - h) (RetNet), kept in at least float32."""
    torch.manual_seed(0)
    x = retention_inputs(1, 8, 6, 4, 3, gamma=False, dtype=torch.float64, seed=4)
    want = 1 - 2.0 ** (-5 - torch.arange(6, dtype=torch.float64))
    close("default_gamma", default_gamma(6, dtype=torch.float64), want, 0.0)
    close("y", retention(**x, **REF), naive_retention(**x, gamma=want)[0])


def test_retention_default_gamma_survives_bfloat16():
    """With bf16 q, k, v the default decays are not rounded to bf16 (where 1 - 2^-9 and
    closer become exactly 1): the result follows the exact gammas to bf16 accuracy."""
    torch.manual_seed(0)
    x = retention_inputs(1, 100, 8, 4, 3, gamma=False, dtype=torch.bfloat16, seed=10)
    y = retention(**x, **REF)
    assert y.dtype == torch.bfloat16
    exact = 1 - 2.0 ** (-5 - torch.arange(8, dtype=torch.float64))
    close("y", y, naive_retention(**x, gamma=exact)[0], 1e-2)  # bf16 rounding of y: ~2e-3


def test_retention_varlen_matches_naive_per_sequence():
    torch.manual_seed(0)
    lengths = [0, 7, 1, 6]
    x = retention_inputs(1, sum(lengths), 3, 4, 2, dtype=torch.float64, seed=5)
    h0 = random_state(4, 3, 4, 2, dtype=torch.float64, seed=6)
    cu = cu_seqlens(lengths, dtype=torch.int64)
    check_varlen_per_sequence(retention, naive_retention, x, h0, cu)


def test_retention_float32_against_reference_with_grads():
    torch.manual_seed(0)
    x = retention_inputs(2, 7, 3, 4, 5, seed=7)
    check_against_reference(retention, x, tol=TOL32, initial_state=random_state(2, 3, 4, 5,
                            seed=8), return_final_state=True, **REF)


def test_retention_rejects_non_finite_scale():
    x = retention_inputs(1, 2, 1, 2, 2, seed=9)
    with pytest.raises(ssmc.ConfigError, match="scale must be finite") as info:
        retention(**x, scale=float("inf"), **REF)
    assert isinstance(info.value, ValueError)
