"""The chunked (SSD) lowering: two kernels, a sequential state pass and a parallel output pass.

`ssmc_chunked_state_fwd` walks each (sequence, head, p-block) chunk by chunk, keeping the
n x BP state in registers and writing the state that *enters* every chunk (in the matmul
operand type) plus the final state: one tensor-core matmul per chunk, key^T times the
decay-weighted value. Where those walks are too few to fill the GPU (one long sequence, few
heads), each sequence is walked in segments side by side from zero states; the short
`ssmc_chunked_segments` pass then gives each segment its entering state, and the output pass
adds it, times the decay from the segment's start, to each chunk's (chunked_segments.py).
`ssmc_chunked_out_fwd` then runs every (chunk, head, p-block) in parallel: scores = query
key^T masked by the decay, y = scores value + query state_in, the epilogue, the store. Where
query and key are the same for every head of a group and a group has a few heads,
`ssmc_chunk_qk` forms query key^T once per (chunk, group) first and the output pass reads it
(`QK_READ`, chunk_qk.py). Chunk-local work never
waits on other chunks, and the serial part is as short as it can be.

Decays are handled in log space. With L the within-chunk running sum of log-decays, key s
seen from query t is weighted by exp(L_t - L_s) (exponent <= 0 on the causal half). A decay
that varies over the key dim would factor that weight as (q_t exp(L_t)) . (k_s exp(-L_s)),
which overflows once a chunk's summed log-decay on one key falls below about -88; per-key
decays (`chunked_keys.py`) factor it through the start of the query's 16-row block instead
(both factors are weights between steps of the chunk), form the diagonal block elementwise,
and use only exponents <= 0 for the state terms (exp(L_t), exp(L_last - L_s)). Their decayed
scores do not depend on p, so a third kernel, `ssmc_chunked_scores`, forms them once per
(chunk, head), and their output pass takes whole chunks. These kernels (and the backward's
recompute of them) read L from `ssmc_chunked_prefix`, which sums each chunk's log-decays once
(chunked_prefix.py).

A positive decay's resets (`templates.RESET_BELOW`: a decay of 0, or under fp32's smallest
normal number) are kept out of L and counted apart in Z: the weight is exp((L_t - L_s) -
RESET_WEIGHT * (Z_t - Z_s)), exactly 0 across a reset, and L keeps the accuracy ordinary
decays give it. Scalar decays count them only in a block that has one (a scalar branch on the
block's folded sum, `templates.HAS_RESET_BELOW`): counting everywhere cost 25% of the SSD
forward on an H200. A decay that may be zero or negative takes direct sums instead (see
`_scalar_decay_body`).

Every kernel works in the direction's own order: `templates.rows` maps a block's positions to
the time steps they read (reversed, or a grid's column order for direction="cross2d"), so
chunks of a column order gather their rows from the row-major inputs in place.

This module renders the kernels; chunked_launch.py sizes the tiles, launches them and registers
the lowering.
"""
from __future__ import annotations

import textwrap

from ....ir import DecayKind, Elementwise
from ....plan import Plan
from ..common import (HEADER, compute_type, dot_type, emit_output, precision_arg,
                      input_params)
from ..render import Context, Emitter, Tile, split_scale
from . import chunked_segments as seg
from .walk_rows import RowsAhead
from .chunk_qk import qk_load, render_qk_kernel, shares_qk
from . import chunked_prefix as prefix
from .chunked_keys import KeyOps, output_body, render_scores_kernel
from .chunked_prefix import RunningSums
from .chunked_pairs import (OUT_BLOCK, OUT_COUNTING, OUT_PLAIN, block_call, flag_of,
                            param_names, render_pair_kernels)
from .chunked_tiles import (KEY_KT_TILE, KEY_ROWS, KEY_T_TILE, KEY_V_TILE, KT_TILE, QK_TILE,
                            T_TILE, V_TILE)
from ..templates import (HAS_RESET_BELOW, after, chunk_setup, chunk_state_store, fold_resets,
                         indent, later_sum, rows, segment, seq_setup, signed, split_resets,
                         with_resets)



def prefix_params(plan: Plan) -> str:
    """The stored running sums' parameters of a per-key plan's kernels (chunked_prefix.py)."""
    return prefix.PARAMS if per_key_decay(plan) else ""


