"""`ssmc.ops.retention` (RetNet) against the recurrent form written here as a float64 loop."""
import pytest
import torch

from ssmc.ops import retention
from ssmc.ops.retention import default_gamma
from tests.helpers import (SHAPES, check_against_reference, compare, cu_seqlens, random_state,
                           retention_inputs)

TOL64 = 1e-10  # float64 op against the float64 loop
TOL32 = 1e-5   # float32 op against the float64 reference (outputs and gradients)
REF = dict(backend="reference")  # these tests check the definition, not a kernel backend


def naive_retention(q, k, v, gamma, scale=None, initial_state=None):
    """S_t = gamma S_{t-1} + k_t^T v_t (per head);  o_t = (scale q_t) S_t; scale = n^-0.5."""
    q, k, v, gamma = (x.double() for x in (q, k, v, gamma))
    b, t, h, n = q.shape
    scale = n ** -0.5 if scale is None else scale
    S = (torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64) if initial_state is None
         else initial_state.double().clone())
    o = torch.zeros(*v.shape, dtype=torch.float64)
    for i in range(t):
        S = gamma[None, :, None, None] * S + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = torch.einsum("bhn,bhnp->bhp", q[:, i] * scale, S)
    return o, S


def close(name, actual, expected, tol=TOL64):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("scale", [None, 0.7])
def test_retention_matches_naive(shape, scale):
    torch.manual_seed(0)
    b, t, h, n, p = (shape[a] for a in "bthnp")
    x = retention_inputs(b, t, h, n, p, dtype=torch.float64, seed=1)
    h0 = random_state(b, h, n, p, dtype=torch.float64, seed=2)
    y, hT = retention(**x, scale=scale, initial_state=h0, return_final_state=True, **REF)
    y_ref, h_ref = naive_retention(**x, scale=scale, initial_state=h0)
    close("y", y, y_ref)
    close("final_state", hT, h_ref)


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
    y, hT = retention(**x, cu_seqlens=cu, initial_state=h0, return_final_state=True, **REF)
    bounds = cu.tolist()
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        xi = {k: v[:, lo:hi] if v.dim() == 4 else v for k, v in x.items()}
        yi, hi_ref = naive_retention(**xi, initial_state=h0[i:i + 1])
        close(f"y of sequence {i}", y[:, lo:hi], yi)
        close(f"final_state of sequence {i}", hT[i:i + 1], hi_ref)


def test_retention_float32_against_reference_with_grads():
    torch.manual_seed(0)
    x = retention_inputs(2, 7, 3, 4, 5, seed=7)
    check_against_reference(retention, x, tol=TOL32, initial_state=random_state(2, 3, 4, 5,
                            seed=8), return_final_state=True, **REF)


def test_retention_rejects_non_finite_scale():
    x = retention_inputs(1, 2, 1, 2, 2, seed=9)
    with pytest.raises(ValueError, match="scale must be finite"):
        retention(**x, scale=float("inf"), **REF)
