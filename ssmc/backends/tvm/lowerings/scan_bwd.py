"""The recurrence's backward as TIR by the scan: for every forward lowering whose decay the
chunked backward (chunked_bwd.py) does not take (zero or negative, per-key, per-element).

The scan, chunked and quadratic lowerings compute the same function, so they share one
gradient; it is computed the scan's way, which works for every decay kind (including decays
that vary over p). Forward, for one head in the direction's own time 1..L (S_0 the initial
state, * elementwise):

    S_t = a_t * S_{t-1} + k_t v_t^T,      y_t = S_t^T q_t

Given dy_t = dL/dy_t (the epilogue's derivative already applied, on the host) and G = dL/dS_L
(grad_final), the adjoint state runs in reverse time:

    dS_L = G + q_L dy_L^T,    dS_t = a_{t+1} * dS_{t+1} + q_t dy_t^T,    dL/dS_0 = a_1 * dS_1
    dq_t = S_t dy_t (over p)   dk_t = dS_t v_t (over p)   dv_t = dS_t^T k_t (over n)
    da_t = dS_t * S_{t-1}      (summed over p and/or n where the decay lacks them)

Two functions, both parallel over (sequence, head) and sequential over t, memory linear in t:

    ssmc_scan_bwd_ckpt(inputs, [cu], [h0], ck, [yw])
        runs the forward recurrence and stores the state entering every CK-step segment into
        ck (D, C, H, N, P); with `want_y` also y summed over directions into yw (B, TT, H, P)
        (for epilogues whose derivative needs y; yw is zeroed by the caller).
    ssmc_scan_bwd(inputs, [cu], dy, ck, gT, dq, dk, dv, [da], [dh0])
        walks the segments last to first: recomputes the segment's states from its checkpoint
        into a task-local scratch of CK states (CK, N, P) (TVM allocates it per task, so memory
        grows with the threads, not with b * h), then walks the segment backwards
        accumulating dq, dk (B, TT, H, N), dv (B, TT, H, P), da (B, TT, H, Nd, Pd)
        (zeroed by the caller; directions add into them: each task owns its rows), and writes
        dh0 (D, S, H, N, P). Where inputs have the order axis k (cross2d), the gradients have
        a leading direction axis D instead: the chain rule runs per order on its own slices.

Checkpoint slots: sequence s of a plain batch uses slots s * ceil(TT / CK) + c; a packed
sequence starting at t0 uses t0 // CK + s + c, which never overlap (C = TT // CK + S + 1 slots
suffice). Everything is in the accumulation type (fp32; fp64 for fp64 plans).
"""
from __future__ import annotations

from ....ir.orders import has_order_axis
from .common import Emitter, KernelSpec, i64

#: steps per checkpoint segment
CK = 16


