"""The chunked forward's output pass for decays that vary over the key dim (GLA-class gates).

Row block r (BT steps) of a CS-long chunk, l[t, n] the log-decays with their resets split out
(`templates.split_resets`: a zero or underflowing decay is counted apart, so exp of a sum is
exactly 0 across one), lc the running sum within the row block. The weight of key s seen from
row t is exp(sum of l over s < u <= t), per n. Three parts:

* the state entering the chunk: (q * exp(prefix + lc)) S_in, prefix the sum over the chunk's
  earlier blocks; one matmul;
* an earlier key block j < r: the weight factors through the row block's start,
  exp(lc_t) * exp(sum over s < u < start of r), so scores = (q exp(lc)) (k exp(rest))^T is a
  tensor-core matmul, then y += scores v. Both exponents are sums of log-decays over disjoint
  steps, each <= 0 for decays of size at most 1, so neither factor overflows and the product is
  the weight (an underflowing factor means an underflowing weight);
* the diagonal block: exp(lc_t - lc_s) formed elementwise on its causal half (BT^2 * BN work),
  where the factoring has no reference point inside the block.

Decays larger than 1 in size (log-decay > 0) make factors above 1. Each factor is itself the
weight between two steps of the chunk (the key factor is the weight of s seen from the last
row of block r - 1, the row factor that of the step before block r seen from t), so in a type
with fp32's range (fp32, bf16 operands) a factor overflows only where a weight the output
needs does. fp16 operands stop at 65504: a chunk whose decays grow takes the elementwise form
for its earlier key blocks too (each exponent summed whole, in fp32). Negative decays carry
their sign as the parity of their count in each factor's range, split the same way.
"""
from __future__ import annotations

from ..render import Emitter
from ..templates import later_sum, with_resets
from .chunked_tiles import (KEY_KT_TILE, KEY_QK_TILE, KEY_ROWS, KEY_V_TILE, QK_TILE,
                            BlockOperands, RowOperands)


def _sign(count: str) -> str:
    """+1 or -1: the sign of a product holding `count` negative decays."""
    return f"tl.where(({count}) % 2 == 1, -1.0, 1.0)"


def _columns(body: Emitter, ct: str, key: str, extract: list[tuple[str, str]],
             exponent: str, count: str | None) -> None:
    """`scores` (BT, BT) = sum over n of query * exp(exponent) * key_s, one key step s of an
    earlier block at a time (unrolled; only fp16's chunks whose decays grow); `extract` names
    the key-side (BT, BN) tiles whose row s the exponent reads as `<name>_s`, with their zero."""
    body(f"scores = tl.zeros([BT, BT], dtype={ct})")
    body("for s in tl.static_range(BT):")
    with body.block():
        body("sel = offs_c == s")
        for name, zero in [(key, "0.0")] + extract:
            body(f"{name}_s = tl.sum(tl.where(sel[:, None], {name}, {zero}), axis=0)")
        factor = f"tl.exp({exponent})"
        if count is not None:
            factor += f" * {_sign(count)}"
        body(f"col = tl.sum(query * {factor} * {key}_s[None, :], axis=1)")
        body("scores = tl.where(sel[None, :], col[:, None], scores)")


def diagonal_walk(prog, ct: str, body: Emitter, per_step) -> None:
    """The diagonal block's key steps s one at a time (unrolled): step s's key `k_r` and the
    running sums of its block's log-decays up to s (`lcs`, `zcs`, `ngs`), kept as the walk
    goes, which `lc`, `zc`, `ngc` (the rows' own) minus them make D[u, s] of; `per_step(dec)`
    emits the step's work from `dec`, D[:, s, :] (0 above the diagonal)."""
    sgn = prog.decay_signed
    body(f"lcs = tl.zeros([BN], dtype={ct})")
    body(f"zcs = tl.zeros([BN], dtype={ct})")
    if sgn:
        body("ngs = tl.zeros([BN], dtype=tl.int32)")
    body("for s in tl.static_range(BT):")
    with body.block():
        row = RowOperands(prog, ct, body, "s")
        row.operand("key", "k_r")
        ld, rz, ng = row.log_decays()
        body(f"lcs += {ld}")
        body(f"zcs += {rz}")
        gap = with_resets("lc - lcs[None, :]", "zc - zcs[None, :]")
        dec = f"tl.exp(tl.where(offs_c[:, None] >= s, {gap}, float('-inf')))"
        if sgn:
            body(f"ngs += {ng}")
            dec += f" * {_sign('ngc - ngs[None, :]')}"
        body(f"dec = {dec}")
        per_step()


def diagonal_scores(prog, ct: str, body: Emitter, query: str) -> None:
    """`scores` (BT, BT) of the diagonal block: sum over n of query * D[:, s] * k_s."""
    body(f"scores = tl.zeros([BT, BT], dtype={ct})")

    def column():
        body(f"col = tl.sum({query} * dec * k_r[None, :], axis=1)")
        body("scores = tl.where(offs_c[None, :] == s, col[:, None], scores)")
    diagonal_walk(prog, ct, body, column)


