"""`ssmc.ops.gla` (gated linear attention, per-key log gates) against a float64 loop."""
import pytest
import torch

from ssmc.ops import gla
from tests.helpers import (SHAPES, check_against_reference, compare, cu_seqlens, gla_inputs,
                           random_state)
from tests.ops.naive import REF, check_matches_naive, check_varlen_per_sequence, close, naive_loop

TOL32 = 1e-5   # float32 op against the float64 reference (outputs and gradients)


def naive_gla(q, k, v, g, scale=None, initial_state=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t;  o_t = (scale q_t) S_t; scale = n^-0.5."""
    g = g.double()
    return naive_loop(q, k, v, lambda S, i: g[:, i, :, :, None].exp() * S, scale, initial_state)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("scale", [None, 0.3])
def test_gla_matches_naive(shape, scale):
    check_matches_naive(gla, gla_inputs, naive_gla, shape, scale)


def test_gla_default_scale_is_inverse_sqrt_n():
    torch.manual_seed(0)
    x = gla_inputs(1, 6, 2, 9, 3, dtype=torch.float64, seed=3)
    close("y", gla(**x, **REF), gla(**x, scale=1 / 3, **REF), 1e-14)
    assert not compare("y", gla(**x, **REF), gla(**x, scale=1.0, **REF), 1e-3).ok


def test_gla_varlen_matches_naive_per_sequence():
    torch.manual_seed(0)
    lengths = [8, 0, 3]
    x = gla_inputs(1, sum(lengths), 3, 4, 2, dtype=torch.float64, seed=4)
    h0 = random_state(3, 3, 4, 2, dtype=torch.float64, seed=5)
    cu = cu_seqlens(lengths)
    check_varlen_per_sequence(gla, naive_gla, x, h0, cu)


def test_gla_float32_against_reference_with_grads():
    torch.manual_seed(0)
    x = gla_inputs(2, 7, 3, 4, 5, seed=6)
    report = check_against_reference(gla, x, tol=TOL32, initial_state=random_state(
        2, 3, 4, 5, seed=7), return_final_state=True, **REF)
    assert "grad g" in {m.name for m in report}
