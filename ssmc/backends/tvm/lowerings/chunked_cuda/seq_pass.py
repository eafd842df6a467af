"""The sequential pass, SV 16-byte vectors of the n x p state of a (sequence, head) a thread
(plan.tile SV, default SEQ_V; SV=0, or a state that does not split into vectors: SEQ_E scalar
entries a thread):
    per chunk in traversal order, in fp32 registers,
        dS = ws[slot];  ws[slot] = S (the state entering the chunk);  S = exp(l_last) * S + dS
starting from the initial state (or zero); the final state is written in fp32. Pure bandwidth:
no matrix product waits on the serial chain (the previous single state pass loaded and
multiplied every chunk inside it: ~33 us a chunk step on an H100); a thread's loads of a chunk
are issued together, consecutive threads on consecutive vectors. The decay factors
exp(l_last - lc) and exp(l_last) have exponents <= 0 for decays <= 1.
dS is stored in the operand type, like the entering states (bf16/fp16: one rounding per chunk
contribution, ~2^-9 relative; the running sum S stays fp32).
"""
from __future__ import annotations

from ..common import i64
from .emitter import L
from .slots import seq_bounds, slot_base
from .tiles import SEQ_E, THREADS


def seq_pass(e, d_index: int, direction):
    """The serial part, elementwise: every thread owns entries of the (p, n) state of a
    (sequence, head) in fp32 registers; per chunk, in traversal order,
        dS = ws[slot];  ws[slot] = state (entering the chunk);  state = exp(l_last) * state + dS
    (exp(l_last) <= 1 for decays <= 1: no overflow). Pure bandwidth: a thread's SV
    16-byte vectors of a chunk are loaded together (independent loads in flight), and
    consecutive threads take consecutive vectors (coalesced). With SV=0, or where the
    state does not split into whole vectors, one scalar entry at a time."""
    s, t = e.spec, e.t
    if not t.SV or (s.P * s.N) % (16 // t.esz):
        return _seq_pass_scalar(e, d_index, direction)
    w = e.w
    Q, SV, VE = t.Q, t.SV, 16 // t.esz   # vectors a thread, entries a vector
    E = SV * VE
    PN = s.P * s.N
    nblk = -(-PN // (THREADS * E))
    guard = PN % (THREADS * E) != 0
    nseq = "(S1 - T.int64(1))" if e.varlen else "B"
    with w.block(f'for bid_ in T.thread_binding({nseq} * {i64(s.H * nblk)}, '
                 'thread="blockIdx.x"):'):
        with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
            e.local("st_", E, "float32")
            # a chunk's entries in the operand type, seen as 4 words a vector
            e.local("dv_", E, t.OT)
            w(f'dw_ = T.decl_buffer(({SV * 4},), "uint32", data=dv_.data, scope="local")')
            w(f"eb_ = bid_ % {i64(nblk)}", f"h_ = bid_ // {i64(nblk)} % {i64(s.H)}",
              f"s_ = bid_ // {i64(nblk * s.H)}")
            seq_bounds(e)
            w(f"base_ = {slot_base(e)}")

            def vector(body):
                """Per vector v_ of the thread: e_ = its first entry (flat p * N + n),
                under `if e_ < PN` where the last block overhangs."""
                with w.block(f"for v_ in T.unroll({SV}):"):
                    w(f"e_ = ((eb_ * {i64(SV)} + {L('v_')}) * {i64(THREADS)} + "
                      f"{L('tx_')}) * {i64(VE)}")
                    if guard:
                        with w.block(f"if e_ < {i64(PN)}:"):
                            body()
                    else:
                        body()

            def init():
                with w.block(f"for k_ in T.unroll({VE}):"):
                    if e.plan.has_initial_state:
                        w(f"p_ = (e_ + {L('k_')}) // {i64(s.N)}",
                          f"n_ = (e_ + {L('k_')}) % {i64(s.N)}")
                        w(f"st_[v_ * {VE} + k_] = {e.load_h0(d_index)}")
                    else:
                        w(f"st_[v_ * {VE} + k_] = {e.zero}")
            vector(init)
            # ws as one flat array (vectors never straddle a slot: PN splits into them)
            w(f'wsf = T.decl_buffer((NS * {i64(s.H * PN)},), "{t.OT}", data=ws.data)')

            def view():
                w(f"pv_ = T.address_of(wsf[(slot_ * {i64(s.H)} + h_) * {i64(PN)} + e_])",
                  'pw_ = T.decl_buffer((4,), "uint32", data=pv_)')

            def load():
                view()
                with w.block("for q_ in T.vectorized(4):"):
                    w("dw_[v_ * 4 + q_] = pw_[q_]")

            def update():
                view()
                with w.block(f"for k_ in T.unroll({VE}):"):
                    w(f"i_ = v_ * {VE} + k_")
                    dv = "dv_[i_]" if t.OT == e.acc else f'T.Cast("{e.acc}", dv_[i_])'
                    w(f"d_ = {dv}", f"dv_[i_] = {e.cast_ot('st_[i_]')}")
                    upd = "f_ * st_[i_]" if e.has_decay else "st_[i_]"
                    w(f"st_[i_] = {upd} + d_")
                with w.block("for q_ in T.vectorized(4):"):
                    w("pw_[q_] = dw_[v_ * 4 + q_]")

            with w.block(f"for ch_ in range((L_ + {i64(Q - 1)}) // {i64(Q)}):"):
                w("slot_ = base_ + ch_")
                if e.has_decay:
                    w("f_ = T.exp(cd[slot_, h_])")
                vector(load)      # all of the chunk's loads first: in flight together
                vector(update)
            if e.plan.return_final_state:
                def final():
                    with w.block(f"for k_ in T.unroll({VE}):"):
                        w(f"p_ = (e_ + {L('k_')}) // {i64(s.N)}",
                          f"n_ = (e_ + {L('k_')}) % {i64(s.N)}")
                        w(f"hT[{e.state_index(d_index)}] = st_[v_ * {VE} + k_]")
                vector(final)


def _seq_pass_scalar(e, d_index: int, direction):
    """The serial part, elementwise: one thread per SEQ_E entries of the (p, n) state of a
    (sequence, head), in fp32 registers; per chunk, in traversal order,
        dS = ws[slot];  ws[slot] = state (entering the chunk);  state = exp(l_last) * state + dS
    (exp(l_last) <= 1 for decays <= 1: no overflow). Consecutive threads take consecutive
    entries (coalesced); the SEQ_E loads of a chunk are independent, issued together."""
    w, s, t = e.w, e.spec, e.t
    Q, E = t.Q, SEQ_E
    PN = s.P * s.N
    nblk = -(-PN // (THREADS * E))
    nseq = "(S1 - T.int64(1))" if e.varlen else "B"
    with w.block(f'for bid_ in T.thread_binding({nseq} * {i64(s.H * nblk)}, '
                 'thread="blockIdx.x"):'):
        with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
            e.local("st_", E, "float32")
            e.local("dv_", E, "float32")
            w(f"eb_ = bid_ % {i64(nblk)}", f"h_ = bid_ // {i64(nblk)} % {i64(s.H)}",
              f"s_ = bid_ // {i64(nblk * s.H)}")
            seq_bounds(e)
            w(f"base_ = {slot_base(e)}")

            def entry():
                w(f"e_ = (eb_ * {i64(E)} + {L('u_')}) * {i64(THREADS)} + {L('tx_')}",
                  f"p_ = e_ // {i64(s.N)}", f"n_ = e_ % {i64(s.N)}")
                return f"e_ < {i64(PN)}"

            with w.block(f"for u_ in T.unroll({E}):"):
                ok = entry()
                if e.plan.has_initial_state:
                    with w.block(f"if {ok}:"):
                        w(f"st_[u_] = {e.load_h0(d_index)}")
                    with w.block("else:"):
                        w(f"st_[u_] = {e.zero}")
                else:
                    w(f"st_[u_] = {e.zero}")
            # ws as one flat array: the E entries of a thread are at one base address plus
            # constant offsets (few registers, more threads per SM to keep loads in flight)
            w(f'wsf = T.decl_buffer((NS * {i64(s.H * PN)},), "{t.OT}", data=ws.data)')
            guard = PN % (THREADS * E) != 0

            def flat():
                w(f"e_ = (eb_ * {i64(E)} + {L('u_')}) * {i64(THREADS)} + {L('tx_')}",
                  f"o_ = (slot_ * {i64(s.H)} + h_) * {i64(PN)} + e_")
                if guard:
                    w.lines.append("    " * w.depth + f"if e_ < {i64(PN)}:")
                    w.depth += 1
                return int(guard)

            with w.block(f"for ch_ in range((L_ + {i64(Q - 1)}) // {i64(Q)}):"):
                w("slot_ = base_ + ch_")
                if e.has_decay:
                    w("f_ = T.exp(cd[slot_, h_])")
                with w.block(f"for u_ in T.unroll({E}):"):
                    opened = flat()
                    v = "wsf[o_]"
                    if t.OT != e.acc:
                        v = f'T.Cast("{e.acc}", {v})'
                    w(f"dv_[u_] = {v}")
                    w.depth -= opened
                with w.block(f"for u_ in T.unroll({E}):"):
                    opened = flat()
                    w(f"wsf[o_] = {e.cast_ot('st_[u_]')}")
                    upd = "f_ * st_[u_]" if e.has_decay else "st_[u_]"
                    w(f"st_[u_] = {upd} + dv_[u_]")
                    w.depth -= opened
            if e.plan.return_final_state:
                with w.block(f"for u_ in T.unroll({E}):"):
                    with w.block(f"if {entry()}:"):
                        w(f"hT[{e.state_index(d_index)}] = st_[u_]")
