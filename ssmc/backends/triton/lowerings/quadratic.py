"""The quadratic lowering: masked, decayed attention, y = M value with M never stored.

One program per (query block of BT rows, p-block, head, sequence). It walks the key blocks
from the diagonal block back to the start of the sequence:

    y[t] = sum_{s <= t} (q_t . (k_s * exp(L_t - L_s))) v_s  +  q_t . (exp(L_t) * h0)

with L the running sum of log-decays. The exponent is never formed as a difference of two
long running sums: it is assembled from sums over disjoint ranges (inside the query block,
between the blocks, inside the key block), each <= 0 for decays <= 1, so it is stable and
accurate at any sequence length. Scores use tensor cores (`tl.dot`) when the decay does not
vary over n (none, time-invariant per head, scalar); a decay that varies over n (diagonal, or
time-invariant per (h, n)) is applied exactly on a (BT, BT, BNC) broadcast, looped over
n-chunks, and only the score-times-value product uses `tl.dot`.

Directions work in *logical* time: position i of a sequence is t = start + i forward and
t = end - 1 - i in reverse, and a grid's column orders (direction="cross2d") map that
position to its row-major step (`templates.grid_position`), so the kernel body only knows
forward time. The final state is a second, small kernel (`ssmc_quadratic_state`); the hidden
attention matrix M (b, h, t, t) is a third (`ssmc_quadratic_matrix`, see `attention_matrix`).
"""
from __future__ import annotations

from ....ir import DecayKind
from ....plan import Plan
from ...base import SIGNED_DECAY_REASON
from ..common import HEADER, compute_type, emit_output, fp32_precision, input_params
from ..render import Context, Emitter, Tile
from ..templates import grid_position, later_sum, split_resets, with_resets

FIXED = {"b": "b_idx", "t": "t_idx", "h": "h_idx", "g": "g_idx"}

LOW_PRECISION = {"bfloat16": "tl.bfloat16", "float16": "tl.float16"}


# --------------------------------------------------------------------------- plan analysis

def decay_mode(plan: Plan) -> str:
    """'none', 'scalar' (one log-decay per step: tensor-core scores) or 'diagonal' (varies
    over n: exact broadcast scores)."""
    prog = plan.program
    if prog.recurrence.decay is None:
        return "none"
    return "diagonal" if "n" in prog.log_decay.axes else "scalar"


def supports(plan: Plan) -> str | None:
    prog = plan.program
    kind = prog.decay_kind
    if kind is DecayKind.FULL:
        return ("the decay varies over 'p', so M differs per value channel; the quadratic "
                "lowering needs a decay that factors through the key dim (use scan)")
    if prog.recurrence.decay is not None and prog.log_decay is None:
        return "the program has no log-space decay (the log_space_decay pass did not run)"
    if not prog.decay_log_safe:
        return SIGNED_DECAY_REASON
    if prog.recurrence.transition.kind != "diagonal":
        return f"the {prog.recurrence.transition.kind!r} transition is not implemented"
    return None


# --------------------------------------------------------------------------- rendering

def _mm_helpers(plan: Plan) -> str:
    """`_mm(a, b, LOWP)`: a product at the plan's operand precision; `_rd(x, LOWP)`: `x` as a
    matmul operand (rounded to the input's 16-bit type once, e.g. q before the key loop);
    `_mm_exact(a, b)`: the initial-state term, with fp32 operands (TF32 tensor cores for 16-bit
    plans, which is more precise than their operands; IEEE for fp32 / fp64 plans)."""
    if plan.dtype in LOW_PRECISION:
        dt = LOW_PRECISION[plan.dtype]
        return f'''
@triton.jit
def _rd(x, LOWP: tl.constexpr):
    if LOWP:
        r = x.to({dt})
    else:
        # the interpreter multiplies 16-bit floats wrongly: round the operands to the input
        # precision, multiply in fp32
        r = x.to({dt}).to(tl.float32)
    return r


@triton.jit
def _mm(a, b, LOWP: tl.constexpr):
    if LOWP:
        c = tl.dot(a.to({dt}), b.to({dt}))
    else:
        c = tl.dot(a.to({dt}).to(tl.float32), b.to({dt}).to(tl.float32),
                   input_precision="ieee")
    return c


@triton.jit
def _mm_exact(a, b):
    return tl.dot(a, b, input_precision="tf32")

'''
    # fp32 at fp32-level accuracy (common.fp32_precision); fp64 (tensor cores on sm80+)
    prec = fp32_precision() if plan.dtype == "float32" else "ieee"
    return f'''
@triton.jit
def _rd(x, LOWP: tl.constexpr):
    return x


@triton.jit
def _mm(a, b, LOWP: tl.constexpr):
    return tl.dot(a, b, input_precision="{prec}")


@triton.jit
def _mm_exact(a, b):
    return tl.dot(a, b, input_precision="{prec}")

'''