def per_key_decay(plan: Plan) -> bool:
    ld = plan.program.log_decay
    return ld is not None and "n" in ld.axes


def supports(plan: Plan) -> str | None:
    if plan.program.decay_kind is DecayKind.FULL:
        return "a decay that varies over p has no chunked form"
    return None


class _Chunk:
    """Emits the per-chunk operand code shared by both kernels."""

    def __init__(self, plan: Plan, body: Emitter):
        self.plan, self.body = plan, body
        self.prog = plan.program
        self.ct = compute_type(plan)
        self.dt = dot_type(plan)
        self.prec = precision_arg(plan)
        self.ctx_qk = Context(self.prog, QK_TILE, body, "qk", self.ct)
        self.ctx_kt = Context(self.prog, KT_TILE, body, "kt", self.ct)
        self.ctx_v = Context(self.prog, V_TILE, body, "v", self.ct)
        #: a walk's row inputs loaded a step ahead (walk_rows.py), read by the (t,) contexts
        self.ahead: RowsAhead | None = None

    @property
    def rows_extra(self) -> dict[str, str]:
        return self.ahead.extra if self.ahead else {}

    def dot(self, a: str, b: str) -> str:
        return f"tl.dot({a}, {b}{self.prec})"

    def key_t(self):
        if self.ctx_kt.direct_load(self.prog.recurrence.key, "keyT", self.dt):
            return
        v = self.ctx_kt.value(self.prog.recurrence.key, "keyT_raw")
        self.body(f"keyT = tl.where(mask_n[:, None] & mask_t[None, :], {v}, 0.0)")

    def query(self):
        if self.ctx_qk.direct_load(self.prog.recurrence.query, "query", self.dt):
            return
        v = self.ctx_qk.value(self.prog.recurrence.query, "query_raw")
        self.body(f"query = tl.where(mask_t[:, None] & mask_n[None, :], {v}, 0.0)")

    def value(self):
        v = self.ctx_v.value(self.prog.recurrence.value, "value_raw")
        self.body(f"value = tl.where(mask_t[:, None] & mask_p[None, :], {v}, 0.0).to({self.dt})")

    def scaled(self, node, own_axis: str, tile: Tile, scale_tile: Tile, name: str, tag: str):
        """Load `node` as (operand in the matmul type, scale vector along t or None) when it
        splits as bare input * scale; otherwise None."""
        split = split_scale(node, self.prog, own_axis)
        if split is None:
            return None
        base, scale = split
        ctx = Context(self.prog, tile, self.body, tag, self.ct)
        if ctx.direct_load(Elementwise(base, node.axes), name, self.dt) is None:
            return None
        if scale == 1:
            return name, None
        sctx = Context(self.prog, scale_tile, self.body, tag + "s", self.ct,
                       self.rows_extra if scale_tile is T_TILE else None)
        v = sctx.value(scale, f"{name}_scale_raw")
        # a scale without t is a scalar: broadcast it so rows/columns can index it
        self.body(f"{name}_scale = tl.zeros([BT], dtype={self.ct}) + {v}")
        return name, f"{name}_scale"

    def resets(self, ld: str, rz: str, axis: int) -> None:
        """`l_last`, the chunk's total log-decay along `axis`; for a positive decay, its resets
        first moved out of `ld` into `rz`."""
        total = f"tl.sum({ld}, axis={axis})"
        if self.prog.decay_log_safe:
            for line in split_resets(ld, rz):
                self.body(line)
            total = with_resets(total, f"tl.sum({rz}, axis={axis})")
        self.body(f"l_last = {total}")

    def log_decay_rows(self, resets: str = "fold"):
        """ld (masked log|decay| per row) and its total l_last, scalar-per-step decays; a
        positive decay's resets are folded in (`fold_resets`: l_last < HAS_RESET_BELOW says
        the chunk has one), or split out into rz (`resets="split"`), or left as they are (a
        chunk known to have none: "none"); with a signed decay also ng (1 where the decay is
        negative)."""
        ctx = Context(self.prog, T_TILE, self.body, "l", self.ct, self.rows_extra)
        v = ctx.value(self.prog.log_decay, "ld_raw")
        safe = self.prog.decay_log_safe
        if safe and resets == "fold":
            v = fold_resets(v)
        self.body(f"ld = tl.where(mask_t, {v}, 0.0)")
        if safe and resets == "split":
            self.resets("ld", "rz", 0)
        else:
            self.body("l_last = tl.sum(ld, axis=0)")
        if self.prog.decay_signed:
            v = ctx.value(self.prog.recurrence.decay, "dsg_raw")
            self.body(f"ng = tl.where(mask_t, tl.where({v} < 0, 1, 0), 0)")


