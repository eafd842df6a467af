"""The quadratic lowering: masked, decayed attention over the whole sequence.

For each query position i, y_i = sum_{j <= i} (query_i . (decay_{j+1} ... decay_i) key_j)
value_j (+ query_i . (decay_1 ... decay_i) initial_state). The decay products are built by
walking j from i down to the sequence start and multiplying one decay per step, so they are
exact products (no logarithms) and nothing of size t x t is stored. O(t^2 (n + p)) work per
head: the right choice for short sequences only. Legal for decays without a p axis.
"""
from __future__ import annotations

from .common import Emitter, KernelSpec, i64, register_lowering


def walk_decay(e: Emitter, t: str) -> None:
    """lr[n] *= decay at time t (the factor taking a product one step further back)."""
    decay = e.program.recurrence.decay
    if decay is not None:
        with e.w.block(f"for n_ in range({i64(e.Nd)}):"):
            d = e.value_of(decay.expr, e.index(t, n="n_"))
            e.w(f"lr[n_] = lr[n_] * {d}")


def start_row(e: Emitter, direction) -> None:
    """In the loop over rows i_ of `direction`: t_, the row's query in qv, and lr = 1 (the
    empty decay product)."""
    w = e.w
    w(f"t_ = {e.time_of(direction, 'i_')}")
    with w.block(f"for n_ in range({i64(e.spec.N)}):"):
        w(f"qv[n_] = {e.value_of(e.program.recurrence.query.expr, e.index('t_', n='n_'))}")
    with w.block(f"for n_ in range({i64(e.Nd)}):"):
        w(f"lr[n_] = {e.renderer.const(1)}")


def matrix_entry(e: Emitter, tj: str) -> None:
    """ms[0] = the matrix entry of the query in qv and the key at time `tj`, through the decay
    product in lr."""
    dn = "n_" if e.Nd > 1 else "T.int64(0)"
    e.w(f"ms[T.int64(0)] = {e.renderer.const(0)}")
    with e.w.block(f"for n_ in range({i64(e.spec.N)}):"):
        k = e.value_of(e.program.recurrence.key.expr, e.index(tj, n="n_"))
        e.w(f"ms[T.int64(0)] = ms[T.int64(0)] + qv[n_] * lr[{dn}] * {k}")


@register_lowering("quadratic")
def render_quadratic(spec: KernelSpec) -> str:
    e = Emitter(spec)
    w, r = e.w, e.program.recurrence
    N, P, Nd = spec.N, spec.P, e.Nd
    dn = "n_" if Nd > 1 else "T.int64(0)"
    zero, one = e.renderer.const(0), e.renderer.const(1)
    e.header()

    with e.tasks():
        e.alloc("qv", (N,))
        e.alloc("kv", (N,))
        e.alloc("vv", (P,))
        e.alloc("yc", (P,))
        e.alloc("lr", (Nd,))       # running decay product from j+1 to i
        e.alloc("ms", (1,))        # one entry of the attention matrix
        if e.plan.return_final_state:
            e.alloc("st", (N, P))
        for d_index, direction in e.orders():
            with w.block("for i_ in range(L_):"):
                start_row(e, direction)
                with w.block(f"for p_ in range({i64(P)}):"):
                    w(f"yc[p_] = {zero}")
                with w.block("for jj_ in range(i_ + T.int64(1)):"):
                    w(f"tj_ = {e.time_of(direction, 'i_ - jj_')}")
                    matrix_entry(e, "tj_")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        v = e.value_of(r.value.expr, e.index("tj_", p="p_"))
                        w(f"yc[p_] = yc[p_] + ms[T.int64(0)] * {v}")
                    walk_decay(e, "tj_")
                if e.plan.has_initial_state:
                    # lr now holds decay_first ... decay_i
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for p_ in range({i64(P)}):"):
                            w(f"yc[p_] = yc[p_] + qv[n_] * lr[{dn}] * {e.load_h0(d_index)}")
                with w.block(f"for p_ in range({i64(P)}):"):
                    e.emit_y(d_index, "t_", "yc[p_]")
            if e.plan.return_final_state:
                # the last row of the matrix, with outer products instead of the query
                with w.block(f"for n_ in range({i64(N)}):"):
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"st[n_, p_] = {zero}")
                with w.block(f"for n_ in range({i64(Nd)}):"):
                    w(f"lr[n_] = {one}")
                with w.block("for jj_ in range(L_):"):
                    w(f"tj_ = {e.time_of(direction, 'L_ - T.int64(1) - jj_')}")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        w(f"kv[n_] = {e.value_of(r.key.expr, e.index('tj_', n='n_'))}")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"vv[p_] = {e.value_of(r.value.expr, e.index('tj_', p='p_'))}")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w(f"st[n_, p_] = st[n_, p_] + lr[{dn}] * kv[n_] * vv[p_]")
                    walk_decay(e, "tj_")
                if e.plan.has_initial_state:
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for p_ in range({i64(P)}):"):
                            w(f"st[n_, p_] = st[n_, p_] + lr[{dn}] * {e.load_h0(d_index)}")
                e.store_state("st", d_index)
    return e.finish()
