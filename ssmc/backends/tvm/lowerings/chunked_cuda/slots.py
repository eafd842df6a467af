"""The chunk slots: every chunk of every sequence has a slot of the workspaces (ws, cd, cs),
in which the chunk pass leaves its contribution and the sequential pass the state entering
it. Here are their host-side shapes and the index arithmetic the kernels use for them."""
from __future__ import annotations

from .....plan import Plan
from ..common import i64
from .emitter import L
from .tiles import THREADS, operand_dtype


def num_slots(plan: Plan, B: int, T: int, S: int) -> int:
    """NS, the chunk slots of a call: ceil(T / Q) a sequence, or T // Q + S for S packed
    sequences (sequence s's chunk c is slot t0_s // Q + s + c: never the next one's)."""
    Q = plan.chunk_size
    n = T // Q + S if plan.varlen else B * max(-(-T // Q), 1)
    return max(n, 1)


def workspace_shapes(plan: Plan, B: int, T: int, S: int, H: int, N: int, P: int):
    """[(name, shape, torch dtype name)] of the extra arguments, in argument order."""
    ns = num_slots(plan, B, T, S)
    out = [("chunk_states", (ns, H, P, N), operand_dtype(plan)),
           ("chunk_decay", (ns, H), "float32")]
    if plan.varlen:
        out.append(("chunk_seq", (ns,), "int32"))
    return out


def seq_bounds(e):
    """b_, t0_, t1_, L_ of sequence s_ (int64)."""
    w = e.w
    if e.varlen:
        w("b_ = T.int64(0)",
          'v_t0_ = T.Cast("int64", cu[s_])',
          'v_t1_ = T.Cast("int64", cu[s_ + T.int64(1)])',
          "t0_ = T.max(T.min(v_t0_, TT), T.int64(0))",
          "t1_ = T.max(T.min(v_t1_, TT), t0_)")
    else:
        w("b_ = s_", "t0_ = T.int64(0)", "t1_ = TT")
    w("L_ = t1_ - t0_")


def slot_base(e) -> str:
    """The slot of sequence s_'s first chunk (see num_slots)."""
    Q = e.t.Q
    if e.varlen:
        return f"t0_ // {i64(Q)} + s_"
    return f"s_ * T.max((TT + {i64(Q - 1)}) // {i64(Q)}, T.int64(1))"


def init_slots(e):
    """cs[:] = -1 (packed sequences): slots no chunk maps to are skipped."""
    w = e.w
    with w.block(f"for bid_ in T.thread_binding((NS + {i64(THREADS - 1)}) // "
                 f"{i64(THREADS)}, thread=\"blockIdx.x\"):"):
        with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
            w(f"ix_ = bid_ * {i64(THREADS)} + {L('tx_')}")
            with w.block("if ix_ < NS:"):
                w("cs[ix_] = -1")


def map_slots(e):
    """cs[slot] = the sequence of every chunk slot (packed sequences; after init_slots)."""
    w, Q = e.w, e.t.Q
    with w.block('for s_ in T.thread_binding(S1 - T.int64(1), thread="blockIdx.x"):'):
        with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
            seq_bounds(e)
            w(f"nch_ = (L_ + {i64(Q - 1)}) // {i64(Q)}", f"base_ = {slot_base(e)}")
            with w.block(f"for k_ in range((nch_ + {i64(THREADS - 1)}) // {i64(THREADS)}):"):
                w(f"ch_ = k_ * {i64(THREADS)} + {L('tx_')}")
                with w.block("if ch_ < nch_:"):
                    w('cs[base_ + ch_] = T.Cast("int32", s_)')


def slot_task(e):
    """From slot_: the sequence s_ (its bounds, see seq_bounds) and the chunk ch_ in it, c0_
    and cl_. For packed sequences, opens `if s_ >= 0` (unused slots); returns the number of
    levels opened."""
    w, Q = e.w, e.t.Q
    opened = 0
    if e.varlen:
        w('s_ = T.Cast("int64", cs[slot_])')
        w.lines.append("    " * w.depth + "if s_ >= T.int64(0):")
        w.depth += 1
        opened = 1
        seq_bounds(e)
        w(f"ch_ = slot_ - ({slot_base(e)})")
    else:
        w(f"nc_ = T.max((TT + {i64(Q - 1)}) // {i64(Q)}, T.int64(1))",
          "s_ = slot_ // nc_", "ch_ = slot_ % nc_")
        seq_bounds(e)
    w(f"c0_ = ch_ * {i64(Q)}", f"cl_ = T.min({i64(Q)}, L_ - c0_)")
    return opened
