"""Mamba-1's selective scan (S6): one head per channel (h = d), value dim p = 1."""
from __future__ import annotations

from .. import api
from .. import dsl as S
from ._variants import call
from .ssd import _signature


def build(has_D=False, has_z=False, has_delta_bias=False, delta_softplus=False):
    """state_t = exp(delta_t A) state_{t-1} + B_t (x) (delta_t u_t), with A per (d, n)."""
    params = "u delta A B C" + " D" * has_D + " z" * has_z + " delta_bias" * has_delta_bias
    axes = {"u": "b t h p", "delta": "b t h", "A": "h n", "B": "b t g n", "C": "b t g n",
            "D": "h", "z": "b t h p", "delta_bias": "h"}

    def selective_scan(*args):
        v = dict(zip(params.split(), args))
        dt = v["delta"]
        if has_delta_bias:
            dt = dt + v["delta_bias"]
        if delta_softplus:
            dt = S.softplus(dt)
        y = S.recurrence(decay=S.exp(dt * v["A"]), key=v["B"], value=v["u"] * dt, query=v["C"])
        if has_D:
            y = y + v["D"] * v["u"]
        if has_z:
            y = y * S.silu(v["z"])
        return y

    selective_scan.__signature__ = _signature(params, axes)
    return api.ssm(selective_scan, name="selective_scan")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, cu_seqlens=None,
                   backend="auto", lowering="auto"):
    """Mamba-1 S6, time-major. u, delta, z: (b, t, d); A: (d, n); B, C: (b, t, n) or
    (b, t, g, n); D, delta_bias: (d,). Returns (b, t, d) [and the final state (b, d, n)]."""
    if B.dim() == 3:
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    options = dict(has_D=D is not None, has_z=z is not None, has_delta_bias=delta_bias is not None,
                   delta_softplus=bool(delta_softplus))
    tensors = (u.unsqueeze(-1), delta, A, B, C) + tuple(
        t for t in (D, None if z is None else z.unsqueeze(-1), delta_bias) if t is not None)
    h0 = None if initial_state is None else initial_state.unsqueeze(-1)
    out = call(build, options, tensors, backend=backend, lowering=lowering, initial_state=h0,
               return_final_state=return_final_state, cu_seqlens=cu_seqlens)
    if return_final_state:
        return out[0].squeeze(-1), out[1].squeeze(-1)
    return out.squeeze(-1)


#: the plain Mamba-1 definition (u, delta, A, B, C, D, z; softplus of delta), and the definition
#: of `selective_scan` for ssmc.compile, explain, tune and export. Its tensors carry the axes
#: the function adds: u and z (b, t, d, 1), B and C (b, t, g, n), with h = d and p = 1.
mamba1 = definition = selective_scan.definition = build(has_D=True, has_z=True,
                                                         delta_softplus=True)
