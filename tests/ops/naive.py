"""What the linear-attention-family ops tests (gla, retention, linear_attention) share: the
float64 recurrent loop they are checked against and the checks built on it."""
import torch

from tests.helpers import compare, random_state

TOL64 = 1e-10  # float64 op against the float64 loop
REF = dict(backend="reference")  # these tests check the definition, not a kernel backend


def naive_loop(q, k, v, decay, scale=None, initial_state=None):
    """S_t = decay(S_{t-1}, t) + k_t^T v_t;  o_t = (scale q_t) S_t; scale = n^-0.5 by default.
    `decay` gets the float64 state and the step; q, k, v are taken in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    b, t, h, n = q.shape
    scale = n ** -0.5 if scale is None else scale
    S = (torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64) if initial_state is None
         else initial_state.double().clone())
    o = torch.zeros(*v.shape, dtype=torch.float64)
    for i in range(t):
        S = decay(S, i) + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = torch.einsum("bhn,bhnp->bhp", q[:, i] * scale, S)
    return o, S


def close(name, actual, expected, tol=TOL64):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


def check_matches_naive(op, make_inputs, naive, shape, scale):
    """The op (float64, with an initial state) against its loop: output and final state."""
    torch.manual_seed(0)
    b, t, h, n, p = (shape[a] for a in "bthnp")
    x = make_inputs(b, t, h, n, p, dtype=torch.float64, seed=1)
    h0 = random_state(b, h, n, p, dtype=torch.float64, seed=2)
    y, hT = op(**x, scale=scale, initial_state=h0, return_final_state=True, **REF)
    y_ref, h_ref = naive(**x, scale=scale, initial_state=h0)
    close("y", y, y_ref)
    close("final_state", hT, h_ref)


def check_varlen_per_sequence(op, naive, x, h0, cu):
    """A packed batch (`cu` the sequence bounds) against the loop run on each sequence alone;
    inputs without a time axis (fewer than 4 dims) are passed whole."""
    y, hT = op(**x, cu_seqlens=cu, initial_state=h0, return_final_state=True, **REF)
    bounds = cu.tolist()
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        xi = {k: v[:, lo:hi] if v.dim() == 4 else v for k, v in x.items()}
        yi, hi_ref = naive(**xi, initial_state=h0[i:i + 1])
        close(f"y of sequence {i}", y[:, lo:hi], yi)
        close(f"final_state of sequence {i}", hT[i:i + 1], hi_ref)