def _full_mask(tile: Tile) -> str:
    return " & ".join(tile.broadcast(mask, a) for a, _, mask in tile.tiled)


def _operand(plan: Plan, emit: Emitter, node, tile: Tile, name: str) -> str:
    """Evaluate `node` on `tile` into `name`, zero outside the tile's masks and broadcast to the
    full tile shape (an operand may lack some of the tile's axes)."""
    ct = compute_type(plan)
    ctx = Context(plan.program, tile, emit, name, ct)
    raw = ctx.value(node, f"{name}_raw")
    emit(f"{name} = tl.where({_full_mask(tile)}, {raw}, 0.0).to({ct})")
    return name


def _sequence_bounds(emit: Emitter) -> None:
    emit("g_idx = h_idx // HPG")
    emit("if IS_VARLEN:")
    with emit.block():
        emit("b_idx = seq * 0")
        emit("start = tl.load(cu_ptr + seq).to(tl.int64)")
        emit("end = tl.load(cu_ptr + seq + 1).to(tl.int64)")
    emit("else:")
    with emit.block():
        emit("b_idx = seq")
        emit("start = seq * 0")
        emit("end = start + T")
    emit("seqlen = end - start")


def _positions(emit: Emitter, logical: str, phys: str, mask: str) -> None:
    """Physical time offsets `phys` of logical positions `logical` (forward or reverse; with
    COLUMN in a grid's column order)."""
    emit(f"{mask} = {logical} < seqlen")
    emit("if REVERSE:")
    with emit.block():
        emit(f"{phys} = end - 1 - {logical}")
    emit("else:")
    with emit.block():
        emit(f"{phys} = start + {logical}")
    emit("if COLUMN:")
    with emit.block():
        emit(f"{phys} = {grid_position(phys)}")


def _log_decay_block(plan: Plan, emit: Emitter, tile_t: tuple[str, str, str], name: str,
                     mode: str) -> None:
    """`{name}` the masked log-decay of a block, `cum_{name}` its inclusive running sum over
    the block, `bsum_{name}` its total; its resets (`templates.RESET_BELOW`) are moved out of
    `{name}` into `rz_{name}`, counted by `zcum_{name}` and `zsum_{name}`, and enter every
    exponent through `with_resets` (0 across a reset; the sums keep ordinary accuracy).
    Shapes (BT,) / () for scalar, (BT, BNC) / (BNC,) for diagonal."""
    prog = plan.program
    if mode == "scalar":
        tile = Tile([tile_t], FIXED)
    else:
        tile = Tile([tile_t, ("n", "offs_n", "mask_n")], FIXED)
    _operand(plan, emit, prog.log_decay, tile, name)
    for line in split_resets(name, f"rz_{name}"):
        emit(line)
    emit(f"cum_{name} = tl.cumsum({name}, axis=0)")
    emit(f"bsum_{name} = tl.sum({name}, axis=0)")
    emit(f"zcum_{name} = tl.cumsum(rz_{name}, axis=0)")
    emit(f"zsum_{name} = tl.sum(rz_{name}, axis=0)")


def _key_side(emit: Emitter, mode: str) -> None:
    """`exk` and `zexk`, the key-side parts of the log-decay and of the count of resets from
    each key of the block to a query, given `dlt`/`zdlt` (from the query block's start back to
    the key block's end): disjoint ranges, so L_t - L_s = cum_lq[t] + exk[s]."""
    for ex, cum, bsum, dlt in (("exk", "cum_lk", "bsum_lk", "dlt"),
                               ("zexk", "zcum_lk", "zsum_lk", "zdlt")):
        emit(f"{ex} = {dlt} + {bsum} - {cum}" if mode == "scalar"
             else f"{ex} = {dlt}[None, :] + {bsum}[None, :] - {cum}")