def _decay_to_chunk_end(body: Emitter, prog, ld: str, rz: str, ng: str) -> None:
    """`dec`, each key's decay to the chunk's end (exactly 1 for its last key), and `total`,
    the whole chunk's, from the (BT,) log-decays `ld` (resets `rz`, negative flags `ng`) of
    a decay without n (per-key decays read stored running sums: chunked_prefix.py)."""
    if prog.decay_log_safe:   # suffix sums: exactly 0 on the last key
        # resets folded into ld (`log_decay_rows`): counted apart if any
        body(f"if l_last < {HAS_RESET_BELOW}:")
        with body.block():
            for line in split_resets(ld, rz):
                body(line)
            body(f"dec = tl.exp({with_resets(later_sum(ld), later_sum(rz))})")
        body("else:")
        with body.block():
            body(f"dec = tl.exp({later_sum(ld)})")
    else:
        body(f"dec = tl.exp({after(ld)})")
    body("total = tl.exp(l_last)")
    if prog.decay_signed:
        body("dec = " + signed("dec", after(ng, "0")))
        body("total = " + signed("total", f"tl.sum({ng}, axis=0)"))


def render_state_kernel(plan: Plan) -> str:
    body = Emitter(indent=2)
    c = _Chunk(plan, body)
    c.ahead = RowsAhead(plan.program, c.ct)
    rec = plan.program.recurrence
    if per_key_decay(plan):
        c.key_t()
        c.value()
        # each key's decay to the chunk's end (stored), and the chunk's: every block's total
        sums = RunningSums(plan, body, "T", "offs_c", "BT", transposed=True, counts_only=True)
        end = RunningSums(plan, body, "E", "BT - 1", "BT", counts_only=True)
        body(f"to_end = {prefix.to_chunk_end('atT', rows_first=False)}")
        prefix.chunk_total(body, c.ct, "BT")
        body(f"dec = tl.exp({with_resets('to_end', end.resets_since(sums, '[:, None]'))})"
             f"{end.sign(sums, '[:, None]')}")
        body(f"total = tl.exp({with_resets('l_last', end.resets_since())}){end.sign()}")
        body("kT_dec = keyT * dec")
        body(f"state = state * total[:, None] + {c.dot(f'kT_dec.to({c.dt})', 'value')}")
    else:
        key = c.scaled(rec.key, "n", KT_TILE, T_TILE, "keyT", "kt")
        val = c.scaled(rec.value, "p", V_TILE, T_TILE, "value", "v")
        if key is None:
            c.key_t()
            key = ("keyT", None)
        if val is None:
            c.value()
            val = ("value", None)
        # per-key-time weights: the decay to the chunk's end and the key/value scales
        weights = [s for s in (key[1], val[1]) if s is not None]
        if plan.program.log_decay is not None:
            c.log_decay_rows()
            _decay_to_chunk_end(body, plan.program, "ld", "rz", "ng")
            weights.append("dec")
            # which output pass takes the chunk (`reset_specialised`), and which variant of
            # the backward's per-chunk kernels (chunked_bwd.chunk_variants: every sign)
            body(f"tl.store(resets_ptr + chunk * H + h_idx, "
                 f"(l_last < {HAS_RESET_BELOW}).to(tl.int8))")
        # the weights scale the value's rows (t, BP), not the key's columns (n, t): the key
        # goes to the product as loaded, and the walk holds less in registers (ssd h=80
        # n=128, BP 32, Triton 3.6 sm_90a: 193 -> 140 registers)
        if weights:
            body(f"w = tl.where(mask_t, {' * '.join(weights)}, 0.0)")
            body(f"v_dec = ({val[0]} * w[:, None]).to({c.dt})")
        else:
            body(f"v_dec = {val[0]}.to({c.dt})")
        upd = c.dot(f"{key[0]}.to({c.dt})", "v_dec")
        if plan.program.log_decay is not None:
            body(f"state = state * total + {upd}")
        else:
            body(f"state += {upd}")
    decay = decay_kind(plan)
    store = chunk_state_store("states_ptr", "state.to(states_ptr.dtype.element_ty)")
    body = indent(rows(), 2) + "\n" + body.text()
    return f'''
@triton.jit
def ssmc_chunked_state_fwd(
    {input_params(plan.program)}, {prefix_params(plan)}
    states_ptr, resets_ptr, h0_ptr, hT_ptr, cu_ptr, chunk_off_ptr, {seg.PARAMS}
    T, HPG, N, P, GH, NSEG, SEG,
    BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, NPB: tl.constexpr,
    REVERSE: tl.constexpr, COLUMN: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr, SEGMENTED: tl.constexpr,
):
{seq_setup(True, "cu_ptr", "chunk_off_ptr", "tl.program_id(0).to(tl.int64) // NSEG")}
{seg.render_walk("state", c.ct, ("h0_ptr", "HAS_H0"), store, body, decay, "total", False,
                 ("hT_ptr", "STORE_HT"), c.ahead)}
''' + seg.render_join("ssmc_chunked_segments", decay)


