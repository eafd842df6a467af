"""`ssmc.ops.gla` (gated linear attention, per-key log gates) against a float64 loop."""
import pytest
import torch

from ssmc.ops import gla
from tests.helpers import (SHAPES, check_against_reference, compare, cu_seqlens, gla_inputs,
                           random_state)

TOL64 = 1e-10  # float64 op against the float64 loop
TOL32 = 1e-5   # float32 op against the float64 reference (outputs and gradients)
REF = dict(backend="reference")  # these tests check the definition, not a kernel backend


def naive_gla(q, k, v, g, scale=None, initial_state=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t;  o_t = (scale q_t) S_t; scale = n^-0.5."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    b, t, h, n = q.shape
    scale = n ** -0.5 if scale is None else scale
    S = (torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64) if initial_state is None
         else initial_state.double().clone())
    o = torch.zeros(*v.shape, dtype=torch.float64)
    for i in range(t):
        S = g[:, i, :, :, None].exp() * S + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = (q[:, i, :, :, None] * scale * S).sum(2)
    return o, S


def close(name, actual, expected, tol=TOL64):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("scale", [None, 0.3])
def test_gla_matches_naive(shape, scale):
    torch.manual_seed(0)
    b, t, h, n, p = (shape[a] for a in "bthnp")
    x = gla_inputs(b, t, h, n, p, dtype=torch.float64, seed=1)
    h0 = random_state(b, h, n, p, dtype=torch.float64, seed=2)
    y, hT = gla(**x, scale=scale, initial_state=h0, return_final_state=True, **REF)
    y_ref, h_ref = naive_gla(**x, scale=scale, initial_state=h0)
    close("y", y, y_ref)
    close("final_state", hT, h_ref)


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
    y, hT = gla(**x, cu_seqlens=cu, initial_state=h0, return_final_state=True, **REF)
    bounds = cu.tolist()
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        yi, hi_ref = naive_gla(**{k: v[:, lo:hi] for k, v in x.items()},
                               initial_state=h0[i:i + 1])
        close(f"y of sequence {i}", y[:, lo:hi], yi)
        close(f"final_state of sequence {i}", hT[i:i + 1], hi_ref)


def test_gla_float32_against_reference_with_grads():
    torch.manual_seed(0)
    x = gla_inputs(2, 7, 3, 4, 5, seed=6)
    report = check_against_reference(gla, x, tol=TOL32, initial_state=random_state(
        2, 3, 4, 5, seed=7), return_final_state=True, **REF)
    assert "grad g" in {m.name for m in report}