def _scores(emit: Emitter, mode: str, q: str, k: str) -> None:
    """`sc` (BT, BS): the decayed, causally masked scores of the current key block, from the
    key-side exponent parts `exk`/`zexk` ((BS,) or (BS, BNC), see `_key_side`)."""
    if mode == "none":
        emit(f"sc = tl.where(causal, _mm({q}, tl.trans({k}), LOWP), 0.0)")
    elif mode == "scalar":
        emit("ex = " + with_resets("cum_lq[:, None] + exk[None, :]",
                                   "zcum_lq[:, None] + zexk[None, :]"))
        emit('w = tl.exp(tl.where(causal, ex, float("-inf")))')
        emit(f"sc = _mm({q}, tl.trans({k}), LOWP) * w")
    else:
        emit("ex = " + with_resets("cum_lq[:, None, :] + exk[None, :, :]",
                                   "zcum_lq[:, None, :] + zexk[None, :, :]"))
        emit('w = tl.exp(tl.where(causal[:, :, None], ex, float("-inf")))')
        emit(f"sc = tl.sum({q}[:, None, :] * {k}[None, :, :] * w, axis=2)")


def _render_fwd(plan: Plan) -> str:
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    mode = decay_mode(plan)
    q_tile = Tile([("t", "offs_q", "mask_q"), ("n", "offs_n", "mask_n")], FIXED)
    k_tile = Tile([("t", "offs_k", "mask_k"), ("n", "offs_n", "mask_n")], FIXED)
    v_tile = Tile([("t", "offs_k", "mask_k"), ("p", "offs_p", "mask_p")], FIXED)
    out_tile = Tile([("t", "offs_q", "mask_q"), ("p", "offs_p", "mask_p")], FIXED)

    e = Emitter(indent=1)
    e("seq = tl.program_id(2).to(tl.int64)")
    e("h_idx = tl.program_id(1).to(tl.int64)")
    e("H = tl.num_programs(1)")
    e("NPB = tl.cdiv(P, BP)")
    e("pid = tl.program_id(0)")
    e("# the longest rows (last query blocks) first")
    e("qb = tl.cdiv(T, BT) - 1 - pid // NPB")
    e("pid_p = pid % NPB")
    _sequence_bounds(e)
    e("if qb * BT >= seqlen:")
    with e.block():
        e("return")
    e("offs_i = qb * BT + tl.arange(0, BT)")
    _positions(e, "offs_i", "offs_q", "mask_q")
    e("offs_p = pid_p * BP + tl.arange(0, BP)")
    e("mask_p = offs_p < P")
    e(f"acc = tl.zeros([BT, BP], dtype={ct})")
    e("for nc in range(0, N, BNC):")
    with e.block():
        e("offs_n = nc + tl.arange(0, BNC)")
        e("mask_n = offs_n < N")
        _operand(plan, e, rec.query, q_tile, "q")
        if mode != "diagonal":
            e("q = _rd(q, LOWP)  # a matmul operand only: keep it in its smallest type")
        if mode != "none":
            _log_decay_block(plan, e, ("t", "offs_q", "mask_q"), "lq", mode)
            e("# dlt = L(query block start - 1) - L(key block end): starts at the diagonal;")
            e("# zdlt: the same count of resets")
            e("dlt = -bsum_lq")
            e("zdlt = -zsum_lq")
        e("for jj in range(0, qb + 1):")
        with e.block():
            e("offs_j = (qb - jj) * BT + tl.arange(0, BT)")
            _positions(e, "offs_j", "offs_k", "mask_k")
            _operand(plan, e, rec.key, k_tile, "k")
            _operand(plan, e, rec.value, v_tile, "v")
            e("causal = offs_i[:, None] >= offs_j[None, :]")
            if mode != "none":
                _log_decay_block(plan, e, ("t", "offs_k", "mask_k"), "lk", mode)
                _key_side(e, mode)
            _scores(e, mode, "q", "k")
            e("acc += _mm(sc, v, LOWP)")
            if mode != "none":
                e("dlt += bsum_lk")
                e("zdlt += zsum_lk")
        e("if HAS_H0:")
        with e.block():
            e("h0 = tl.load(h0_ptr + ((seq * H + h_idx) * N + offs_n[:, None]) * P + "
              f"offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :], other=0.0).to({ct})")
            if mode == "none":
                e(f"acc += _mm_exact(q.to({ct}), h0)")
            elif mode == "scalar":
                e("# dlt is now L(query block start - 1)")
                wq = with_resets("dlt + cum_lq", "zdlt + zcum_lq")
                e(f"acc += _mm_exact(q.to({ct}) * tl.exp({wq})[:, None], h0)")
            else:
                wq = with_resets("dlt[None, :] + cum_lq", "zdlt[None, :] + zcum_lq")
                e(f"acc += _mm_exact(q * tl.exp({wq}), h0)")
    e("y = acc")
    e("y_mask = mask_q[:, None] & mask_p[None, :]")
    emit_output(e, prog, out_tile, ct, "offs_q[:, None]", "offs_p[None, :]", "y_mask")

    return f'''
@triton.jit
def ssmc_quadratic_fwd(
    {input_params(prog)},
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, h0_ptr, cu_ptr,
    T, HPG, N, P, GH,
    BT: tl.constexpr, BNC: tl.constexpr, BP: tl.constexpr, REVERSE: tl.constexpr,
    COLUMN: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, ACCUM_IN: tl.constexpr,
    WRITE_OUT: tl.constexpr, LOWP: tl.constexpr,
):
{e.text()}
'''