def num_checkpoints(B: int, T: int, num_seqs: int, varlen: bool) -> int:
    """How many checkpoint slots (per direction) the functions index into."""
    if varlen:
        return T // CK + num_seqs + 1
    return max(B * ((T + CK - 1) // CK), 1)


class _BwdEmitter(Emitter):
    """An Emitter with the backward functions' headers."""

    def bwd_header(self, name: str, buffers: list[tuple[str, str, str]]):
        """buffers: (buffer name, shape text, dtype), after the inputs and cu_seqlens."""
        s, w = self.spec, self.w
        args = [f"{self.buf(i.name)}_h: T.handle" for i in self.program.inputs]
        if self.varlen:
            args.append("cu_h: T.handle")
        args += [f"{b}_h: T.handle" for b, _, _ in buffers] + self.grid_params()
        w("# from tvm.script import tirx as T", "@T.prim_func")
        w(f"def {name}({', '.join(args)}):")
        w.depth += 1
        w(f'T.func_attr({{"global_symbol": "{name}", "tirx.noalias": True}})')
        w("B = T.int64()", "TT = T.int64()")
        if self.varlen:
            w("S1 = T.int64()")
        for var in ("S", "C", "SH"):
            if any(var in shape.replace("(", " ").replace(",", " ").split()
                   for _, shape, _ in buffers):
                w(f"{var} = T.int64()")
        for inp, dt in zip(self.program.inputs, s.input_dtypes):
            buf = self.buf(inp.name)
            w(f'{buf} = T.match_buffer({buf}_h, {self.shape_of(inp.axes)}, "{dt}")')
        if self.varlen:
            w(f'cu = T.match_buffer(cu_h, (S1,), "{s.cu_dtype}")')
        for b, shape, dt in buffers:
            w(f'{b} = T.match_buffer({b}_h, {shape}, "{dt}")')

    def grad_shape(self, *tail: int) -> str:
        """A gradient buffer's shape, (B, TT, H, *tail), with a leading direction axis where
        inputs have the order axis k (each order's gradients stay apart)."""
        dims = ["B", "TT", i64(self.spec.H)] + [i64(d) for d in tail]
        if has_order_axis(self.program):
            dims.insert(0, i64(self.D))
        return f"({', '.join(dims)})"

    def grad_at(self, buf: str, idx: str) -> str:
        """The element `idx` (b, t, h, ...) of a gradient buffer in the current direction."""
        if has_order_axis(self.program):
            idx = f"{i64(self.order)}, {idx}"
        return f"{buf}[{idx}]"

    def state_shape(self) -> str:
        s = self.spec
        return f"({i64(self.D)}, S, {i64(s.H)}, {i64(s.N)}, {i64(s.P)})"

    def ck_slot(self, c: str) -> str:
        if self.varlen:
            return f"t0_ // {i64(CK)} + s_ + ({c})"
        return f"s_ * ((TT + {i64(CK - 1)}) // {i64(CK)}) + ({c})"

    def operands(self, t: str, names=("key", "value", "query", "decay")):
        """Evaluate operands at time t into kb/qb (n), vb (p), db (Nd, Pd) (serial loops:
        rendered expressions hold let bindings)."""
        w, r, s = self.w, self.program.recurrence, self.spec
        if "key" in names or "query" in names:
            with w.block(f"for n_ in range({i64(s.N)}):"):
                idx = self.index(t, n="n_")
                if "key" in names:
                    w(f"kb[n_] = {self.value_of(r.key.expr, idx)}")
                if "query" in names:
                    w(f"qb[n_] = {self.value_of(r.query.expr, idx)}")
        if "value" in names:
            with w.block(f"for p_ in range({i64(s.P)}):"):
                w(f"vb[p_] = {self.value_of(r.value.expr, self.index(t, p='p_'))}")
        if "decay" in names and r.decay is not None:
            with w.block(f"for n_ in range({i64(self.Nd)}):"):
                with w.block(f"for p_ in range({i64(self.Pd)}):"):
                    w(f"db[n_, p_] = {self.value_of(r.decay.expr, self.index(t, 'n_', 'p_'))}")

    def decay_at(self) -> str:
        dn = "n_" if self.Nd > 1 else "T.int64(0)"
        dp = "p_" if self.Pd > 1 else "T.int64(0)"
        return f"db[{dn}, {dp}]"


def render_ckpt(spec: KernelSpec, want_y: bool) -> str:
    e = _BwdEmitter(spec)
    w, r, s = e.w, e.program.recurrence, spec
    N, P = s.N, s.P
    bufs = []
    if e.plan.has_initial_state:
        bufs.append(("h0", e.state_shape(), s.h0_dtype))
    bufs.append(("ck", f"({i64(e.D)}, C, {i64(s.H)}, {i64(N)}, {i64(P)})", e.acc))
    if want_y:
        bufs.append(("yw", f"(B, TT, {i64(s.H)}, {i64(P)})", e.acc))
    e.bwd_header("ssmc_scan_bwd_ckpt", bufs)
    with e.tasks():
        e.alloc("st", (N, P))
        e.alloc("kb", (N,))
        e.alloc("vb", (P,))
        if want_y:
            e.alloc("qb", (N,))
            e.alloc("yb", (P,))
        if r.decay is not None:
            e.alloc("db", (e.Nd, e.Pd))
        for d_index, direction in e.orders():
            e.init_state("st", d_index)
            with w.block(f"for c_ in range((L_ + {i64(CK - 1)}) // {i64(CK)}):"):
                w(f"c0_ = c_ * {i64(CK)}", f"cl_ = T.min({i64(CK)}, L_ - c0_)")
                with w.block(f"for n_ in range({i64(N)}):"):
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"ck[{i64(d_index)}, {e.ck_slot('c_')}, h_, n_, p_] = st[n_, p_]")
                with w.block("for j_ in range(cl_):"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + j_')}")
                    e.operands("t_", ("key", "value", "decay") + (("query",) if want_y else ()))
                    if want_y:
                        with w.block(f"for p_ in range({i64(P)}):"):
                            w(f"yb[p_] = {e.renderer.const(0)}")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            decayed = f"{e.decay_at()} * st[n_, p_]" if r.decay is not None \
                                else "st[n_, p_]"
                            w(f"st[n_, p_] = {decayed} + kb[n_] * vb[p_]")
                            if want_y:
                                w("yb[p_] = yb[p_] + qb[n_] * st[n_, p_]")
                    if want_y:
                        with w.block(f"for p_ in range({i64(P)}):"):
                            w("yw[b_, t_, h_, p_] = yw[b_, t_, h_, p_] + yb[p_]")
    return e.finish()


def render_bwd(spec: KernelSpec) -> str:
    e = _BwdEmitter(spec)
    w, r, s = e.w, e.program.recurrence, spec
    N, P, Nd, Pd = s.N, s.P, e.Nd, e.Pd
    has_decay = r.decay is not None
    zero = e.renderer.const(0)
    acc = e.acc
    bufs = [("dy", f"(B, TT, {i64(s.H)}, {i64(P)})", acc),
            ("ck", f"({i64(e.D)}, C, {i64(s.H)}, {i64(N)}, {i64(P)})", acc),
            ("gT", e.state_shape(), acc),
            ("dq", e.grad_shape(N), acc), ("dk", e.grad_shape(N), acc),
            ("dv", e.grad_shape(P), acc)]
    if has_decay:
        bufs.append(("da", e.grad_shape(Nd, Pd), acc))
    if e.plan.has_initial_state:
        bufs.append(("dh0", e.state_shape(), acc))
    e.bwd_header("ssmc_scan_bwd", bufs)
    with e.tasks():
        e.alloc("st", (N, P))
        e.alloc("scr", (CK, N, P))
        e.alloc("dS", (N, P))
        e.alloc("kb", (N,))
        e.alloc("qb", (N,))
        e.alloc("vb", (P,))
        e.alloc("dyb", (P,))
        e.alloc("rq", (N,))
        e.alloc("rk", (N,))
        e.alloc("rv", (P,))
        if has_decay:
            e.alloc("db", (Nd, Pd))
            e.alloc("ra", (Nd, Pd))
        dn = "n_" if Nd > 1 else "T.int64(0)"
        dp = "p_" if Pd > 1 else "T.int64(0)"
        for d_index, direction in e.orders():
            with w.block(f"for n_ in range({i64(N)}):"):
                with w.block(f"for p_ in range({i64(P)}):"):
                    w(f"dS[n_, p_] = gT[{e.state_index(d_index)}]")
            w(f"nc_ = (L_ + {i64(CK - 1)}) // {i64(CK)}")
            with w.block("for cc_ in range(nc_):"):
                w("c_ = nc_ - T.int64(1) - cc_",
                  f"c0_ = c_ * {i64(CK)}", f"cl_ = T.min({i64(CK)}, L_ - c0_)")
                with w.block(f"for n_ in range({i64(N)}):"):
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"st[n_, p_] = ck[{i64(d_index)}, {e.ck_slot('c_')}, h_, n_, p_]")
                # recompute the segment: scr[j] = the state entering step c0 + j
                with w.block("for j_ in range(cl_):"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + j_')}")
                    e.operands("t_", ("key", "value", "decay"))
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w("scr[j_, n_, p_] = st[n_, p_]")
                            decayed = f"{e.decay_at()} * st[n_, p_]" if has_decay \
                                else "st[n_, p_]"
                            w(f"st[n_, p_] = {decayed} + kb[n_] * vb[p_]")
                # the reverse walk over the segment
                with w.block("for jj_ in range(cl_):"):
                    w("j_ = cl_ - T.int64(1) - jj_")
                    w(f"t_ = {e.time_of(direction, 'c0_ + j_')}")
                    e.operands("t_")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w("dyb[p_] = dy[b_, t_, h_, p_]", f"rv[p_] = {zero}")
                    if has_decay:
                        with w.block(f"for n_ in range({i64(Nd)}):"):
                            with w.block(f"for p_ in range({i64(Pd)}):"):
                                w(f"ra[n_, p_] = {zero}")
                    # S_t from S_{t-1}; dS_t += q_t dy_t^T
                    with w.block(f"for n_ in range({i64(N)}):"):
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            prev = "scr[j_, n_, p_]"
                            decayed = f"{e.decay_at()} * {prev}" if has_decay else prev
                            w(f"st[n_, p_] = {decayed} + kb[n_] * vb[p_]")
                            w("dS[n_, p_] = dS[n_, p_] + qb[n_] * dyb[p_]")
                    # reductions: dq, dk over p; dv over n; da over the decay's missing axes
                    with w.block(f"for n_ in range({i64(N)}):"):
                        w(f"rq[n_] = {zero}", f"rk[n_] = {zero}")
                        with w.block(f"for p_ in range({i64(P)}):"):
                            w("rq[n_] = rq[n_] + st[n_, p_] * dyb[p_]")
                            w("rk[n_] = rk[n_] + dS[n_, p_] * vb[p_]")
                            if has_decay:
                                w(f"ra[{dn}, {dp}] = ra[{dn}, {dp}] + dS[n_, p_] * "
                                  "scr[j_, n_, p_]")
                        with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                            w("rv[p_] = rv[p_] + dS[n_, p_] * kb[n_]")
                    with w.block(f"for n_ in range({i64(N)}):"):
                        for g, r_ in (("dq", "rq"), ("dk", "rk")):
                            at = e.grad_at(g, "b_, t_, h_, n_")
                            w(f"{at} = {at} + {r_}[n_]")
                    with w.block(f"for p_ in range({i64(P)}):"):
                        at = e.grad_at("dv", "b_, t_, h_, p_")
                        w(f"{at} = {at} + rv[p_]")
                    if has_decay:
                        with w.block(f"for n_ in range({i64(Nd)}):"):
                            with w.block(f"for p_ in range({i64(Pd)}):"):
                                at = e.grad_at("da", "b_, t_, h_, n_, p_")
                                w(f"{at} = {at} + ra[n_, p_]")
                        # dS_{t-1} (before its own q dy term) = a_t * dS_t
                        with w.block(f"for n_ in range({i64(N)}):"):
                            with w.block(f"for p_ in T.vectorized({i64(P)}):"):
                                w(f"dS[n_, p_] = {e.decay_at()} * dS[n_, p_]")
            if e.plan.has_initial_state:
                with w.block(f"for n_ in range({i64(N)}):"):
                    with w.block(f"for p_ in range({i64(P)}):"):
                        w(f"dh0[{e.state_index(d_index)}] = dS[n_, p_]")
    return e.finish()
