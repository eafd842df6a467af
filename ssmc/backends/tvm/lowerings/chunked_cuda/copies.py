"""Cooperative copies of operand tiles from global into shared memory, spread over a block's
threads: scalar, 16-byte vectors, and the value tile in 32-bit step pairs (plan.tile VT)."""
from __future__ import annotations

import sympy as sp

from ..common import i64
from .emitter import L, ChunkedCudaEmitter
from .tiles import BATCH, THREADS, VBATCH


class Copies(ChunkedCudaEmitter):
    """The copy helpers of the passes."""

    def coop(self, rows: int, cols: int, prelude, cond: str, values, targets: list[str]):
        """targets[k] at every (r_, c_) of a rows x cols tile = values()[k] where `cond` holds,
        zero elsewhere; spread over the block's threads. Two phases per batch of BATCH
        elements a thread: all loads into registers (independent, so they are in flight
        together), then the stores to shared memory. (One load-store pair per iteration left
        each iteration waiting for its load: ~40 us per chunk in the state pass.)
        `prelude()` emits index bindings from r_, c_; `values()` emits the statements under
        `cond` and returns the expressions (in the accumulation type)."""
        w = self.w
        regs = [f"lv{k}_" for k in range(len(targets))]

        def load(in_range: str):
            prelude()
            with w.block(f"if {in_range}{cond}:"):
                for reg, v in zip(regs, values()):
                    w(f"{reg}[u_] = {v}")
            with w.block("else:"):
                for reg in regs:
                    w(f"{reg}[u_] = {self.zero}")

        def store():
            for reg, tgt in zip(regs, targets):
                w(f"{tgt} = {self.cast_ot(reg + '[u_]')}")

        self.two_phase(rows * cols, self.t.LB, (f"r_ = ix_ // {cols}", f"c_ = ix_ % {cols}"),
                        load, store)

    def two_phase(self, total: int, cap: int, position: tuple, load, store):
        """The loop of the cooperative copies: `total` items spread over the block's threads,
        in batches of up to `cap` a thread (a divisor of the thread's item count); per batch
        all `load(in_range)` bodies first (independent, so they are in flight together; the
        item is at u_ of the batch, `position` binds r_, c_ from ix_, and `in_range` prefixes
        the load's condition where the last batch overhangs), then all `store()` bodies."""
        w = self.w
        nit = -(-total // THREADS)
        batch = max(b for b in range(1, min(nit, cap) + 1) if nit % b == 0)
        guard = total % THREADS != 0

        def index():
            w(f"ix_ = (bt_ * {batch} + u_) * {THREADS} + tx_", *position)

        with w.block(f"for bt_ in range({nit // batch}):"):
            with w.block(f"for u_ in T.unroll({batch}):"):
                index()
                load(f"ix_ < {total} and " if guard else "")
            with w.block(f"for u_ in T.unroll({batch}):"):
                index()
                if guard:
                    w.lines.append("    " * w.depth + f"if ix_ < {total}:")
                    w.depth += 1
                store()
                if guard:
                    w.depth -= 1

    def coop_regs(self):
        self.local("lv0_", self.t.LB, "float32")
        self.local("lv1_", self.t.LB, "float32")
        if self.t.VT:
            self.local("vp_", 2, self.t.OT)
        if self.t.VL > 1:
            self.local("vv0_", self.vbatch * 4, "uint32")
            self.local("vv1_", self.vbatch * 4, "uint32")

    @property
    def vbatch(self) -> int:
        return max(1, self.t.LB * VBATCH // BATCH)

    def words(self, name: str, buf: str, size: str, shared: bool = False):
        """`name`: buffer `buf` seen as flat 32-bit words (raw 16-byte copies: TVM's CUDA
        codegen has no vector stores of bf16 lanes)."""
        scope = ', scope="shared"' if shared else ""
        self.w(f'{name} = T.decl_buffer(({size},), "uint32", data={buf}.data{scope})')

    def coop_vec(self, rows: int, cols: int, prelude, cond: str, sources, targets):
        """Like `coop` for operands already in the operand type, 16 bytes (VL elements, 4 words)
        a copy: the VL elements from sources()[k] (an element reference at (r_, c_), c_ a
        multiple of VL, in a row contiguous over them) go to the word buffer targets[k][0] at
        word (targets[k][1]) // EW (a flat element offset); zero where `cond` fails (it must
        hold for all VL elements or none)."""
        w, VL = self.w, self.t.VL
        ew = 4 // self.t.esz
        cv = cols // VL
        regs = [f"vv{k}_" for k in range(len(targets))]

        def load(in_range: str):
            prelude()
            with w.block(f"if {in_range}{cond}:"):
                for k, (reg, ref) in enumerate(zip(regs, sources())):
                    # a 4-word view at the element (int64 offsets give no vector loads)
                    w(f"pv{k}_ = T.address_of({ref})",
                      f'pw{k}_ = T.decl_buffer((4,), "uint32", data=pv{k}_)')
                    with w.block("for v_ in T.vectorized(4):"):
                        w(f"{reg}[u_ * 4 + v_] = pw{k}_[v_]")
            with w.block("else:"):
                for reg in regs:
                    with w.block("for v_ in T.vectorized(4):"):
                        w(f"{reg}[u_ * 4 + v_] = T.uint32(0)")

        def store():
            for reg, (buf, off) in zip(regs, targets):
                with w.block("for v_ in T.vectorized(4):"):
                    w(f"{buf}[({off}) // {ew} + v_] = {reg}[u_ * 4 + v_]")

        self.two_phase(rows * cv, self.vbatch, (f"r_ = ix_ // {cv}", f"c_ = ix_ % {cv} * {VL}"),
                        load, store)

    def plain_operand(self, which: str) -> str | None:
        """The element reference (at t_, n_) of the input that the recurrence's `which`
        (key/query) reads as is, when it is stored in the operand type with n innermost (its
        rows are whole 16-byte vectors when VL divides N); else None."""
        if self.t.VL == 1:
            return None
        expr = getattr(self.program.recurrence, which).expr
        if not isinstance(expr, sp.Symbol):
            return None
        for inp, dt in zip(self.program.inputs, self.spec.input_dtypes):
            if inp.name == expr.name and dt == self.t.OT and inp.axes and inp.axes[-1] == "n":
                idx = self.index("t_", n="n_")
                return f"{self.buf(inp.name)}[{', '.join(idx[a] for a in inp.axes)}]"
        return None

    def load_value_t(self, direction, bp: int, pb: str, scale: str | None = None):
        """sVt[pp, j] = value at (step c0_ + j, channel pb * bp + pp), zero outside (times
        `scale`, an expression of the row r_ = j, where given)."""
        w, Q = self.w, self.t.Q

        def values():
            w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('r_'))}")
            if self.vsplit is not None:
                # the bare input times the row's scale (svs, log_decays)
                base = self.value_of(self.vsplit[0], self.index("t_", p="p_"))
                v = f"{base} * svs[r_]"
            else:
                with self.fast_math():
                    v = self.value_of(self.program.recurrence.value.expr,
                                      self.index("t_", p="p_"))
            return [v if scale is None else f"{v} * {scale}"]
        if self.t.VT:
            self.value_pairs(bp, pb, values)
            return
        self.coop(Q, bp, lambda: w(f"p_ = {pb} * {i64(bp)} + {L('c_')}"),
                  f"{L('r_')} < cl_ and p_ < {i64(self.spec.P)}", values, ["sVt[c_, r_]"])

    def value_pairs(self, bp: int, pb: str, values):
        """plan.tile VT: sVt[c_, r_ + k] = values() at row r_ + k (k = 0, 1; zero outside), a
        pair of steps of one channel a thread, stored as one 32-bit word (2 lanes of the
        operand type). Item ix_ = lane l of group g (32 items): channel g % (bp / 8) * 8 +
        l % 8, steps 2 (g // (bp / 8) * 4 + l // 8) and the next, so that a warp's words
        (channel rows (Q + 8) / 2 words apart, 4 mod 32) are in 32 distinct banks."""
        w, Q = self.w, self.t.Q
        ncb = bp // 8
        total = Q // 2 * bp  # a multiple of 64 (Q: of 16, bp: of 8): whole warps
        cond = f"p_ < {i64(self.spec.P)}"
        ot = self.t.OT

        def load(in_range: str):
            w(f"p_ = {pb} * {i64(bp)} + {L('c_')}")
            for k in range(2):
                with w.block(f"if {in_range}{L(f'r2_ + {k}')} < cl_ and {cond}:"):
                    w(f"r_ = r2_ + {k}")  # values() reads the row r_
                    w(f"lv{k}_[u_] = {values()[0]}")
                with w.block("else:"):
                    w(f"lv{k}_[u_] = {self.zero}")

        def store():
            w(f'vp_[0] = T.Cast("{ot}", lv0_[u_])', f'vp_[1] = T.Cast("{ot}", lv1_[u_])')
            with w.block("for v_ in T.vectorized(2):"):
                w("sVt[c_, r2_ + v_] = vp_[v_]")

        self.two_phase(total, self.t.LB,
                        (f"c_ = ix_ // 32 % {ncb} * 8 + ix_ % 8",
                         f"r2_ = (ix_ // 32 // {ncb} * 4 + ix_ % 32 // 8) * 2"), load, store)