def decay_kind(plan: Plan) -> str:
    """"none", "row" (a decay per step) or "key" (per key), for the segment kernels."""
    if plan.program.log_decay is None:
        return "none"
    return "key" if per_key_decay(plan) else "row"


def _scalar_decay_body(plan: Plan, c: _Chunk, body: Emitter, resets: bool) -> None:
    """Rows r*BT.. of a CS-long chunk: the decayed carried state, then every key block of
    the chunk up to the diagonal (a scalar or absent decay factors per row and per key).
    Operands that split as bare input * scale are loaded straight into the matmul type and
    their scales applied to the score matrix's rows and columns.

    The log-decay between key s and row t is a sum over the steps s < r <= t: the row block's
    running sum + the blocks between + the key block's sum after s. For a decay that may be
    zero or negative (not `decay_log_safe`) each part is a direct sum (`segment`, `after`),
    never a difference of two running sums, so a zero decay (-inf) or a log-decay of -1e4
    keeps the others exact, and the parity of the count of negative decays in each product
    gives its sign. Positive decays keep running-sum differences: the direct sums doubled the
    SSD forward on an H200 (benchmarks/RESULTS.md). With `resets` (a chunk that has one) they
    count resets apart (module docstring); without, the chunk has none."""
    prog = plan.program
    rec = prog.recurrence
    dt = c.dt
    decay = prog.log_decay is not None
    sgn = decay and prog.decay_signed
    exact = decay and not prog.decay_log_safe
    resets = resets and decay and not exact
    shared = shares_qk(plan)
    query = c.scaled(rec.query, "n", QK_TILE, T_TILE, "q_op", "q")
    if query is None:
        c.query()
        body(f"q_op = query.to({dt})")
        query = ("q_op", None)
    row_scale = [s for s in (query[1],) if s is not None]
    if decay:
        # sums of log-decays (and negative counts) from the chunk start to the row block
        body("prefix = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)")
        if sgn:
            body("prefix_ng = tl.sum(tl.zeros([BT], dtype=tl.int32), axis=0)")
        body("for j in range(0, r):")
        with body.block():
            pre = Emitter(indent=body.level)
            for line in KEY_ROWS.splitlines():
                pre(line)
            ctx = Context(prog, KEY_T_TILE, pre, "pj", c.ct)
            v = ctx.value(prog.log_decay, "ldj_raw")
            if resets:   # only exponentiated whole (rs_dec): resets folded in
                v = fold_resets(v)
            pre(f"prefix += tl.sum(tl.where(mask_key, {v}, 0.0), axis=0)")
            if sgn:
                v = ctx.value(rec.decay, "dsj_raw")
                pre("prefix_ng += tl.sum(tl.where(mask_key, "
                    f"tl.where({v} < 0, 1, 0), 0), axis=0)")
            body.lines.extend(pre.lines)
        c.log_decay_rows("split" if resets else "none")
        body("lc = tl.cumsum(ld, axis=0)")
        row_part = "lc"
        if resets:   # zc the count of resets, lcf the row's part of an exponent (0 after one)
            body("zc = tl.cumsum(rz, axis=0)")
            body(f"lcf = {with_resets('lc', 'zc')}")
            row_part = "lcf"
        body(f"rs_dec = tl.exp(prefix + {row_part})")
        if sgn:
            body("ngc = tl.cumsum(ng, axis=0)")
            body("rs_dec = " + signed("rs_dec", "prefix_ng + ngc"))
        row_scale.append("rs_dec")
        body("mid = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)")
        if sgn:
            body("mid_ng = tl.sum(tl.zeros([BT], dtype=tl.int32), axis=0)")
    if row_scale:
        body(f"rs = {' * '.join(row_scale)}")
        body(f"y = {c.dot('q_op', f'state_in.to({dt})')} * rs[:, None]")
    else:
        body(f"y = {c.dot('q_op', f'state_in.to({dt})')}")

    def key_block(diagonal: bool) -> None:
        """One key block j: the diagonal one (j == r) or, in the loop, j = r - jj < r."""
        loop = Emitter(indent=body.level)
        if not diagonal:
            loop("j = r - jj")
        for line in KEY_ROWS.splitlines():
            loop(line)
        inner = _Chunk(plan, loop)
        # the key block, loaded (under `QK_READ` false where q k^T may be read instead)
        key_lines = Emitter(indent=loop.level + int(shared))
        key = _Chunk(plan, key_lines).scaled(rec.key, "n", KEY_KT_TILE, KEY_T_TILE, "kT", "kj")
        if key is None:
            kt = Context(prog, KEY_KT_TILE, key_lines, "kj", c.ct)
            v = kt.value(rec.key, "kT_raw")
            key_lines(f"kT = tl.where(mask_n[:, None] & mask_key[None, :], {v}, 0.0).to({dt})")
            key = ("kT", None)
        if shared:   # the same order of work as without, when q k^T is formed here
            loop("if not QK_READ:")
            loop.lines.extend(key_lines.lines)
            with loop.block():
                loop(f"scores = {c.dot('q_op', 'kT')}")
        else:
            loop.lines.extend(key_lines.lines)
        val = inner.scaled(rec.value, "p", KEY_V_TILE, KEY_T_TILE, "vj", "vj")
        if val is None:
            vv = Context(prog, KEY_V_TILE, loop, "vj", c.ct)
            v = vv.value(rec.value, "vj_raw")
            loop(f"vj = tl.where(mask_key[:, None] & mask_p[None, :], {v}, 0.0).to({dt})")
            val = ("vj", None)
        if not shared:
            loop(f"scores = {c.dot('q_op', 'kT')}")
        if decay:
            if diagonal:   # the row block itself: its ld (and ng, lc, zc) are at hand
                loop("past = offs_c[None, :] <= offs_c[:, None]")
                if exact:
                    loop(f"gap = {segment('ld')}")
                elif resets:
                    loop("gap = " + with_resets("lc[:, None] - lc[None, :]",
                                                "zc[:, None] - zc[None, :]"))
                else:
                    loop("gap = lc[:, None] - lc[None, :]")
                count = segment("ng", "0")
            else:
                lt = Context(prog, KEY_T_TILE, loop, "lj", c.ct)
                v = lt.value(prog.log_decay, "ldk_raw")
                loop(f"ldk = tl.where(mask_key, {v}, 0.0)")
                if resets:   # the key block's steps after s, its resets counted apart
                    for line in split_resets("ldk", "rzk"):
                        loop(line)
                    loop("rzk_sum = tl.sum(rzk, axis=0)")
                loop("ldk_sum = tl.sum(ldk, axis=0)")
                if exact:
                    loop(f"excl = {after('ldk')}")
                elif resets:
                    loop("excl = " + with_resets("ldk_sum - tl.cumsum(ldk, axis=0)",
                                                 "rzk_sum - tl.cumsum(rzk, axis=0)"))
                else:
                    loop("excl = ldk_sum - tl.cumsum(ldk, axis=0)")
                loop(f"gap = {row_part}[:, None] + mid + excl[None, :]")
                loop("mid += " + (with_resets("ldk_sum", "rzk_sum") if resets else "ldk_sum"))
                if sgn:
                    v = lt.value(rec.decay, "dsk_raw")
                    loop(f"ngk = tl.where(mask_key, tl.where({v} < 0, 1, 0), 0)")
                    count = f"ngc[:, None] + mid_ng + ({after('ngk', '0')})[None, :]"
                    loop("mid_ng += tl.sum(ngk, axis=0)")
            factor = "tl.exp(tl.where(past, gap, float('-inf')))" if diagonal else "tl.exp(gap)"
            if sgn:
                loop(f"dec = {factor}")
                factor = signed("dec", count)
        else:
            factor = ("tl.where(offs_c[None, :] <= offs_c[:, None], 1.0, 0.0)" if diagonal
                      else "1.0")
        def scaled_by(rows, cols) -> str:
            rows, cols = [s for s in rows if s is not None], [s for s in cols if s is not None]
            return factor + "".join([f" * {s}[:, None]" for s in rows] + (
                [f" * ({' * '.join(cols)})[None, :]"] if cols else []))
        formed = scaled_by([query[1]], [key[1], val[1]])
        if shared:   # q k^T of the whole query and key, formed once per group (chunk_qk.py)
            loop("if QK_READ:")
            with loop.block():
                loop("scores = " + qk_load("ssmc_scores", "r * BT + offs_c", "j * BT + offs_c",
                                           "CS") + f" * {scaled_by([], [val[1]])}")
            loop("else:")
            with loop.block():
                loop(f"scores = scores * {formed}")
        else:
            loop(f"scores = scores * {formed}")
        loop(f"y += {c.dot(f'scores.to({dt})', 'vj')}")
        body.lines.extend(loop.lines)

    # the diagonal block, then the earlier key blocks of the chunk from the nearest back
    body("j = r")
    key_block(True)
    body("for jj in range(1, r + 1):")
    with body.block():
        key_block(False)


