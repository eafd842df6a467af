"""The chunk pass, one block per (chunk, head, p-block, n-block), every chunk in parallel:
    dS_c = key^T @ (value * exp(l_last - lc))     (fp32 accumulators, stored into ws[slot])
    cd[slot, h] = l_last
with lc the running sum of log-decays within the chunk and l_last its last entry. The factor
exp(l_last - lc_j) is computed once per step j (beside the running sums) and applied to the
value tile. The key tile comes from 16-byte loads of its rows, two steps at a time packed into
32-bit words of the transposed tile (plan.tile KV, default on; KV=0: element by element). The
accumulators are staged through shared memory (over the key tile, free after the product) and
written to ws along n, its contiguous axis, with consecutive threads on consecutive 16-byte
vectors (single elements where N does not split into vectors): stored straight from the mma
layout, consecutive lanes wrote 2-byte entries N apart.
"""
from __future__ import annotations

from ..common import i64
from .emitter import L
from .slots import slot_task
from .tiles import THREADS, WARPS, stage_cols


def chunk_pass(e, d_index: int, direction):
    """Every chunk in parallel, one block per (slot, head, p-block, n-block):
    ws[slot] = dS = key^T @ (value * exp(l_last - lc)) (the chunk's own contribution to
    the state leaving it) and cd[slot, h] = l_last (the chunk's total log-decay). The
    accumulators go through shared memory (over the key tile) so that ws is written
    along n, its contiguous axis, in 16-byte vectors."""
    w, s, t = e.w, e.spec, e.t
    Q, NB, BPS = t.Q, t.NB, t.BPS
    nnb, npb = -(-s.N // NB), -(-s.P // BPS)
    e.mt_total = NB // 16
    mtw = -(-e.mt_total // WARPS)
    nt = BPS // 8
    SW = stage_cols(NB, t.esz)
    grid = f"NS * {i64(s.H * npb * nnb)}"
    with w.block(f'for bid_ in T.thread_binding({grid}, thread="blockIdx.x"):'):
        with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
            # the key tile, then (after the product) the staged dS tile sO[pp, nn]
            e.shared("sW_", (max(NB * (Q + t.pad), BPS * SW),), t.OT)
            w(f'sWt = T.decl_buffer(({NB}, {Q + t.pad}), "{t.OT}", data=sW_.data, '
              'scope="shared")',
              f'sO = T.decl_buffer(({BPS}, {SW}), "{t.OT}", data=sW_.data, '
              'scope="shared")')
            e.shared("sVt", (BPS, Q + t.pad), t.OT)
            if e.has_decay:
                e.shared("sld", (Q,), "float32")
                e.shared("slc", (Q,), "float32")
                e.shared("sfac", (Q,), "float32")
                e.local("run_", 2, "float32")
            if e.vsplit is not None:
                e.shared("svs", (Q,), "float32")
            e.local("acc", mtw * nt * 4, "float32")
            e.frag_locals(mtw)
            e.coop_regs()
            w(f"nb_ = bid_ % {i64(nnb)}", f"pb_ = bid_ // {i64(nnb)} % {i64(npb)}",
              f"h_ = bid_ // {i64(nnb * npb)} % {i64(s.H)}",
              f"slot_ = bid_ // {i64(nnb * npb * s.H)}")
            opened = slot_task(e)
            with w.block("if cl_ > T.int64(0):"):
                e.lanes()
                e.log_decays(direction, factors=True)
                if e.has_decay:
                    with w.block("if nb_ == T.int64(0) and pb_ == T.int64(0) and tx_ == 0:"):
                        w("cd[slot_, h_] = slc[cl_ - T.int64(1)]")

                # sWt[nn, j] = key(c0_ + j, nb_ * NB + nn)
                key_ref = e.plain_operand("key") if t.KV else None
                if key_ref is not None:
                    _key_pairs(e, direction, key_ref, SW)
                else:
                    def key_values():
                        w(f"t_ = {e.time_of(direction, 'c0_ + ' + L('r_'))}")
                        with e.fast_math():
                            return [e.value_of(e.program.recurrence.key.expr,
                                                  e.index("t_", n="n_"))]
                    e.coop(Q, NB, lambda: w(f"n_ = nb_ * {i64(NB)} + {L('c_')}"),
                              f"{L('r_')} < cl_ and n_ < {i64(s.N)}", key_values,
                              ["sWt[c_, r_]"])
                # sVt[pp, j] = value(c0_ + j, pb_ * BPS + pp) * exp(l_last - lc_j): the
                # decay factor of a step on the smaller operand tile, computed once a step
                e.load_value_t(direction, BPS, "pb_",
                                  "sfac[r_]" if e.has_decay else None)
                e.sync()
                with w.block(f"for u_ in T.unroll({mtw * nt * 4}):"):
                    w(f"acc[u_] = {e.zero}")
                e.mm("acc", mtw, nt, lambda r, k: f"sWt[{r}, {k}]",
                        lambda c, k: f"sVt[{c}, {k}]", Q)
                _stage_store_ws(e, mtw, nt, SW)
            w.depth -= opened


def _key_pairs(e, direction, ref: str, SW: int):
    """sWt[nn, j] = key(c0_ + j, nb_ * NB + nn) (KV; zero outside), from 16-byte loads of
    the key rows: an item is a pair of steps (2 r_, 2 r_ + 1) and VL entries from n
    offset c_; consecutive threads take consecutive pairs. Entry k of the two rows makes
    the 32-bit word (low half: step 2 r_, as the fragment loads read it) at sWt[c_ + k,
    2 r_]. `ref`: the key element at (t_, n_)."""
    w, s, t = e.w, e.spec, e.t
    Q, NB, VL = t.Q, t.NB, t.VL
    half, cv = Q // 2, NB // VL
    e.words("wd_sWt", "sW_", f"{max(NB * (Q + t.pad), t.BPS * SW) // 2}", shared=True)

    def load(in_range: str):
        w(f"n_ = nb_ * {i64(NB)} + {L('c_')}")
        for k, row in enumerate(("r_ * 2", "r_ * 2 + 1")):
            with w.block(f"if {in_range}{L(row)} < cl_ and n_ < {i64(s.N)}:"):
                w(f"t_ = {e.time_of(direction, 'c0_ + ' + L(row))}",
                  f"pv{k}_ = T.address_of({ref})",
                  f'pw{k}_ = T.decl_buffer((4,), "uint32", data=pv{k}_)')
                with w.block("for v_ in T.vectorized(4):"):
                    w(f"vv{k}_[u_ * 4 + v_] = pw{k}_[v_]")
            with w.block("else:"):
                with w.block("for v_ in T.vectorized(4):"):
                    w(f"vv{k}_[u_ * 4 + v_] = T.uint32(0)")

    def store():
        with w.block(f"for k_ in T.unroll({VL}):"):
            w("sh_ = T.Cast(\"uint32\", k_ % 2 * 16)",
              "e0_ = T.bitwise_and(T.shift_right(vv0_[u_ * 4 + k_ // 2], sh_), "
              "T.uint32(65535))",
              "e1_ = T.bitwise_and(T.shift_right(vv1_[u_ * 4 + k_ // 2], sh_), "
              "T.uint32(65535))",
              f"wd_sWt[((c_ + k_) * {Q + t.pad} + r_ * 2) // 2] = "
              "T.bitwise_or(e0_, T.shift_left(e1_, T.uint32(16)))")

    e.two_phase(half * cv, e.vbatch, (f"r_ = ix_ % {half}", f"c_ = ix_ // {half} * {VL}"),
                    load, store)


def _stage_store_ws(e, mtw: int, nt: int, SW: int):
    """The chunk pass's store: the accumulators (rows nn, columns pp of the block's tile)
    into sO[pp, nn] over the key tile, then ws[slot_, h_, p, n] from sO with consecutive
    threads on consecutive n: 16-byte vectors (16 / esz elements) where N splits into
    them, else single elements."""
    w, s, t = e.w, e.spec, e.t
    NB, BPS = t.NB, t.BPS
    e.sync()  # every warp's reads of the key tile
    depth = e.each_acc(mtw, nt)
    with w.block(f"if {e.mtile_valid('i_')}:"):
        w(f"sO[col_, row_] = {e.cast_ot('acc[k_acc_]')}")
    w.depth -= depth
    e.sync()
    ve = 16 // t.esz
    vec = s.N % ve == 0
    per = ve if vec else 1          # elements per store
    cols = NB // per                # stores per row of the tile
    total = BPS * cols
    nit = -(-total // THREADS)
    guard = f"ix_ < {total} and " if total % THREADS else ""
    loop = f"T.unroll({nit})" if nit <= 16 else f"range({nit})"
    if vec:
        ew = 4 // t.esz
        e.words("wd_sO", "sW_", f"{max(NB * (t.Q + t.pad), BPS * SW) // ew}",
                   shared=True)
    with w.block(f"for it_ in {loop}:"):
        w(f"ix_ = it_ * {THREADS} + tx_", f"r_ = ix_ // {cols}", f"c_ = ix_ % {cols} * {per}",
          f"n_ = nb_ * {i64(NB)} + {L('c_')}", f"p_ = pb_ * {i64(BPS)} + {L('r_')}")
        with w.block(f"if {guard}n_ < {i64(s.N)} and p_ < {i64(s.P)}:"):
            if vec:
                # a 4-word view of ws at the element (the whole vector is inside: N and
                # c_ are multiples of its length)
                # (4-word views at both ends: TVM gathers a vector load from a buffer
                # at an offset it cannot prove aligned)
                w("pv_ = T.address_of(ws[slot_, h_, p_, n_])",
                  'pw_ = T.decl_buffer((4,), "uint32", data=pv_)',
                  f"qv_ = T.address_of(wd_sO[(r_ * {SW} + c_) // {ew}])",
                  'qw_ = T.decl_buffer((4,), "uint32", data=qv_, scope="shared")')
                with w.block("for v_ in T.vectorized(4):"):
                    w("pw_[v_] = qw_[v_]")
            else:
                w("ws[slot_, h_, p_, n_] = sO[r_, c_]")
