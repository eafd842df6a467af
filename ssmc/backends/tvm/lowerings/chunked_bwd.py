"""The recurrence's backward in chunks (SSD form) as TIR for the LLVM target.

For decays that are positive with an exact log (`program.decay_log_safe`) and carry no n or p
axis (scalar per step, per head, or none); every forward lowering may use it (they compute
the same function). Per head, in the direction's own time, a chunk of Q steps with log-decays
l_u, S_in the state entering it and G = dL/dS at its end:

    D[u, s] = prod_{s < r <= u} a_r (a = exp(l); u >= s, else 0),   A = (q k^T) * D
    cd_u = exp(l_0 + ... + l_u),   re_s = exp(l_{s+1} + ... + l_last),   el = cd_last
    dA = (dy v^T) * D
    dq = dA k + cd * (dy S_in^T)        dk = dA^T q + re * (v G^T)
    dv = A^T dy + (re * k) G            G <- el * G + (cd * q)^T dy  (G of the chunk before)
    dL/dl_r = sum over the pairs s < r <= u of M[u, s] = dA[u, s] (q_u . k_s)
              + sum_{u >= r} q_u . (cd * dy S_in^T)_u + sum_{s < r} k_s . (re * v G^T)_s
              + el * sum (G * S_in)

the pairs whose weight the decay at r enters: inside the chunk, from the entering state, to the
leaving state, and across the whole chunk. Summed directly (rectangles of M), not as the suffix
sum of q dq - k dk, whose pairs with both ends at r or later cancel: a time-invariant decay's
gradient sums that residue over every step (4e-5 relative in fp32, a fuzz finding). The
gradient goes out as d log_decay (the chain rule takes it as is; dividing by the decay would
fail where it underflows to 0).

Decay factors: D is a running product of the chunk's decays (one exp per step, not per entry:
LLVM calls libm's exp one lane at a time, ~6 ns each, which for Q^2 entries would cost as much
as the products); cd, re and el are exps of direct sums (a -inf log-decay gives an exact 0,
never -inf - -inf, and -1e4 never cancels against another sum). Products of decays in (0, 1]
never overflow.

Two functions, both parallel over (sequence, head) and sequential over chunks:

    ssmc_chunked_bwd_states(inputs, [cu], [h0], ws, [yw])
        the forward over chunks: stores the state entering every chunk, transposed (p, n), into
        ws (D, C, H, P, N); with `want_y` also y summed over directions into yw (B, TT, H, P)
        (zeroed by the caller).
    ssmc_chunked_bwd(inputs, [cu], dy, ws, gT, dq, dk, dv, [dl], [dh0])
        the chunks last to first, G carried from gT (grad_final): dq, dk (B, TT, H, N),
        dv (B, TT, H, P) and dl = dL/d log_decay (B, TT, H), written by the first direction and
        added to by the others (with a leading direction axis D, each its own, where inputs
        have the order axis k); dh0 (D, S, H, N, P) = G after the first chunk.

Chunk slots as in scan_bwd.py's checkpoints with Q steps per slot. Every product is written
with the output row in an inner vectorised loop and the reduction one loop out (the row stays
in registers; `matmul` takes two rows at a time); entries outside the causal half or past
the chunk's end are chosen away with a select, never multiplied (stale or uninitialised
scratch may hold anything).
"""
from __future__ import annotations

import contextlib
import functools

from ....ir import Program
from ....ir.orders import has_order_axis
from ....plan import Plan
from ..render import unsupported_in
from .common import KernelSpec, i64
from .scan_bwd import _BwdEmitter

#: lanes of the partial sums of dot products (one AVX-512 register of fp32)
LANES = 16


def unsupported(plan: Plan) -> str | None:
    """Why the chunked backward cannot serve `plan` (None when it can)."""
    prog: Program = plan.program
    if prog.recurrence.decay is None:
        return None
    if not prog.decay_log_safe:
        return "the decay may be zero or negative (its gradient needs the states)"
    if prog.log_decay is None or {"n", "p"} & set(prog.log_decay.axes):
        return "the decay varies over the key or value axis"
    bad = unsupported_in(prog.log_decay.expr)
    if bad is not None:
        return f"the log-decay uses {bad}"
    return None


