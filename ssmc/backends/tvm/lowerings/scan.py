"""The scan lowering: sequential over t, parallel over (sequence, head), vectorised over p.

Per step the operands are evaluated once into small local vectors (key and query over n,
value over p, decay over whichever of n and p it varies on), then one fused loop over (n, p)
updates the state and accumulates y = query . state. Works for every decay kind, including the
full elementwise decay of Mamba-1 (S6).
"""
from __future__ import annotations

from .common import Emitter, KernelSpec, i64, register_lowering


@register_lowering("scan")
def render_scan(spec: KernelSpec) -> str:
    e = Emitter(spec)
    w, r = e.w, e.program.recurrence
    N, P, Nd, Pd = spec.N, spec.P, e.Nd, e.Pd
    e.header()
    with e.tasks():
        e.alloc("st", (N, P))
        e.alloc("kb", (N,))
        e.alloc("qb", (N,))
        e.alloc("vb", (P,))
        e.alloc("yb", (P,))
        if r.decay is not None:
            e.alloc("db", (Nd, Pd))
        for d_index, direction in enumerate(e.directions):
            e.init_state("st", d_index)
            with w.block("for i_ in range(L_):"):
                w(f"t_ = {e.time_of(direction, 'i_')}")
                with w.block(f"for n_ in range({i64(N)}):"):
                    idx = e.index("t_", n="n_")
                    w(f"kb[n_] = {e.value_of(r.key.expr, idx)}")
                    w(f"qb[n_] = {e.value_of(r.query.expr, idx)}")
                with w.block(f"for p_ in range({i64(P)}):"):
                    w(f"vb[p_] = {e.value_of(r.value.expr, e.index('t_', p='p_'))}")
                    w(f"yb[p_] = {e.renderer.const(0)}")
                if r.decay is not None:
                    with w.block(f"for n_ in range({i64(Nd)}):"):
                        with w.block(f"for p_ in range({i64(Pd)}):"):
                            w(f"db[n_, p_] = {e.value_of(r.decay.expr, e.index('t_', 'n_', 'p_'))}")
                dn = "n_" if Nd > 1 else "T.int64(0)"
                dp = "p_" if Pd > 1 else "T.int64(0)"
                with w.block(f"for n_ in range({i64(N)}):"):
                    # plain multiply-adds only: safe to vectorise (no let bindings)
                    with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                        decayed = f"db[{dn}, {dp}] * st[n_, p_]" if r.decay is not None \
                            else "st[n_, p_]"
                        w(f"st[n_, p_] = {decayed} + kb[n_] * vb[p_]")
                        w("yb[p_] = yb[p_] + qb[n_] * st[n_, p_]")
                with w.block(f"for p_ in range({i64(P)}):"):
                    e.emit_y(d_index, "t_", "yb[p_]")
            e.store_state("st", d_index)
    return e.finish()