def reset_specialised(plan: Plan) -> bool:
    """Whether the output pass runs twice, once per chunk kind (`RESETS`): positive decays
    without n, whose chunks the state pass flags where they hold a reset. Counting resets in
    every chunk cost 25% of the SSD forward on an H200 (40% more time in this kernel: 214
    registers against 165); flagged, the chunks without one run the plain running sums."""
    prog = plan.program
    return prog.log_decay is not None and prog.decay_log_safe and not per_key_decay(plan)


def _join_segment(plan: Plan, body: Emitter) -> None:
    """A segmented state pass stored each chunk's state from its segment's start: add the
    state entering the segment times the decay from there (chunked_segments.py)."""
    body("if SEGMENTED:")
    with body.block():
        body("state_in = state_in.to(tl.float32)")   # one type on both sides of the branch
        body("sg = (cs0 // CS) // SEG")
        body("if sg > 0:")
        with body.block():
            body("seg_in = tl.load(seg_state_ptr + (((seq * NSEG + sg) * H + h_idx) * N"
                 " + offs_n[:, None]) * P + offs_p[None, :], mask=mask_n[:, None]"
                 " & mask_p[None, :], other=0.0)")
            body(seg.fixup_line(decay_kind(plan), "state_in"))


def _output_body(plan: Plan, resets: bool) -> Emitter:
    body = Emitter(indent=1)
    c = _Chunk(plan, body)
    body("state_in = tl.load(states_ptr + ((chunk * H + h_idx) * N + offs_n[:, None]) * P"
         " + offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :], other=0.0)")
    _join_segment(plan, body)
    if per_key_decay(plan):
        c.value()
        output_body(KeyOps(plan, body), "value")
    else:
        _scalar_decay_body(plan, c, body, resets)
    body("y_mask = mask_t[:, None] & mask_p[None, :]")
    emit_output(body, plan.program, V_TILE, c.ct, "t_row[:, None]", "offs_p[None, :]",
                "y_mask")
    return body