def _render_state(plan: Plan) -> str:
    """hT = sum_s exp(L_end - L_s) k_s v_s^T + exp(L_end) h0, key blocks walked from the end."""
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    mode = decay_mode(plan)
    k_tile = Tile([("t", "offs_k", "mask_k"), ("n", "offs_n", "mask_n")], FIXED)
    v_tile = Tile([("t", "offs_k", "mask_k"), ("p", "offs_p", "mask_p")], FIXED)

    e = Emitter(indent=1)
    e("seq = tl.program_id(2).to(tl.int64)")
    e("h_idx = tl.program_id(1).to(tl.int64)")
    e("H = tl.num_programs(1)")
    e("NPB = tl.cdiv(P, BP)")
    e("pid = tl.program_id(0)")
    e("pid_n = pid // NPB")
    e("pid_p = pid % NPB")
    _sequence_bounds(e)
    e("offs_n = pid_n * BNC + tl.arange(0, BNC)")
    e("mask_n = offs_n < N")
    e("offs_p = pid_p * BP + tl.arange(0, BP)")
    e("mask_p = offs_p < P")
    e(f"st = tl.zeros([BNC, BP], dtype={ct})")
    if mode == "scalar":
        e(f"dlt = tl.sum(tl.zeros([BT], dtype={ct}), axis=0)")
        e(f"zdlt = tl.sum(tl.zeros([BT], dtype={ct}), axis=0)")
    elif mode == "diagonal":
        e(f"dlt = tl.zeros([BNC], dtype={ct})")
        e(f"zdlt = tl.zeros([BNC], dtype={ct})")
    e("nkb = tl.cdiv(seqlen, BT)")
    e("for jj in range(0, nkb):")
    with e.block():
        e("offs_j = (nkb - 1 - jj) * BT + tl.arange(0, BT)")
        _positions(e, "offs_j", "offs_k", "mask_k")
        _operand(plan, e, rec.key, k_tile, "k")
        _operand(plan, e, rec.value, v_tile, "v")
        if mode != "none":
            _log_decay_block(plan, e, ("t", "offs_k", "mask_k"), "lk", mode)
            # a suffix sum, not bsum - cum[s]: that difference of two long sums cancels for
            # strong decays (fp32 final states off by 2.5e-5 at t=64)
            e("# L_end - L_s = dlt + (the block's log-decays after s), dlt = L_end - L(block end)")
            e(f"after_lk = {later_sum('lk')}")
            e(f"zafter_lk = {later_sum('rz_lk')}")
        if mode == "scalar":
            e(f"k = k * tl.exp({with_resets('dlt + after_lk', 'zdlt + zafter_lk')})[:, None]")
        elif mode == "diagonal":
            wk = with_resets("dlt[None, :] + after_lk", "zdlt[None, :] + zafter_lk")
            e(f"k = k * tl.exp({wk})")
        e("st += _mm(tl.trans(k), v, LOWP)")
        if mode != "none":
            e("dlt += bsum_lk")
            e("zdlt += zsum_lk")
    e("off = ((seq * H + h_idx) * N + offs_n[:, None]) * P + offs_p[None, :]")
    e("mask = mask_n[:, None] & mask_p[None, :]")
    e("if HAS_H0:")
    with e.block():
        e(f"h0 = tl.load(h0_ptr + off, mask=mask, other=0.0).to({ct})")
        if mode == "none":
            e("st += h0")
        elif mode == "scalar":
            e(f"st += tl.exp({with_resets('dlt', 'zdlt')}) * h0")
        else:
            e(f"st += tl.exp({with_resets('dlt', 'zdlt')})[:, None] * h0")
    e("tl.store(hT_ptr + off, st, mask=mask)")

    return f'''
@triton.jit
def ssmc_quadratic_state(
    {input_params(prog)},
    h0_ptr, hT_ptr, cu_ptr,
    T, HPG, N, P, GH,
    BT: tl.constexpr, BNC: tl.constexpr, BP: tl.constexpr, REVERSE: tl.constexpr,
    COLUMN: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, LOWP: tl.constexpr,
):
{e.text()}
'''


