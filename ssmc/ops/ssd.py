"""Mamba-2's SSD (state space duality) layer."""
from __future__ import annotations

from .. import api
from .. import dsl as S
from ._variants import call


def build(has_D=False, D_per_channel=False, has_z=False, has_dt_bias=False, dt_softplus=False,
          dt_min=0.0, dt_max=float("inf")):
    """state_t = exp(dt_t A) state_{t-1} + B_t (x) (dt_t x_t);  y_t = C_t . state_t + D x_t,
    gated by silu(z_t)."""
    params = "x dt A B C" + " D" * has_D + " z" * has_z + " dt_bias" * has_dt_bias
    axes = {"x": "b t h p", "dt": "b t h", "A": "h", "B": "b t g n", "C": "b t g n",
            "D": "h p" if D_per_channel else "h", "z": "b t h p", "dt_bias": "h"}

    def ssd(*args):
        v = dict(zip(params.split(), args))
        dt = v["dt"]
        if has_dt_bias:
            dt = dt + v["dt_bias"]
        if dt_softplus:
            dt = S.softplus(dt)
        if (dt_min, dt_max) != (0.0, float("inf")):  # an explicit limit clamps both ends
            dt = S.clamp(dt, dt_min, dt_max if dt_max != float("inf") else None)
        y = S.recurrence(decay=S.exp(dt * v["A"]), key=v["B"], value=v["x"] * dt, query=v["C"])
        if has_D:
            y = y + v["D"] * v["x"]
        if has_z:
            y = y * S.silu(v["z"])
        return y

    ssd.__signature__ = _signature(params, axes)
    return api.ssm(ssd, name="ssd")


def _signature(params: str, axes: dict):
    import inspect
    return inspect.Signature([
        inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[axes[p]])
        for p in params.split()])


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, float("inf")), initial_state=None, return_final_state=False,
        cu_seqlens=None, backend="auto", lowering="auto"):
    """Mamba-2 SSD. x, z: (b, t, h, p); dt: (b, t, h); A, dt_bias: (h,); B, C: (b, t, g, n);
    D: (h,) or (h, p). Returns (b, t, h, p) [and the final state (b, h, n, p)]."""
    options = dict(has_D=D is not None, D_per_channel=D is not None and D.dim() == 2,
                   has_z=z is not None, has_dt_bias=dt_bias is not None,
                   dt_softplus=bool(dt_softplus), dt_min=float(dt_limit[0]),
                   dt_max=float(dt_limit[1]))
    tensors = (x, dt, A, B, C) + tuple(t for t in (D, z, dt_bias) if t is not None)
    return call(build, options, tensors, backend=backend, lowering=lowering,
                initial_state=initial_state, return_final_state=return_final_state,
                cu_seqlens=cu_seqlens)


#: the plain Mamba-2 definition of DESIGN.md (x, dt, A, B, C, D, z; softplus of dt), and the
#: definition of `ssd` for ssmc.compile, explain, tune and export
mamba2 = definition = ssd.definition = build(has_D=True, has_z=True, dt_softplus=True)