OUT_PARAMS = """
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, states_ptr, resets_ptr, ssmc_scores, cu_ptr, chunk_off_ptr, chunk_seq_ptr,
    seg_state_ptr, chunk_prod_ptr,
    T, HPG, N, P, GH, NSEG, SEG,
    BT: tl.constexpr, CS: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, NPB: tl.constexpr,
    REVERSE: tl.constexpr, COLUMN: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACCUM_IN: tl.constexpr, WRITE_OUT: tl.constexpr, SEGMENTED: tl.constexpr,
    QK_READ: tl.constexpr,"""

#: row blocks (with their flags) one program of the counting pass walks
RESET_ROWS_PER_PROGRAM = 16


def _row_block(plan: Plan, chunk: str, body: Emitter, level: int) -> str:
    """One row block of the output pass (the program's `chunk`, row block r), at `level`."""
    setup = chunk_setup(True, "cu_ptr", "chunk_off_ptr", "chunk_seq_ptr", chunk, "CS", "cs0")
    return "\n".join([indent(textwrap.dedent(setup), level),
                      indent("r = pid0 % R\nc0 = cs0 + r * BT\nif c0 < length:", level),
                      indent(rows(), level + 1), indent(textwrap.dedent(body.text()), level + 1)])


def out_params(plan: Plan) -> str:
    """The output pass's parameters (every kernel of it, and its row-block functions)."""
    return f"{input_params(plan.program)}, {prefix_params(plan)}{OUT_PARAMS}"


