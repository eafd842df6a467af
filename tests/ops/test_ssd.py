"""`ssmc.ops.ssd` (Mamba-2) against the published SSD recurrence, written here as a loop."""
import pytest
import torch
import torch.nn.functional as TF

import ssmc
from ssmc.ops import mamba2, ssd
from tests.helpers import (SHAPES, check_against_reference, compare, cu_seqlens, random_state,
                           ssd_inputs)

TOL64 = 1e-10  # float64 op against the float64 loop
TOL32 = 1e-5   # float32 op against the float64 reference (outputs and gradients)
REF = dict(backend="reference")  # these tests check the definitions, not a kernel backend


def naive_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
              dt_limit=(0.0, float("inf")), initial_state=None):
    """Mamba-2: dt = softplus(dt + dt_bias) clamped to dt_limit;
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T;  y_t = C_t^T h_t + D x_t;  y *= silu(z).
    Heads share B, C by groups: head i reads group i // (h / g). Float64 throughout."""
    x, dt, A, B, C = (v.double() for v in (x, dt, A, B, C))
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    group = torch.arange(h) // (h // g)
    Bh, Ch = B[:, :, group], C[:, :, group]                # (b, t, h, n)
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = TF.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):  # as mamba_ssm: an explicit limit clamps
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    state = (torch.zeros(b, h, n, p, dtype=torch.float64) if initial_state is None
             else initial_state.double().clone())
    y = torch.zeros(b, t, h, p, dtype=torch.float64)
    for i in range(t):
        dA = torch.exp(dt[:, i] * A)                       # (b, h)
        dBx = dt[:, i, :, None, None] * Bh[:, i, :, :, None] * x[:, i, :, None, :]
        state = dA[:, :, None, None] * state + dBx
        y[:, i] = torch.einsum("bhn,bhnp->bhp", Ch[:, i], state)
    if D is not None:
        D = D.double()
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * TF.silu(z.double())
    return y, state


def close(name, actual, expected, tol=TOL64):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


OPTIONS = {
    "plain": dict(inputs=dict(D=False, z=False, dt_bias=False), call=dict()),
    "softplus": dict(inputs=dict(D=False, z=False, dt_bias=False), call=dict(dt_softplus=True)),
    "full": dict(inputs=dict(), call=dict(dt_softplus=True)),
    "d_per_channel_limit": dict(inputs=dict(D_per_channel=True, z=False),
                                call=dict(dt_softplus=True, dt_limit=(0.1, 0.9))),
    "limit_without_softplus": dict(inputs=dict(D=False), call=dict(dt_limit=(0.0, 0.3))),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("option", list(OPTIONS))
def test_ssd_matches_naive(option, shape):
    torch.manual_seed(0)
    opt = OPTIONS[option]
    x = ssd_inputs(**shape, dtype=torch.float64, seed=1, **opt["inputs"])
    h0 = random_state(shape["b"], shape["h"], shape["n"], shape["p"], dtype=torch.float64,
                      seed=2)
    y, hT = ssd(**x, **opt["call"], initial_state=h0, return_final_state=True, **REF)
    y_ref, h_ref = naive_ssd(**x, **opt["call"], initial_state=h0)
    assert y.shape == x["x"].shape and hT.shape == h0.shape
    close("y", y, y_ref)
    close("final_state", hT, h_ref)
    y_only = ssd(**x, **opt["call"], **REF)
    close("y without state", y_only, naive_ssd(**x, **opt["call"])[0])


def test_ssd_varlen_matches_naive_per_sequence():
    torch.manual_seed(0)
    lengths = [6, 0, 1, 12]
    x = ssd_inputs(1, sum(lengths), 4, 2, 5, 3, dtype=torch.float64, seed=3)
    h0 = random_state(len(lengths), 4, 5, 3, dtype=torch.float64, seed=4)
    cu = cu_seqlens(lengths)
    y, hT = ssd(**x, dt_softplus=True, cu_seqlens=cu, initial_state=h0, return_final_state=True,
                **REF)
    assert hT.shape == (4, 4, 5, 3)
    bounds = cu.tolist()
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        xi = {k: v[:, lo:hi] if v.dim() >= 3 else v for k, v in x.items()}
        yi, hi_ref = naive_ssd(**xi, dt_softplus=True, initial_state=h0[i:i + 1])
        close(f"y of sequence {i}", y[:, lo:hi], yi)
        close(f"final_state of sequence {i}", hT[i:i + 1], hi_ref)


def test_mamba2_definition_matches_naive():
    """DESIGN.md's mamba2 (D per head, z gate, softplus on dt, no dt_bias) via ssmc.compile."""
    torch.manual_seed(0)
    x = ssd_inputs(2, 7, 6, 3, 4, 5, dt_bias=False, dtype=torch.float64, seed=5)
    op = ssmc.compile(mamba2, **REF)
    y = op(x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"])
    close("y", y, naive_ssd(**x, dt_softplus=True)[0])


def test_ssd_gates_change_the_result():
    """The options are not silently dropped: each one changes the output."""
    torch.manual_seed(0)
    x = ssd_inputs(1, 7, 4, 2, 3, 2, dtype=torch.float64, seed=6)
    base = ssd(**x, dt_softplus=True, **REF)
    for change in (dict(dt_softplus=False), dict(dt_limit=(0.0, 0.2))):
        assert not compare("y", ssd(**{**x, **dict(dt_softplus=True), **change}, **REF), base,
                           1e-6).ok
    for drop in ("D", "z", "dt_bias"):
        assert not compare("y", ssd(**{k: v for k, v in x.items() if k != drop},
                                    dt_softplus=True, **REF), base, 1e-6).ok


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"t{s['t']}")
def test_ssd_float32_against_reference_with_grads(shape):
    torch.manual_seed(0)
    x = ssd_inputs(**shape, seed=7)
    h0 = random_state(shape["b"], shape["h"], shape["n"], shape["p"], seed=8)
    report = check_against_reference(ssd, x, tol=TOL32, dt_softplus=True, initial_state=h0,
                                     return_final_state=True, **REF)
    names = {m.name for m in report}
    assert {"y", "final_state", "grad x", "grad A", "grad dt_bias", "grad initial_state"} <= names


def test_ssd_float32_varlen_against_reference_with_grads():
    torch.manual_seed(0)
    x = ssd_inputs(1, 20, 4, 2, 5, 3, seed=9)
    check_against_reference(ssd, x, tol=TOL32, dt_softplus=True,
                            cu_seqlens=cu_seqlens([3, 0, 17]), return_final_state=True, **REF)
