"""The hidden attention matrix M (b, h, t, t) for the LLVM target (`ssmc.attention_matrix`):
the quadratic lowering's walk from the diagonal back to the sequence start, multiplying in one
decay per step (exact products: zero decays reset, negative ones carry their sign), storing
each entry q_t . (decay_{s+1} ... decay_t) k_s instead of applying it to the value. The
directions' matrices are added (y = M value before the epilogue); M comes zeroed, and each
(batch, head) task writes only its own slab. One unpacked batch, decays without p.

Calling convention: inputs (in program order), M (B, H, TT, TT) in the accumulation dtype.
"""
from __future__ import annotations

from .common import Emitter, KernelSpec, i64
from .quadratic import matrix_entry, start_row, walk_decay

FUNC_NAME = "ssmc_matrix_fwd"


def render_matrix(spec: KernelSpec) -> str:
    e = Emitter(spec)
    w, r, s = e.w, e.program.recurrence, spec
    args = [f"{e.buf(i.name)}_h: T.handle" for i in e.program.inputs] + ["M_h: T.handle"]
    w("# from tvm.script import tirx as T", "@T.prim_func")
    w(f"def {FUNC_NAME}({', '.join(args)}):")
    w.depth += 1
    w(f'T.func_attr({{"global_symbol": "{FUNC_NAME}", "tirx.noalias": True}})')
    w("B = T.int64()", "TT = T.int64()")
    e.match_inputs()
    w(f'M = T.match_buffer(M_h, (B, {i64(s.H)}, TT, TT), "{e.acc}")')
    with e.tasks():
        e.alloc("qv", (s.N,))
        e.alloc("lr", (e.Nd,))        # the decay product from s + 1 to t
        e.alloc("ms", (1,))
        for _, direction in e.orders():
            with w.block("for i_ in range(L_):"):
                start_row(e, direction)
                with w.block("for jj_ in range(i_ + T.int64(1)):"):
                    w(f"tj_ = {e.time_of(direction, 'i_ - jj_')}")
                    matrix_entry(e, "tj_")
                    w("M[b_, h_, t_, tj_] = M[b_, h_, t_, tj_] + ms[T.int64(0)]")
                    walk_decay(e, "tj_")
    return e.finish()
