"""The chunked (SSD) lowering: within a chunk of Q steps, y is a masked, decayed
(query . key) matrix times value plus the query times the state carried in; between chunks only
the n x p state is passed on.

Decays are handled in log space (the program's `log_decay`): `gT[n, i, j]` is the sum of
log-decays over the chunk's steps j < r <= i, built row by row as a direct sum, and every decay
factor is `exp(gT[i, j])`, so factors never exceed the decay products they stand for (no
overflow, unlike splitting them into exp(L_i) * exp(-L_j)), and neither a zero decay (log -inf)
nor a log-decay of -1e4 is ever subtracted from another sum (NaN, or the others rounded away).
Decays that may be zero or negative are refused (the TVM backward is the scan's, which needs
no log). Legal for decays without a p axis (scalar, per key, time
invariant, none).
"""
from __future__ import annotations

from .common import Emitter, KernelSpec, i64, register_lowering


@register_lowering("chunked")
def render_chunked(spec: KernelSpec) -> str:
    e = Emitter(spec)
    w, r, prog = e.w, e.program.recurrence, e.program
    N, P, Nd, Q = spec.N, spec.P, e.Nd, spec.plan.chunk_size
    has_decay = r.decay is not None
    diagonal = has_decay and Nd > 1
    zero = e.renderer.const(0)
    e.header()
    with e.tasks():
        e.alloc("st", (N, P))
        e.alloc("kT", (N, Q))      # key, transposed: inner loops run over the chunk
        e.alloc("qc", (Q, N))
        e.alloc("vc", (Q, P))
        e.alloc("sc", (Q, Q))      # scores (query_i . key_j) * decay(j -> i)
        e.alloc("yc", (P,))
        e.alloc("wq", (N,))
        e.alloc("wk", (Q,))
        if has_decay:
            # gT[n, i, j] (j <= i) = log-decay summed over the chunk's steps j < r <= i, and
            # l0 the first step's: every product's log is a direct sum, never a difference of
            # running sums (NaN at a zero decay, -inf - -inf; cancelling at -1e4)
            e.alloc("gT", (Nd, Q, Q))
            e.alloc("l0", (Nd,))
        dn = "n_" if diagonal else "T.int64(0)"
        for d_index, direction in e.orders():
            e.init_state("st", d_index)
            with w.block(f"for c_ in range((L_ + {i64(Q - 1)}) // {i64(Q)}):"):
                w(f"c0_ = c_ * {i64(Q)}", f"cl_ = T.min({i64(Q)}, L_ - c0_)")
                # operands of the chunk
                with w.block("for i_ in range(cl_):"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + i_')}")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        idx = e.index("t_", n="n_")
                        w(f"kT[n_, i_] = {e.value_of(r.key.expr, idx)}")
                        w(f"qc[i_, n_] = {e.value_of(r.query.expr, idx)}")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"vc[i_, p_] = {e.value_of(r.value.expr, e.index('t_', p='p_'))}")
                    if has_decay:
                        with w.block(f"for n_ in range({i64(Nd)}):"):
                            ld = e.value_of(prog.log_decay.expr, e.index("t_", n="n_"))
                            w(f"gT[n_, i_, i_] = {zero}")
                            with w.block("if i_ == T.int64(0):"):
                                w(f"l0[n_] = {ld}")
                            with w.block("else:"):
                                w("l_ = " + ld)
                                with w.block("for j_ in range(i_):"):
                                    w("gT[n_, i_, j_] = gT[n_, i_ - T.int64(1), j_] + l_")
                # scores over whole rows (constant extent, so the j loops vectorise); entries
                # above the diagonal, or past the chunk's end (stale or uninitialised keys),
                # are replaced by zero with a select, never multiplied (0 * NaN is NaN)
                with w.block("for i_ in range(cl_):"):
                    with w.block(f"for j_ in T.vectorized({i64(Q)}):"):
                        w(f"sc[i_, j_] = {zero}")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for j_ in T.vectorized({i64(Q)}):"):
                            term = "qc[i_, n_] * kT[n_, j_]"
                            if diagonal:
                                term += " * T.exp(gT[n_, i_, T.min(i_, j_)])"
                            w(f"sc[i_, j_] = sc[i_, j_] + {term}")
                    with w.block(f"for j_ in T.vectorized({i64(Q)}):"):
                        factor = "sc[i_, j_]"
                        if has_decay and not diagonal:
                            factor += " * T.exp(gT[T.int64(0), i_, T.min(i_, j_)])"
                        w(f"sc[i_, j_] = T.if_then_else(j_ <= i_, {factor}, {zero})")
                # y = scores @ value + (query * decay-from-chunk-start) @ state
                with w.block("for i_ in range(cl_):"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + i_')}")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"yc[p_] = {zero}")
                    with w.block("for j_ in range(i_ + T.int64(1)):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w("yc[p_] = yc[p_] + sc[i_, j_] * vc[j_, p_]")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        wq = (f"qc[i_, n_] * T.exp(l0[{dn}] + gT[{dn}, i_, T.int64(0)])"
                              if has_decay else "qc[i_, n_]")
                        w(f"wq[n_] = {wq}")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w("yc[p_] = yc[p_] + wq[n_] * st[n_, p_]")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        e.emit_y(d_index, "t_", "yc[p_]")
                # pass the state on to the next chunk
                last = "cl_ - T.int64(1)"
                with w.block(f"for n_ in range({i64(N)}):"):
                    with w.block("for j_ in range(cl_):"):
                        wk = f"kT[n_, j_] * T.exp(gT[{dn}, {last}, j_])" \
                            if has_decay else "kT[n_, j_]"
                        w(f"wk[j_] = {wk}")
                    if has_decay:
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w(f"st[n_, p_] = st[n_, p_] * T.exp(l0[{dn}] + gT[{dn}, {last}, "
                              "T.int64(0)])")
                    with w.block("for j_ in range(cl_):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w("st[n_, p_] = st[n_, p_] + wk[j_] * vc[j_, p_]")
            e.store_state("st", d_index)
    return e.finish()
