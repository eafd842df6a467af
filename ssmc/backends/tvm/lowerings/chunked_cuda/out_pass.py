"""The output pass, one block per (chunk, head, p-block), every chunk in parallel:
    G = (query @ key^T) * exp(lc_i - lc_j) on the causal half (zero elsewhere)
    y = exp(lc_i) * (query @ state_in) + G @ value,  then the epilogue and the store.
On tensor cores G never leaves registers: the accumulator layout of two m16n8 tiles is the
A-operand layout of one m16k16 tile, so G is re-used as the next product's operand. The running
sums lc come from a fixed-count (unrolled) loop over the chunk's log-decays. plan.tile SP
(where the state product takes the whole key dim at once): the state tile's 16-byte loads go
into registers before the query-key product and into shared memory after it, so that they are
in flight during it (more registers a thread).
"""
from __future__ import annotations

from ..common import i64
from .emitter import L
from .slots import slot_task
from .tiles import THREADS, WARPS


def out_pass(e, d_index: int, direction):
    """The output pass of one direction: y (after the epilogue) of every chunk, from the
    state entering it (ws[slot], left by the sequential pass) and the chunk's own steps."""
    w, s, t = e.w, e.spec, e.t
    Q, BP, KC, NP = t.Q, t.BP, t.KC, t.NP
    npb = -(-s.P // BP)
    nkc = NP // KC
    e.mt_total = Q // 16
    mtw = -(-e.mt_total // WARPS)
    ntg, nty = Q // 8, BP // 8
    with w.block(f'for bid_ in T.thread_binding(NS * {i64(s.H * npb)}, '
                 'thread="blockIdx.x"):'):
        with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
            e.shared("sC", (Q, KC + t.pad), t.OT)
            e.shared("sK", (max(Q, BP), KC + t.pad), t.OT)
            if t.VS:
                w(f'sVt = T.decl_buffer(({BP}, {Q + t.pad}), "{t.OT}", data=sK.data, '
                  'scope="shared")')
            else:
                e.shared("sVt", (BP, Q + t.pad), t.OT)
            if not t.mma:
                e.shared("sG", (Q, Q + 1), "float32")
            if e.has_decay:
                e.shared("sld", (Q,), "float32")
                e.shared("slc", (Q,), "float32")
                e.local("run_", 1, "float32")
            if e.vsplit is not None:
                e.shared("svs", (Q,), "float32")
            if t.VL > 1:
                ew = 4 // t.esz
                e.words("wd_sC", "sC", f"{Q * (KC + t.pad) // ew}", shared=True)
                e.words("wd_sK", "sK", f"{max(Q, BP) * (KC + t.pad) // ew}", shared=True)
            e.local("accG", mtw * ntg * 4, "float32")
            e.local("accY", mtw * nty * 4, "float32")
            e.frag_locals(mtw)
            if t.GF:
                for i in range(mtw):
                    for ks in range(Q // 16):
                        e.local(f"gf{i}_{ks}", 8, t.OT)
            if t.EP:
                # y staged in fp32 over sC (free after the state product), EPC channels
                # a round, rows padded by 4 words
                epc = _ep_cols(Q, BP, Q * (KC + t.pad) * t.esz)
                w(f'sY = T.decl_buffer(({Q}, {epc + 4}), "float32", data=sC.data, '
                  'scope="shared")')
            e.coop_regs()
            if t.SP:
                e.local("spv_", _sp_items(e) * 4, "uint32")
            w(f"pb_ = bid_ % {i64(npb)}", f"h_ = bid_ // {i64(npb)} % {i64(s.H)}",
              f"slot_ = bid_ // {i64(npb * s.H)}")
            opened = slot_task(e)
            with w.block("if cl_ > T.int64(0):"):
                e.lanes()
                e.log_decays(direction)
                if not t.VS:
                    e.load_value_t(direction, BP, "pb_")

                def load_query(with_key: bool):
                    plain = [e.plain_operand("query")] + \
                        ([e.plain_operand("key")] if with_key else [])
                    if all(plain):
                        def sources():
                            w(f"t_ = {e.time_of(direction, 'c0_ + ' + L('r_'))}")
                            return plain
                        row = f"r_ * {KC + t.pad} + c_"
                        e.coop_vec(Q, KC, lambda: w(f"n_ = kc_ * {i64(KC)} + {L('c_')}"),
                                      f"{L('r_')} < cl_ and n_ < {i64(s.N)}", sources,
                                      [("wd_sC", row)] +
                                      ([("wd_sK", row)] if with_key else []))
                        return

                    def values():
                        w(f"t_ = {e.time_of(direction, 'c0_ + ' + L('r_'))}")
                        idx = e.index("t_", n="n_")
                        with e.fast_math():
                            out = [e.value_of(e.program.recurrence.query.expr, idx)]
                            if with_key:
                                out.append(e.value_of(e.program.recurrence.key.expr,
                                                         idx))
                        return out
                    e.coop(Q, KC, lambda: w(f"n_ = kc_ * {i64(KC)} + {L('c_')}"),
                              f"{L('r_')} < cl_ and n_ < {i64(s.N)}", values,
                              ["sC[r_, c_]"] + (["sK[r_, c_]"] if with_key else []))

                # G = query @ key^T over the key dim, KC at a time
                with w.block(f"for u_ in T.unroll({mtw * ntg * 4}):"):
                    w(f"accG[u_] = {e.zero}")
                with w.block(f"for kc_ in range({nkc}):"):
                    load_query(True)
                    if t.SP:
                        _state_prefetch(e, load=True)
                    e.sync()
                    e.mm("accG", mtw, ntg, lambda r, k: f"sC[{r}, {k}]",
                            lambda c, k: f"sK[{c}, {k}]", KC,
                            skip=lambda m0, j: f"{j} * 8 > {m0} + 15")
                    e.sync()
                # causal mask and decay
                depth = e.each_acc(mtw, ntg)
                g = "accG[k_acc_]"
                if e.has_decay:
                    g = f"{g} * {e.exp('slc[row_] - slc[col_]')}"
                w(f"accG[k_acc_] = T.if_then_else(col_ <= row_, {g}, {e.zero})")
                if not t.mma:
                    w("sG[row_, col_] = accG[k_acc_]")
                w.depth -= depth
                if t.GF:
                    # G as the A operands of y += G @ value, in the operand type (half the
                    # registers of the fp32 accumulators, which die here)
                    for i in range(mtw):
                        for ks in range(Q // 16):
                            with w.block("for h2_ in T.unroll(2):"):
                                with w.block("for e_ in T.unroll(4):"):
                                    w(f"gf{i}_{ks}[h2_ * 4 + e_] = " + e.cast_ot(
                                        f"accG[({i} * {ntg} + {ks * 2} + h2_) * 4 + e_]"))
                # y = exp(lc) * (query @ state_in)
                with w.block(f"for u_ in T.unroll({mtw * nty * 4}):"):
                    w(f"accY[u_] = {e.zero}")
                with w.block(f"for kc_ in range({nkc}):"):
                    if nkc > 1:
                        load_query(False)

                    def ws_at():
                        w(f"n_ = kc_ * {i64(KC)} + {L('c_')}",
                          f"p_ = pb_ * {i64(BP)} + {L('r_')}")
                    if t.SP:
                        _state_prefetch(e, load=False)
                    elif t.VL > 1:
                        e.coop_vec(BP, KC, ws_at, f"n_ < {i64(s.N)} and p_ < {i64(s.P)}",
                                      lambda: ["ws[slot_, h_, p_, n_]"],
                                      [("wd_sK", f"r_ * {KC + t.pad} + c_")])
                    else:
                        ws_v = "ws[slot_, h_, p_, n_]"
                        if t.OT != e.acc:
                            ws_v = f'T.Cast("{e.acc}", {ws_v})'
                        e.coop(BP, KC, ws_at, f"n_ < {i64(s.N)} and p_ < {i64(s.P)}",
                                  lambda: [ws_v], ["sK[r_, c_]"])
                    e.sync()
                    e.mm("accY", mtw, nty, lambda r, k: f"sC[{r}, {k}]",
                            lambda c, k: f"sK[{c}, {k}]", KC)
                    e.sync()
                if e.has_decay:
                    depth = e.each_acc(mtw, nty)
                    w(f"accY[k_acc_] = accY[k_acc_] * {e.exp('slc[row_]')}")
                    w.depth -= depth
                if t.VS:
                    # the value tile into sK's space (free after the state product)
                    e.load_value_t(direction, BP, "pb_")
                    e.sync()
                # y += G @ value
                if t.mma and t.GF:
                    for ks in range(Q // 16):
                        with w.block(f"for j_ in T.unroll({nty}):"):
                            e.b_frag(lambda r, c: f"sVt[{r}, {c}]",
                                        lambda dk, ks=ks: f"{ks * 16 + dk}")
                            for i in range(mtw):
                                w(f"m0_ = {e.mtile(i)}")
                                with w.block(f"if {ks * 16} <= m0_:"):
                                    w(e.mma_call(f"gf{i}_{ks}", "accY",
                                                    f"({i} * {nty} + j_) * 4"))
                elif t.mma:
                    with w.block(f"for ks_ in T.unroll({Q // 16}):"):
                        for i in range(mtw):
                            with w.block("for h2_ in T.unroll(2):"):
                                with w.block("for e_ in T.unroll(4):"):
                                    w(f"af{i}[h2_ * 4 + e_] = " + e.cast_ot(
                                        f"accG[({i} * {ntg} + ks_ * 2 + h2_) * 4 + e_]"))
                        with w.block(f"for j_ in T.unroll({nty}):"):
                            e.b_frag(lambda r, c: f"sVt[{r}, {c}]",
                                        lambda dk: f"ks_ * 16 + {dk}")
                            for i in range(mtw):
                                w(f"m0_ = {e.mtile(i)}")
                                with w.block("if ks_ * 16 <= m0_:"):
                                    w(e.mma_call(f"af{i}", "accY",
                                                    f"({i} * {nty} + j_) * 4"))
                else:
                    e.sync()
                    e.mm("accY", mtw, nty, lambda r, k: f"sG[{r}, {k}]",
                            lambda c, k: f"sVt[{c}, {k}]", Q)
                # epilogue and store
                if t.EP:
                    _staged_epilogue(e, d_index, direction, mtw, nty, epc)
                else:
                    depth = e.each_acc(mtw, nty)
                    w(f"p_ = pb_ * {i64(BP)} + {L('col_')}")
                    with w.block(f"if {e.mtile_valid('i_')} and {L('row_')} < cl_ and "
                                 f"p_ < {i64(s.P)}:"):
                        w(f"t_ = {e.time_of(direction, 'c0_ + ' + L('row_'))}")
                        with e.fast_math():
                            e.emit_y(d_index, "t_", "accY[k_acc_]")
                    w.depth -= depth
            w.depth -= opened


def _ep_cols(Q: int, BP: int, nbytes: int) -> int:
    """Channels a round of the staged epilogue: the largest multiple of 8 dividing BP whose
    Q x (EPC + 4) fp32 tile fits in `nbytes`."""
    return max(c for c in range(8, BP + 1, 8) if BP % c == 0 and Q * (c + 4) * 4 <= nbytes)


def _staged_epilogue(e, d_index: int, direction, mtw: int, nty: int, epc: int):
    """y through shared memory (sY over sC), EPC channels a round: the warps store their
    accumulators, then consecutive threads take consecutive channels of a row, so that the
    epilogue's loads (x, z, ...) and the output's stores are coalesced."""
    w, s, t = e.w, e.spec, e.t
    Q, BP = t.Q, t.BP
    total = Q * epc
    nit = -(-total // THREADS)
    unroll = max(b for b in range(1, min(nit, 8) + 1) if nit % b == 0)
    for rnd in range(BP // epc):
        if rnd:
            e.sync()  # the previous round's reads
        depth = e.each_acc(mtw, nty)
        with w.block(f"if {e.mtile_valid('i_')} and j_ // {epc // 8} == {rnd}:"):
            w(f"sY[row_, col_ - {rnd * epc}] = accY[k_acc_]")
        w.depth -= depth
        e.sync()
        with w.block(f"for it_ in range({nit // unroll}):"):
            with w.block(f"for u_ in T.unroll({unroll}):"):
                w(f"ix_ = (it_ * {unroll} + u_) * {THREADS} + tx_",
                  f"row_ = ix_ // {epc}", f"col_ = ix_ % {epc}",
                  f"p_ = pb_ * {i64(BP)} + {i64(rnd * epc)} + {L('col_')}")
                guard = f"ix_ < {total} and " if total % THREADS else ""
                with w.block(f"if {guard}{L('row_')} < cl_ and p_ < {i64(s.P)}:"):
                    w(f"t_ = {e.time_of(direction, 'c0_ + ' + L('row_'))}")
                    with e.fast_math():
                        e.emit_y(d_index, "t_", "sY[row_, col_]")


def _sp_items(e) -> int:
    """16-byte vectors of the state tile (BP x KC) a thread (plan.tile SP)."""
    t = e.t
    return -(-(t.BP * (t.KC // t.VL)) // THREADS)


def _state_prefetch(e, load: bool):
    """plan.tile SP (KC = NP: the whole state tile at once): with `load`, the state tile's
    16-byte vectors into the registers spv_ (issued before the query-key product, so that
    they are in flight during it); else from spv_ into sK (after that product's last
    reads of sK). Item ix_ = u_ * THREADS + tx_ is row r_ (channel pb_ * BP + r_) and
    entries c_ .. c_ + VL - 1 of the key dim; consecutive threads on consecutive
    vectors of a row. Zero where the channel or the key entry is out of range."""
    w, s, t = e.w, e.spec, e.t
    BP, KC, VL = t.BP, t.KC, t.VL
    cv = KC // VL
    total = BP * cv
    ew = 4 // t.esz
    guard = total % THREADS != 0
    with w.block(f"for u_ in T.unroll({_sp_items(e)}):"):
        w(f"ix_ = u_ * {THREADS} + tx_", f"r_ = ix_ // {cv}", f"c_ = ix_ % {cv} * {VL}")
        if load:
            w(f"n_ = {L('c_')}", f"p_ = pb_ * {i64(BP)} + {L('r_')}")
            cond = ("ix_ < " + str(total) + " and " if guard else "") + \
                f"n_ < {i64(s.N)} and p_ < {i64(s.P)}"
            with w.block(f"if {cond}:"):
                w("pv0_ = T.address_of(ws[slot_, h_, p_, n_])",
                  'pw0_ = T.decl_buffer((4,), "uint32", data=pv0_)')
                with w.block("for v_ in T.vectorized(4):"):
                    w("spv_[u_ * 4 + v_] = pw0_[v_]")
            with w.block("else:"):
                with w.block("for v_ in T.vectorized(4):"):
                    w("spv_[u_ * 4 + v_] = T.uint32(0)")
        else:
            if guard:
                w.lines.append("    " * w.depth + f"if ix_ < {total}:")
                w.depth += 1
            with w.block("for v_ in T.vectorized(4):"):
                w(f"wd_sK[(r_ * {KC + t.pad} + c_) // {ew} + v_] = spv_[u_ * 4 + v_]")
            if guard:
                w.depth -= 1