def narrow_operands(dt: str) -> bool:
    """Whether matmul operands of type `dt` have a range below fp32's (module docstring)."""
    return dt == "tl.float16"


def per_key_decay_body(c, body: Emitter) -> None:
    """The output pass's body for row block r (module docstring); `c` is the forward's
    per-chunk operand emitter (`chunked._Chunk`). Leaves y (BT, BP), before the epilogue."""
    prog, ct, dt = c.prog, c.ct, c.dt
    sgn = prog.decay_signed
    narrow = narrow_operands(dt)
    row = BlockOperands(prog, ct, body, QK_TILE, "qk", "")
    row.ctx.loaded = c.ctx_qk.loaded
    query = row.operand("query", "query")   # the diagonal loads its key steps' rows
    c.value()
    ld, rz, ng = row.log_decays()
    body(f"lc = tl.cumsum({ld}, axis=0)")
    body(f"zc = tl.cumsum({rz}, axis=0)")
    body(f"lcf = {with_resets('lc', 'zc')}")
    if sgn:
        body(f"ngc = tl.cumsum({ng}, axis=0)")
    if narrow:
        body(f"grow = tl.max({ld})")

    # the chunk's earlier blocks: their summed log-decays per key (and whether any grows)
    body(f"prefix = tl.zeros([BN], dtype={ct})")
    if sgn:
        body("prefix_ng = tl.zeros([BN], dtype=tl.int32)")
    body("for j in range(0, r):")
    with body.block():
        for line in KEY_ROWS.splitlines():
            body(line)
        pre = BlockOperands(prog, ct, body, KEY_KT_TILE, "pj", "p")
        lp, rp, gp = pre.log_decays()
        body(f"prefix += {with_resets(f'tl.sum({lp}, axis=1)', f'tl.sum({rp}, axis=1)')}")
        if narrow:
            body(f"grow = tl.maximum(grow, tl.max({lp}))")
        if sgn:
            body(f"prefix_ng += tl.sum({gp}, axis=1)")

    start = "tl.exp(prefix[None, :] + lcf)"
    if sgn:
        start += f" * {_sign('prefix_ng[None, :] + ngc')}"
    body(f"y = {c.dot(f'({query} * {start}).to({dt})', f'state_in.to({dt})')}")

    diagonal_scores(prog, ct, body, query)
    body(f"y += {c.dot(f'scores.to({dt})', 'value')}")

    # the earlier key blocks, nearest first: `mid` sums the blocks between j and r
    def key_block(factored: bool) -> None:
        body(f"mid = tl.zeros([BN], dtype={ct})")
        if sgn:
            body("mid_ng = tl.zeros([BN], dtype=tl.int32)")
        body("for jj in range(1, r + 1):")
        with body.block():
            body("j = r - jj")
            for line in KEY_ROWS.splitlines():
                body(line)
            vj = BlockOperands(prog, ct, body, KEY_V_TILE, "vj", "v")
            vj.operand("value", "vj", dt)
            if factored:   # (n, t) layout: the key operand of q k^T
                blk = BlockOperands(prog, ct, body, KEY_KT_TILE, "kj", "k")
                kT = blk.operand("key", "kT", dt)
                lk, rk, gk = blk.log_decays()
                axis, bcast = 1, "mid[:, None]"
            else:
                blk = BlockOperands(prog, ct, body, KEY_QK_TILE, "kj", "k")
                kj = blk.operand("key", "kj")
                lk, rk, gk = blk.log_decays()
                axis, bcast = 0, "mid[None, :]"
            body(f"rest = {with_resets(later_sum(lk, axis), later_sum(rk, axis))} + {bcast}")
            count = None
            if sgn:
                count = f"{later_sum(gk, axis)} + mid_ng{bcast[3:]}"
            if factored:
                scale = "tl.exp(rest)" + (f" * {_sign(count)}" if sgn else "")
                body(f"kT_op = ({kT} * {scale}).to({dt})")
                body(f"scores = {c.dot('q_op', 'kT_op')}")
            else:
                if sgn:
                    body(f"ngx = {count}")
                _columns(body, ct, kj, [("rest", "0.0")] + ([("ngx", "0")] if sgn else []),
                         "lcf + rest_s[None, :]", "ngc + ngx_s[None, :]" if sgn else None)
            body(f"y += {c.dot(f'scores.to({dt})', 'vj')}")
            total = with_resets(f"tl.sum({lk}, axis={axis})", f"tl.sum({rk}, axis={axis})")
            body(f"mid += {total}")
            if sgn:
                body(f"mid_ng += tl.sum({gk}, axis={axis})")

    def factored() -> None:
        row_scale = "tl.exp(lcf)" + (f" * {_sign('ngc')}" if sgn else "")
        body(f"q_op = ({query} * {row_scale}).to({dt})")
        key_block(factored=True)

    if not narrow:
        factored()
        return
    body("if grow > 0.0:")
    with body.block():
        key_block(factored=False)
    body("else:")
    with body.block():
        factored()