def _render_matrix(plan: Plan) -> str:
    """M[b, h, t, s] for one direction, one (query block, key block) pair in logical time;
    added onto M (zero-initialised), so directions sum."""
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    mode = decay_mode(plan)
    q_tile = Tile([("t", "offs_q", "mask_q"), ("n", "offs_n", "mask_n")], FIXED)
    k_tile = Tile([("t", "offs_k", "mask_k"), ("n", "offs_n", "mask_n")], FIXED)

    e = Emitter(indent=1)
    e("bh = tl.program_id(2).to(tl.int64)")
    e("seq = bh // H")
    e("h_idx = bh % H")
    e("qb = tl.program_id(0)")
    e("kb = tl.program_id(1)")
    e("if kb > qb:")
    with e.block():
        e("return")
    _sequence_bounds(e)
    e("offs_i = qb * BT + tl.arange(0, BT)")
    _positions(e, "offs_i", "offs_q", "mask_q")
    e("offs_j = kb * BT + tl.arange(0, BT)")
    _positions(e, "offs_j", "offs_k", "mask_k")
    e("causal = offs_i[:, None] >= offs_j[None, :]")
    e(f"m = tl.zeros([BT, BT], dtype={ct})")
    e("for nc in range(0, N, BNC):")
    with e.block():
        e("offs_n = nc + tl.arange(0, BNC)")
        e("mask_n = offs_n < N")
        _operand(plan, e, rec.query, q_tile, "q")
        _operand(plan, e, rec.key, k_tile, "k")
        if mode != "none":
            _log_decay_block(plan, e, ("t", "offs_q", "mask_q"), "lq", mode)
            _log_decay_block(plan, e, ("t", "offs_k", "mask_k"), "lk", mode)
            e("# dlt = L(query block start - 1) - L(key block end): the blocks in between")
            e("if qb == kb:")
            with e.block():
                e("dlt = -bsum_lk")
                e("zdlt = -zsum_lk")
            e("else:")
            with e.block():
                e("dlt = bsum_lk * 0.0")
                e("zdlt = zsum_lk * 0.0")
            e("for jb in range(kb + 1, qb):")
            with e.block():
                e("offs_b = jb * BT + tl.arange(0, BT)")
                _positions(e, "offs_b", "offs_bt", "mask_bt")
                lb_tile = (Tile([("t", "offs_bt", "mask_bt")], FIXED) if mode == "scalar" else
                           Tile([("t", "offs_bt", "mask_bt"), ("n", "offs_n", "mask_n")], FIXED))
                _operand(plan, e, prog.log_decay, lb_tile, "lb")
                for line in split_resets("lb", "rz_lb"):
                    e(line)
                e("dlt += tl.sum(lb, axis=0)")
                e("zdlt += tl.sum(rz_lb, axis=0)")
            _key_side(e, mode)
        _scores(e, mode, "q", "k")
        e("m += sc")
    e("off = ((bh * T + offs_q[:, None]) * T + offs_k[None, :])")
    e("mask = mask_q[:, None] & mask_k[None, :]")
    e("m += tl.load(m_ptr + off, mask=mask, other=0.0)")
    e("tl.store(m_ptr + off, m, mask=mask)")

    return f'''
@triton.jit
def ssmc_quadratic_matrix(
    {input_params(prog)},
    m_ptr, cu_ptr,
    T, H, HPG, N, GH,
    BT: tl.constexpr, BNC: tl.constexpr, REVERSE: tl.constexpr, COLUMN: tl.constexpr,
    IS_VARLEN: tl.constexpr, LOWP: tl.constexpr,
):
{e.text()}
'''


def render(plan: Plan) -> str:
    return (HEADER + _mm_helpers(plan) + _render_fwd(plan) + _render_state(plan) +
            _render_matrix(plan))
