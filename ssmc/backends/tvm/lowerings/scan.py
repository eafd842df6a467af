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
        for d_index, direction in e.orders():
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


@register_lowering("scan", target="cuda")
def render_scan_cuda(spec: KernelSpec) -> str:
    """The scan on a GPU: one block per (sequence, head), one thread per value channel p.

    A column state[:, p] evolves independently of the other columns (the decay is diagonal),
    so each thread keeps its n-vector of state in registers/local memory and needs no
    synchronisation; key, query and decay are recomputed per thread (cheap next to the loads).
    """
    e = Emitter(spec)
    w, r = e.w, e.program.recurrence
    N = spec.N
    if spec.P > 1024:
        raise ValueError(f"the CUDA scan runs one thread per value channel; p={spec.P} > 1024")
    e.header()
    with e.tasks(cuda_p=True):
        e.alloc("st", (N,))
        e.alloc("yb", (1,))
        for d_index, direction in e.orders():
            with w.block(f"for n_ in range({i64(N)}):"):
                v = e.load_h0(d_index) if e.plan.has_initial_state else e.renderer.const(0)
                w(f"st[n_] = {v}")
            with w.block("for i_ in range(L_):"):
                w(f"t_ = {e.time_of(direction, 'i_')}")
                vv = e.value_of(r.value.expr, e.index("t_", p="p_"))
                w(f"yb[T.int64(0)] = {e.renderer.const(0)}")
                # unrolled, so that st[n_] has constant indices and can live in registers
                loop = "T.unroll" if N <= 256 else "range"
                with w.block(f"for n_ in {loop}({i64(N)}):"):
                    idx = e.index("t_", n="n_", p="p_")
                    k = e.value_of(r.key.expr, idx)
                    q = e.value_of(r.query.expr, idx)
                    if r.decay is not None:
                        d = e.value_of(r.decay.expr, idx)
                        w(f"st[n_] = {d} * st[n_] + {k} * {vv}")
                    else:
                        w(f"st[n_] = st[n_] + {k} * {vv}")
                    w(f"yb[T.int64(0)] = yb[T.int64(0)] + {q} * st[n_]")
                e.emit_y(d_index, "t_", "yb[T.int64(0)]")
            if e.plan.return_final_state:
                with w.block(f"for n_ in range({i64(N)}):"):
                    w(f"hT[{e.state_index(d_index)}] = st[n_]")
    return e.finish()