def num_slots(B: int, T: int, num_seqs: int, varlen: bool, Q: int) -> int:
    """How many chunk slots (per direction) the functions index into."""
    if varlen:
        return T // Q + num_seqs + 1
    return max(B * ((T + Q - 1) // Q), 1)


class _ChunkEmitter(_BwdEmitter):
    """Chunk-wise helpers over the scan backward's headers."""

    def __init__(self, spec: KernelSpec):
        super().__init__(spec)
        self.Q = spec.plan.chunk_size
        self.has_decay = self.program.recurrence.decay is not None
        self.zero = self.renderer.const(0)
        self.one = self.renderer.const(1)

    def slot(self, c: str) -> str:
        Q = self.Q
        if self.varlen:
            return f"t0_ // {i64(Q)} + s_ + ({c})"
        return f"s_ * ((TT + {i64(Q - 1)}) // {i64(Q)}) + ({c})"

    def ws_shape(self) -> str:
        s = self.spec
        return f"({i64(self.D)}, C, {i64(s.H)}, {i64(s.P)}, {i64(s.N)})"

    @contextlib.contextmanager
    def chunks(self, reverse: bool = False):
        """The loop over the sequence's chunks; defines c_, c0_, cl_."""
        Q, w = self.Q, self.w
        w(f"nc_ = (L_ + {i64(Q - 1)}) // {i64(Q)}")
        with w.block("for cc_ in range(nc_):"):
            w("c_ = nc_ - T.int64(1) - cc_" if reverse else "c_ = cc_")
            w(f"c0_ = c_ * {i64(Q)}", f"cl_ = T.min({i64(Q)}, L_ - c0_)")
            yield

    def load_chunk(self, direction, parts: tuple[str, ...], dy: bool = False):
        """Operands of the chunk's steps (serial loops: rendered expressions hold let
        bindings): kc (Q, N) and kT (N, Q) for "key", qc (Q, N) for "query" (and qT (N, Q)
        for "query_t"), vc (Q, P) and vT (P, Q) for "value", dyc (Q, P) with `dy`,
        log-decays lg (Q,) when there is a decay."""
        w, r, s = self.w, self.program.recurrence, self.spec
        with w.block("for i_ in range(cl_):"):
            w(f"t_ = {self.time_of(direction, 'c0_ + i_')}")
            if "key" in parts or "query" in parts:
                with w.block(f"for n_ in range({i64(s.N)}):"):
                    idx = self.index("t_", n="n_")
                    if "key" in parts:
                        w(f"kv_ = {self.value_of(r.key.expr, idx)}")
                        w("kc[i_, n_] = kv_", "kT[n_, i_] = kv_")
                    if "query" in parts:
                        w(f"qv_ = {self.value_of(r.query.expr, idx)}", "qc[i_, n_] = qv_")
                        if "query_t" in parts:
                            w("qT[n_, i_] = qv_")
            if "value" in parts:
                with w.block(f"for p_ in range({i64(s.P)}):"):
                    w(f"vv_ = {self.value_of(r.value.expr, self.index('t_', p='p_'))}")
                    w("vc[i_, p_] = vv_", "vT[p_, i_] = vv_")
            if dy:
                with w.block(f"for p_ in T.vectorized({i64(s.P)}):"):
                    w("dyc[i_, p_] = dy[b_, t_, h_, p_]")
            if self.has_decay:
                lg = self.value_of(self.program.log_decay.expr, self.index("t_"))
                w(f"lg[i_] = {lg}")

    def decay_factors(self, matrix: bool):
        """cd, re (Q,) and el (1,) from the chunk's log-decays (exps of direct sums); with
        `matrix` also D (Q, Q), the causal running products of exp(lg)."""
        w, Q, zero, one = self.w, self.Q, self.zero, self.one
        last = "cl_ - T.int64(1)"
        w(f"sm[T.int64(0)] = {zero}")
        with w.block("for i_ in range(cl_):"):
            w("sm[T.int64(0)] = sm[T.int64(0)] + lg[i_]", "cd[i_] = T.exp(sm[T.int64(0)])")
        w(f"el[T.int64(0)] = cd[{last}]")
        w(f"sm[T.int64(0)] = {zero}", f"re[{last}] = {one}")
        with w.block(f"for jj_ in range({last}):"):
            w(f"j_ = {last} - T.int64(1) - jj_")
            w("sm[T.int64(0)] = sm[T.int64(0)] + lg[j_ + T.int64(1)]",
              "re[j_] = T.exp(sm[T.int64(0)])")
        if not matrix:
            return
        with w.block("for i_ in range(cl_):"):
            w("ea[i_] = T.exp(lg[i_])")
        with w.block(f"for j_ in T.vectorized({i64(Q)}):"):
            w(f"Dm[T.int64(0), j_] = T.if_then_else(j_ == T.int64(0), {one}, {zero})")
        with w.block("for i_ in range(T.int64(1), cl_):"):
            with w.block(f"for j_ in T.vectorized({i64(Q)}):"):
                w(f"Dm[i_, j_] = T.if_then_else(j_ < i_, Dm[i_ - T.int64(1), j_] * ea[i_], "
                  f"T.if_then_else(j_ == i_, {one}, {zero}))")

    def matmul(self, out: str, a, b, rows: str, inner: str, width: int, start: str = "0"):
        """out[r, j] = start + sum_{x < inner} a(r, x) * b(x, j) for r < rows, j < width, with
        start 0, "out" (out[r, j] itself) or a scale text (out[r, j] times it): two rows at a
        time, so that each row of b is loaded once for both (~15% faster than one row at a
        time at 32 x 64 x 64); the rows stay in registers over x. `a` and `b` map index texts
        to element texts."""
        w = self.w

        def init(r: str):
            if start != "out":
                w(f"{out}[{r}, j_] = " + (self.zero if start == "0" else
                                          f"{out}[{r}, j_] * {start}"))

        def acc(r: str):
            w(f"{out}[{r}, j_] = {out}[{r}, j_] + {a(r, 'x_')} * {b('x_', 'j_')}")

        for pair in (True, False):
            head = (f"for r2_ in range({rows} // T.int64(2)):" if pair else
                    f"if {rows} % T.int64(2) == T.int64(1):")
            with w.block(head):
                w("r_ = r2_ * T.int64(2)" if pair else f"r_ = {rows} - T.int64(1)")
                names = ("r_", "r_ + T.int64(1)") if pair else ("r_",)
                if start != "out":
                    with w.block(f"for j_ in T.vectorized({i64(width)}):"):
                        for r in names:
                            init(r)
                with w.block(f"for x_ in range({inner}):"):
                    with w.block(f"for j_ in T.vectorized({i64(width)}):"):
                        for r in names:
                            acc(r)

    def causal(self, name: str, left: str, right: str, inner: int, decayed: bool = True):
        """name[u, s] = sum_x left[u, x] * right[x, s] on the causal half times D (unless not
        `decayed`), else 0 (rows u < cl_; right is stored (x, s))."""
        w, Q, zero = self.w, self.Q, self.zero
        self.matmul(name, lambda r, x: f"{left}[{r}, {x}]", lambda x, j: f"{right}[{x}, {j}]",
                    "cl_", i64(inner), Q)
        scaled = (f"{name}[u_, s_v] * Dm[u_, s_v]" if self.has_decay and decayed
                  else f"{name}[u_, s_v]")
        with w.block("for u_ in range(cl_):"):
            with w.block(f"for s_v in T.vectorized({i64(Q)}):"):
                w(f"{name}[u_, s_v] = T.if_then_else(s_v <= u_, {scaled}, {zero})")

    def dot(self, dst: str, a: str, b: str, size: int, sign: str = "+"):
        """dst = dst (sign) sum_x a(x) * b(x): LANES partial sums in a vector, then their sum
        (a serial sum would wait on every add). `a`, `b` are texts with `x_` as the index."""
        w, zero = self.w, self.zero
        full = size // LANES
        if full:
            with w.block(f"for l_ in T.vectorized({i64(LANES)}):"):
                w(f"part[l_] = {zero}")
            with w.block(f"for xo_ in range({i64(full)}):"):
                with w.block(f"for l_ in T.vectorized({i64(LANES)}):"):
                    ai = a.replace("x_", f"(xo_ * {i64(LANES)} + l_)")
                    bi = b.replace("x_", f"(xo_ * {i64(LANES)} + l_)")
                    w(f"part[l_] = part[l_] + {ai} * {bi}")
            with w.block(f"for l_ in range({i64(LANES)}):"):
                w(f"{dst} = {dst} {sign} part[l_]")
        if size % LANES:
            with w.block(f"for x_ in range({i64(full * LANES)}, {i64(size)}):"):
                w(f"{dst} = {dst} {sign} {a} * {b}")


def _put(e: _ChunkEmitter, buf: str, idx: str, value: str):
    """The first direction writes a gradient, the others add to it (a task owns its rows);
    each writes its own where the gradients have a direction axis (`grad_shape`)."""
    at = e.grad_at(buf, idx)
    first = e.order == 0 or has_order_axis(e.program)
    e.w(f"{at} = {value}" if first else f"{at} = {at} + {value}")


def render_states(spec: KernelSpec, want_y: bool) -> str:
    e = _ChunkEmitter(spec)
    w, s = e.w, spec
    N, P, Q = s.N, s.P, e.Q
    bufs = []
    if e.plan.has_initial_state:
        bufs.append(("h0", e.state_shape(), s.h0_dtype))
    bufs.append(("ws", e.ws_shape(), e.acc))
    if want_y:
        bufs.append(("yw", f"(B, TT, {i64(s.H)}, {i64(P)})", e.acc))
    e.bwd_header("ssmc_chunked_bwd_states", bufs)
    with e.tasks():
        e.alloc("st", (P, N))      # the state, transposed as ws stores it
        for name, shape in (("kc", (Q, N)), ("kT", (N, Q)), ("vc", (Q, P)), ("vT", (P, Q))):
            e.alloc(name, shape)
        if e.has_decay:
            for name in ("lg", "cd", "re"):
                e.alloc(name, (Q,))
            e.alloc("el", (1,))
            e.alloc("sm", (1,))
        if want_y:
            for name, shape in (("qc", (Q, N)), ("qT", (N, Q)), ("sc", (Q, Q)), ("yT", (P, Q)),
                                ("yc", (P,))):
                e.alloc(name, shape)
            if e.has_decay:
                e.alloc("ea", (Q,))
                e.alloc("Dm", (Q, Q))
        parts = ("key", "value") + (("query", "query_t") if want_y else ())
        for d_index, direction in e.orders():
            with w.block(f"for n_ in range({i64(N)}):"):
                with w.block(f"for p_ in range({i64(P)}):"):
                    v = e.load_h0(d_index) if e.plan.has_initial_state else e.zero
                    w(f"st[p_, n_] = {v}")
            with e.chunks():
                with w.block(f"for p_ in range({i64(P)}):"):
                    with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                        w(f"ws[{i64(d_index)}, {e.slot('c_')}, h_, p_, n_] = st[p_, n_]")
                e.load_chunk(direction, parts)
                if e.has_decay:
                    e.decay_factors(matrix=want_y)
                if want_y:
                    # y = A v + cd * (q S_in), the second as (S_in^T q^T)^T
                    e.causal("sc", "qc", "kT", N)
                    e.matmul("yT", lambda r, x: f"st[{r}, {x}]", lambda x, j: f"qT[{x}, {j}]",
                             i64(P), i64(N), Q)
                    cdu = " * cd[u_]" if e.has_decay else ""
                    with w.block("for u_ in range(cl_):"):
                        w(f"t_ = {e.time_of(direction, 'c0_ + u_')}")
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w(f"yc[p_] = {e.zero}")
                        with w.block("for j_ in range(u_ + T.int64(1)):"):
                            with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                                w("yc[p_] = yc[p_] + sc[u_, j_] * vc[j_, p_]")
                        with w.block(f"for p_ in range({i64(P)}):"):
                            w(f"yw[b_, t_, h_, p_] = yw[b_, t_, h_, p_] + yc[p_] + yT[p_, u_]{cdu}")
                # S^T <- el * S^T + sum_s re_s v_s k_s^T
                e.matmul("st", (lambda r, x: f"vT[{r}, {x}] * re[{x}]") if e.has_decay else
                         (lambda r, x: f"vT[{r}, {x}]"), lambda x, j: f"kc[{x}, {j}]",
                         i64(P), "cl_", N, "el[T.int64(0)]" if e.has_decay else "out")
    return e.finish()


def _decay_gradient_pairs(e) -> None:
    """`dlr[r]` = sum over the chunk's pairs s < r <= u of M[u, s] = dA[u, s] (q_u . k_s), as
    rectangles: row u's running sum over s < r, added to dlr[r] for every r <= u. Not as the
    suffix sum of q dq - k dk, whose pairs with both ends at r or later cancel: a
    time-invariant decay's gradient sums that residue over every step (a fuzz finding: 4e-5
    relative). `sc` holds q k^T without D on entry and gets D here."""
    w, zero = e.w, e.zero
    with w.block("for r_ in range(cl_):"):
        w(f"dlr[r_] = {zero}")
    with w.block("for u_ in range(cl_):"):
        w(f"sm[T.int64(0)] = {zero}")
        with w.block("for s_ in range(u_ + T.int64(1)):"):
            w("dlr[s_] = dlr[s_] + sm[T.int64(0)]")
            w("sm[T.int64(0)] = sm[T.int64(0)] + sc[u_, s_] * dA[u_, s_]")
    with w.block("for u_ in range(cl_):"):
        with w.block(f"for s_v in T.vectorized({i64(e.Q)}):"):
            w("sc[u_, s_v] = sc[u_, s_v] * Dm[u_, s_v]")


def render_bwd(spec: KernelSpec) -> str:
    e = _ChunkEmitter(spec)
    w, s = e.w, spec
    N, P, Q = s.N, s.P, e.Q
    acc, zero, dec = e.acc, e.zero, e.has_decay
    bufs = [("dy", f"(B, TT, {i64(s.H)}, {i64(P)})", acc),
            ("ws", e.ws_shape(), acc),
            ("gT", e.state_shape(), acc),
            ("dq", e.grad_shape(N), acc), ("dk", e.grad_shape(N), acc),
            ("dv", e.grad_shape(P), acc)]
    if dec:
        bufs.append(("dl", e.grad_shape(), acc))
    if e.plan.has_initial_state:
        bufs.append(("dh0", e.state_shape(), acc))
    e.bwd_header("ssmc_chunked_bwd", bufs)
    with e.tasks():
        for name, shape in (("G", (N, P)), ("GT", (P, N)), ("ST", (P, N)), ("kc", (Q, N)),
                            ("kT", (N, Q)), ("qc", (Q, N)), ("vc", (Q, P)), ("vT", (P, Q)),
                            ("dyc", (Q, P)), ("sc", (Q, Q)), ("dA", (Q, Q)), ("tq", (Q, N)),
                            ("tk", (Q, N)), ("tv", (Q, P)), ("rn", (N,)), ("rp", (P,)),
                            ("tp", (P,)), ("part", (LANES,))):
            e.alloc(name, shape)
        if dec:
            for name, shape in (("lg", (Q,)), ("cd", (Q,)), ("re", (Q,)), ("ea", (Q,)),
                                ("Dm", (Q, Q)), ("el", (1,)), ("sm", (1,)), ("gsp", (N,)),
                                ("term", (1,)), ("au", (Q,)), ("bk", (Q,)), ("dlr", (Q,))):
                e.alloc(name, shape)
        put = functools.partial(_put, e)
        for d_index, direction in e.orders():
            with w.block(f"for n_ in range({i64(N)}):"):
                with w.block(f"for p_ in range({i64(P)}):"):
                    w(f"G[n_, p_] = gT[{e.state_index(d_index)}]", "GT[p_, n_] = G[n_, p_]")
            with e.chunks(reverse=True):
                with w.block(f"for p_ in range({i64(P)}):"):
                    with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                        w(f"ST[p_, n_] = ws[{i64(d_index)}, {e.slot('c_')}, h_, p_, n_]")
                e.load_chunk(direction, ("key", "query", "value"), dy=True)
                if dec:
                    e.decay_factors(matrix=True)
                e.causal("sc", "qc", "kT", N, decayed=False)   # q k^T, D applied below
                e.causal("dA", "dyc", "vT", P)      # dA
                # the products with the states, for all rows at once: tq = dy S_in^T,
                # tk = v G^T (both (Q, N)), tv = k G (Q, P)
                e.matmul("tq", lambda r, x: f"dyc[{r}, {x}]", lambda x, j: f"ST[{x}, {j}]",
                         "cl_", i64(P), N)
                e.matmul("tk", lambda r, x: f"vc[{r}, {x}]", lambda x, j: f"GT[{x}, {j}]",
                         "cl_", i64(P), N)
                e.matmul("tv", lambda r, x: f"kc[{r}, {x}]", lambda x, j: f"G[{x}, {j}]",
                         "cl_", i64(N), P)
                cdu = " * cd[u_]" if dec else ""
                res = " * re[u_]" if dec else ""
                if dec:
                    _decay_gradient_pairs(e)
                # dq = dA k + cd * tq; au_u = q_u . (cd * tq)_u, the pairs from the state in
                with w.block("for u_ in range(cl_):"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + u_')}")
                    with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                        w(f"rn[n_] = tq[u_, n_]{cdu}")
                    if dec:
                        w(f"au[u_] = {zero}")
                        e.dot("au[u_]", "qc[u_, x_]", "rn[x_]", N)
                    with w.block("for j_ in range(u_ + T.int64(1)):"):
                        with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                            w("rn[n_] = rn[n_] + dA[u_, j_] * kc[j_, n_]")
                    with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                        put("dq", "b_, t_, h_, n_", "rn[n_]")
                # dk = dA^T q + re * tk; bk_s = k_s . (re * tk)_s, the pairs to the state out
                with w.block("for u_ in range(cl_):"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + u_')}")
                    with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                        w(f"rn[n_] = tk[u_, n_]{res}")
                    if dec:
                        w(f"bk[u_] = {zero}")
                        e.dot("bk[u_]", "kc[u_, x_]", "rn[x_]", N)
                    with w.block("for j_ in range(u_, cl_):"):
                        with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                            w("rn[n_] = rn[n_] + dA[j_, u_] * qc[j_, n_]")
                    with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                        put("dk", "b_, t_, h_, n_", "rn[n_]")
                # dv = A^T dy + re * tv
                with w.block("for u_ in range(cl_):"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + u_')}")
                    with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                        w(f"tp[p_] = tv[u_, p_]{res}")
                        w("rp[p_] = tp[p_]")
                    with w.block("for j_ in range(u_, cl_):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w("rp[p_] = rp[p_] + sc[j_, u_] * dyc[j_, p_]")
                    with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                        put("dv", "b_, t_, h_, p_", "rp[p_]")
                if dec:
                    # dL/dl_r = dlr_r (the chunk's own pairs and those from the state in) +
                    # sum_{s < r} bk_s + el * sum (G * S_in)
                    with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                        w(f"gsp[n_] = {zero}")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        with w.block(f"for n_ in T.vectorized({i64(N)}):"):
                            w("gsp[n_] = gsp[n_] + GT[p_, n_] * ST[p_, n_]")
                    w(f"term[T.int64(0)] = {zero}")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        w("term[T.int64(0)] = term[T.int64(0)] + gsp[n_]")
                    w("term[T.int64(0)] = term[T.int64(0)] * el[T.int64(0)]")
                    w(f"sm[T.int64(0)] = {zero}")    # the pairs from the state in: u >= r
                    with w.block("for jj_ in range(cl_):"):
                        w("j_ = cl_ - T.int64(1) - jj_")
                        w("sm[T.int64(0)] = sm[T.int64(0)] + au[j_]")
                        w("dlr[j_] = dlr[j_] + sm[T.int64(0)]")
                    w(f"sm[T.int64(0)] = {zero}")    # the pairs to the state out: s < r
                    with w.block("for j_ in range(cl_):"):
                        w(f"t_ = {e.time_of(direction, 'c0_ + j_')}")
                        put("dl", "b_, t_, h_", "dlr[j_] + sm[T.int64(0)] + term[T.int64(0)]")
                        w("sm[T.int64(0)] = sm[T.int64(0)] + bk[j_]")
                # G <- el * G + (cd * q)^T dy, and its transpose
                e.matmul("G", (lambda r, x: f"qc[{x}, {r}] * cd[{x}]") if dec else
                         (lambda r, x: f"qc[{x}, {r}]"), lambda x, j: f"dyc[{x}, {j}]",
                         i64(N), "cl_", P, "el[T.int64(0)]" if dec else "out")
                with w.block(f"for p_ in range({i64(P)}):"):
                    with w.block(f"for n_ in range({i64(N)}):"):
                        w("GT[p_, n_] = G[n_, p_]")
            if e.plan.has_initial_state:
                with w.block(f"for n_ in range({i64(N)}):"):
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"dh0[{e.state_index(d_index)}] = G[n_, p_]")
    return e.finish()