def _block_function(plan: Plan, name: str, body: Emitter) -> str:
    """One row block `pid0` of the output pass as a function of the kernel's parameters: the
    kernels call it once per row block, a pair of orders' kernels twice (chunked_pairs.py)."""
    return f'''
@triton.jit
def {name}({out_params(plan)}
    pid0,
):
    R = CS // BT
{_row_block(plan, "pid0 // R", body, 1)}
'''


def render_output_kernel(plan: Plan) -> str:
    """The output pass; for `reset_specialised` plans two kernels: the plain running sums on
    the chunks the state pass did not flag, and `ssmc_chunked_out_resets_fwd`, counting resets
    on the flagged ones, RESET_ROWS_PER_PROGRAM row blocks per program (one vector load of
    their flags, so a run without resets costs it little). Each row block is a function
    (`_block_function`) that the kernels of a pair of orders call too."""
    params = out_params(plan)
    names = param_names(params)
    if not reset_specialised(plan):
        return _block_function(plan, OUT_BLOCK, _output_body(plan, True)) + f'''
@triton.jit
def ssmc_chunked_out_fwd({params}
):
    {block_call(OUT_BLOCK, names, "tl.program_id(0).to(tl.int64)")}
'''
    return (_block_function(plan, OUT_PLAIN, _output_body(plan, False))
            + _block_function(plan, OUT_COUNTING, _output_body(plan, True)) + f'''
@triton.jit
def ssmc_chunked_out_fwd({params}
):
    pid0 = tl.program_id(0).to(tl.int64)
    if {flag_of("resets_ptr", "pid0")} == 0:
        {block_call(OUT_PLAIN, names, "pid0")}


@triton.jit
def ssmc_chunked_out_resets_fwd({params}
    NROWS, ROWS: tl.constexpr,
):
    R = CS // BT
    first = tl.program_id(0).to(tl.int64) * ROWS
    blocks = first + tl.arange(0, ROWS)
    flags = tl.load(resets_ptr + (blocks // R) * tl.num_programs(1) + tl.program_id(1),
                    mask=blocks < NROWS, other=0)
    if tl.max(flags, axis=0) != 0:
        for i in range(0, ROWS):
            pid0 = first + i
            if pid0 < NROWS:
                if {flag_of("resets_ptr", "pid0")} != 0:
                    {block_call(OUT_COUNTING, names, "pid0")}
''')


def render(plan: Plan) -> str:
    scores = (render_scores_kernel(plan) + prefix.render_prefix_kernel(plan)
              if per_key_decay(plan) else render_qk_kernel(plan) if shares_qk(plan) else "")
    pairs = render_pair_kernels(plan, out_params(plan), reset_specialised(plan))
    return (HEADER + render_state_kernel(plan) + "\n" + render_output_kernel(plan) + pairs
            + scores)
