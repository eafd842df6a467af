"""Warp-level matrix products over shared-memory tiles: `mma.sync` m16n8k16 through
`T.ptx_legacy.mma` (bf16/fp16) or tiled fp32 FMAs, and the accumulator layout they share.

Warp w of the 4 owns the m16 row tiles w, w + 4, ... of each product; in a tile, lane l holds
rows l // 4 and l // 4 + 8, columns 2 (l % 4) and 2 (l % 4) + 1 of every n8 column tile (the
mma accumulator layout; the fp32 path uses the same ownership)."""
from __future__ import annotations

from .emitter import ChunkedCudaEmitter
from .tiles import MMA_DTYPES, WARPS


class Mma(ChunkedCudaEmitter):
    """The product helpers of the passes. A pass sets `mt_total` (the m16 row tiles of its
    block's product) before using them."""

    mt_total: int

    def mtile(self, i: str) -> str:
        """Row offset of warp wp_'s i-th m16 tile (clamped into the tile: idle warps compute
        on valid rows and store nothing)."""
        return f"T.min(wp_ + {WARPS} * {i}, {self.mt_total - 1}) * 16"

    def mtile_valid(self, i: str) -> str:
        return f"wp_ + {WARPS} * {i} < {self.mt_total}"

    def b_frag(self, b, k0):
        """`bf`, the mma B fragment of column tile j_: lane (g, tg) holds B[j_ * 8 + g,
        k0(dk) + 2 tg + v] for dk = 0, 8 and v = 0, 1; b(row, col) gives the shared load."""
        for h, dk in enumerate((0, 8)):
            with self.w.block("for v_ in T.vectorized(2):"):
                self.w(f"bf[{2 * h} + v_] = {b('j_ * 8 + g_', f'{k0(dk)} + tg_ * 2 + v_')}")

    def mm(self, acc: str, mtw: int, nt: int, a, b, K: int, skip=None):
        """acc[(i * nt + j) * 4 + r * 2 + c] += sum_k A[m0_i + g + 8r, k] * B[j * 8 + 2 tg + c, k]
        for k in [0, K): a(row, k) and b(col, k) give shared-memory loads. `skip(m0, j)`: a
        condition under which tile (i, j) is known to stay zero."""
        w = self.w
        if self.t.mma:
            # one fragment buffer per m-tile, always passed at offset 0: TVM stores a buffer
            # read in vectorised pairs as bf16x2/half2 lanes, and the mma's operand offset is
            # then not scaled to those lanes
            with w.block(f"for ks_ in T.unroll({K // 16}):"):
                for i in range(mtw):
                    w(f"m0_ = {self.mtile(i)}")
                    for h, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                        with w.block("for v_ in T.vectorized(2):"):
                            w(f"af{i}[{2 * h} + v_] = "
                              f"{a(f'm0_ + g_ + {dr}', f'ks_ * 16 + {dk} + tg_ * 2 + v_')}")
                with w.block(f"for j_ in T.unroll({nt}):"):
                    self.b_frag(b, lambda dk: f"ks_ * 16 + {dk}")
                    for i in range(mtw):
                        call = self.mma_call(f"af{i}", acc, f"({i} * {nt} + j_) * 4")
                        if skip is not None:
                            w(f"m0_ = {self.mtile(i)}")
                            with w.block(f"if not ({skip('m0_', 'j_')}):"):
                                w(call)
                        else:
                            w(call)
        else:
            with w.block(f"for k_ in range({K}):"):
                with w.block(f"for i_ in T.unroll({mtw}):"):
                    with w.block("for r_ in T.unroll(2):"):
                        row = self.mtile("i_") + " + g_ + r_ * 8"
                        w(f"af[i_ * 2 + r_] = {a(row, 'k_')}")
                with w.block(f"for j_ in T.unroll({nt}):"):
                    with w.block("for c_ in T.unroll(2):"):
                        w(f"bf[c_] = {b('j_ * 8 + tg_ * 2 + c_', 'k_')}")
                    with w.block(f"for i_ in T.unroll({mtw}):"):
                        with w.block("for r_ in T.unroll(2):"):
                            with w.block("for c_ in T.unroll(2):"):
                                x = f"{acc}[(i_ * {nt} + j_) * 4 + r_ * 2 + c_]"
                                w(f"{x} = {x} + af[i_ * 2 + r_] * bf[c_]")

    def mma_call(self, af: str, acc: str, offset: str) -> str:
        kind = MMA_DTYPES[self.t.OT]
        return (f'T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "{kind}", "{kind}", '
                f'"fp32", {af}.data, 0, bf.data, 0, {acc}.data, {offset}, False, '
                'dtype="float32"))')

    def frag_locals(self, mtw: int):
        t = self.t
        if t.mma:
            for i in range(mtw):
                self.local(f"af{i}", 8, t.OT)
            self.local("bf", 4, t.OT)
        else:
            self.local("af", 2 * mtw, "float32")
            self.local("bf", 2, "float32")

    def each_acc(self, mtw: int, nt: int):
        """Open unrolled loops over a warp's accumulator entries; defines row_ (in the block's
        tile), col_ (in the column tile), k_acc_ (the entry's index). Returns the depth."""
        w = self.w
        w.lines.append("    " * w.depth + f"for i_ in T.unroll({mtw}):")
        w.depth += 1
        w.lines.append("    " * w.depth + f"for j_ in T.unroll({nt}):")
        w.depth += 1
        w.lines.append("    " * w.depth + "for r_ in T.unroll(2):")
        w.depth += 1
        w.lines.append("    " * w.depth + "for c_ in T.unroll(2):")
        w.depth += 1
        w(f"row_ = {self.mtile('i_')} + g_ + r_ * 8", "col_ = j_ * 8 + tg_ * 2 + c_",
          f"k_acc_ = (i_ * {nt} + j_) * 4 + r_ * 2 + c_")
        return 4
