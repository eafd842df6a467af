"""`ssmc.ops.selective_scan` (Mamba-1, S6) against mamba_ssm's selective-scan semantics,
written here from the math as a float64 loop (time-major layout)."""
import pytest
import torch
import torch.nn.functional as TF

from ssmc.ops import selective_scan
from tests.helpers import (SHAPES, check_against_reference, compare, cu_seqlens,
                           selective_scan_inputs)

TOL64 = 1e-10  # float64 op against the float64 loop
TOL32 = 1e-5   # float32 op against the float64 reference (outputs and gradients)
REF = dict(backend="reference")  # these tests check the definition, not a kernel backend


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, initial_state=None):
    """delta = softplus(delta + delta_bias); deltaA = exp(delta A); deltaB_u = delta B u;
    x_t = deltaA_t x_{t-1} + deltaB_u_t; y_t = x_t . C_t; out = (y + D u) * silu(z).
    u, delta, z: (b, t, d); A: (d, n); B, C: (b, t, n) or (b, t, g, n), channel c reading group
    c // (d / g). The state x is (b, d, n)."""
    u, delta, A, B, C = (v.double() for v in (u, delta, A, B, C))
    b, t, d = u.shape
    if B.dim() == 3:
        B, C = B[:, :, None], C[:, :, None]
    group = torch.arange(d) // (d // B.shape[2])
    Bd, Cd = B[:, :, group], C[:, :, group]                 # (b, t, d, n)
    if delta_bias is not None:
        delta = delta + delta_bias.double()
    if delta_softplus:
        delta = TF.softplus(delta)
    deltaA = torch.exp(delta[..., None] * A)                # (b, t, d, n)
    deltaB_u = delta[..., None] * Bd * u[..., None]         # (b, t, d, n)
    x = (torch.zeros(b, d, A.shape[1], dtype=torch.float64) if initial_state is None
         else initial_state.double().clone())
    ys = []
    for i in range(t):
        x = deltaA[:, i] * x + deltaB_u[:, i]
        ys.append((x * Cd[:, i]).sum(-1))
    y = torch.stack(ys, 1) if ys else u.new_zeros(b, 0, d)
    out = y if D is None else y + D.double() * u
    if z is not None:
        out = out * TF.silu(z.double())
    return out, x


def close(name, actual, expected, tol=TOL64):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


OPTIONS = {
    "plain": (dict(D=False, z=False, delta_bias=False), dict()),
    "softplus_bias": (dict(D=False, z=False), dict(delta_softplus=True)),
    "full": (dict(), dict(delta_softplus=True)),
    "full_no_softplus": (dict(), dict()),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("grouped", [False, True], ids=["bc3d", "groups"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_selective_scan_matches_naive(option, grouped, shape):
    torch.manual_seed(0)
    make, call = OPTIONS[option]
    b, t, d, n = shape["b"], shape["t"], shape["h"], shape["n"]
    x = selective_scan_inputs(b, t, d, n, shape["g"] if grouped else None,
                              dtype=torch.float64, seed=1, **make)
    h0 = torch.randn(b, d, n, dtype=torch.float64)
    y, hT = selective_scan(**x, **call, initial_state=h0, return_final_state=True, **REF)
    y_ref, h_ref = naive_selective_scan(**x, **call, initial_state=h0)
    assert y.shape == (b, t, d) and hT.shape == (b, d, n)
    close("y", y, y_ref)
    close("final_state", hT, h_ref)
    close("y without state", selective_scan(**x, **call, **REF),
          naive_selective_scan(**x, **call)[0])


def test_selective_scan_varlen_matches_naive_per_sequence():
    torch.manual_seed(0)
    lengths = [5, 1, 0, 9]
    x = selective_scan_inputs(1, sum(lengths), 6, 4, 3, dtype=torch.float64, seed=2)
    h0 = torch.randn(len(lengths), 6, 4, dtype=torch.float64)
    cu = cu_seqlens(lengths)
    y, hT = selective_scan(**x, delta_softplus=True, cu_seqlens=cu, initial_state=h0,
                           return_final_state=True, **REF)
    bounds = cu.tolist()
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        xi = {k: v[:, lo:hi] if v.dim() >= 3 else v for k, v in x.items()}
        yi, hi_ref = naive_selective_scan(**xi, delta_softplus=True, initial_state=h0[i:i + 1])
        close(f"y of sequence {i}", y[:, lo:hi], yi)
        close(f"final_state of sequence {i}", hT[i:i + 1], hi_ref)


def test_selective_scan_ungrouped_equals_one_group():
    """B, C given as (b, t, n) mean one group shared by every channel."""
    torch.manual_seed(0)
    x = selective_scan_inputs(2, 7, 6, 4, dtype=torch.float64, seed=3)
    grouped = dict(x, B=x["B"][:, :, None], C=x["C"][:, :, None])
    close("y", selective_scan(**grouped, **REF), selective_scan(**x, **REF))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"t{s['t']}")
def test_selective_scan_float32_against_reference_with_grads(shape):
    torch.manual_seed(0)
    x = selective_scan_inputs(shape["b"], shape["t"], shape["h"], shape["n"], shape["g"], seed=4)
    h0 = torch.randn(shape["b"], shape["h"], shape["n"])
    report = check_against_reference(selective_scan, x, tol=TOL32, delta_softplus=True,
                                     initial_state=h0, return_final_state=True, **REF)
    assert {"y", "final_state", "grad u", "grad A", "grad delta_bias",
            "grad initial_state"} <= {m.name for m in report}
