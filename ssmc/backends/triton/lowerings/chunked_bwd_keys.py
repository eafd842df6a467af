"""The chunked backward for decays that vary over the key dim: tensor-core products per chunk.

Notation as in chunked_bwd.py; chunks of CS steps in row blocks of BT (16). Per chunk and head:

* `ssmc_chunked_bwd_keys_prep` (whole chunk, per n-block): the products over p, once: dA =
  dy v^T on the causal half, the state terms exp(decay from the chunk's start) (dy S_in^T)
  into dq and exp(decay to its end) (v G^T) into dk, and sum_p G * S_end;
* `ssmc_chunked_bwd_keys` (per n-block) walks the chunk's row blocks from the last to the
  first. For row block i: its own pairs in the forward's levels of the diagonal block
  (chunked_keys.py), two tensor-core products per level (`_Kernel.own_pairs`); earlier
  key blocks j < i (dq): the weight factors through block i's start, as in the forward
  (chunked_keys.py): dq_i += exp(lc_i) * (dA_ij (k_j exp(rest_j))), one matmul per block;
  later query blocks j > i (dk): dk_i += exp(rest_i) * (dA_ji^T (q_j exp(lc_j))); and the
  decay gradient: dL/dl_r = sum over the pairs s < r <= u of M[u, s] = dA[u, s] q_u D[u, s]
  k_s (the pairs whose weight the decay at r enters), s running from the entering state and u
  to the leaving one (sum_p G * S_end, S_end the next chunk's entering state or the final
  state). Summed over rectangles, not as the suffix sum of q dq - k dk: that difference counts
  every pair with both ends after r twice, with opposite signs, and its rounding residue grew
  with the chunk (64 steps) to 20x the scan's error;
* `ssmc_chunked_bwd_keys_dv` (whole chunk, per p-block): dv = A^T dy + (k exp(decay to the
  end)) G, A the chunk's scores (chunked_keys.py).

Every exponent is a sum of log-decays over steps of the chunk, resets split out (exactly 0
across one). Both factors of a factored weight are themselves weights between steps of the
chunk (chunked_keys.py), so they stay in fp32's range wherever the gradients do; fp16 operands
(65504) take the factored products in fp32.
"""
from __future__ import annotations

from ....plan import Plan
from ..common import input_params
from ..render import Emitter
from ..templates import chunk_setup, indent, rows, with_resets
from .chunked import _Chunk
from .chunked_bwd import _Ops, store_y
from . import chunked_prefix as prefix
from .chunked_prefix import RunningSums
from .chunked_keys import (KeyOps, diagonal_levels, level_factors, narrow_operands,
                           output_body)
from .chunked_tiles import (KEY_QK_TILE, KEY_ROWS, QK_TILE, V_TILE,
                            BlockOperands)

PARAMS = ("ssmc_cu, ssmc_chunk_off, ssmc_chunk_seq,\n    B, T, HPG, N, P, GH,\n"
          "    BT: tl.constexpr, CS: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,\n"
          "    REVERSE: tl.constexpr, COLUMN: tl.constexpr, IS_VARLEN: tl.constexpr,")
STATE_TILE = ("((chunk * H + h_idx) * N + offs_n[:, None]) * P + offs_p[None, :]",
              "mask_n[:, None] & mask_p[None, :]")


def _p_block(body: Emitter) -> None:
    body("offs_p = p0 + tl.arange(0, BP)")
    body("mask_p = offs_p < P")


def _dy(body: Emitter, name: str, t: str, mask: str) -> None:
    body(f"{name} = tl.load(ssmc_dy + ((b_idx * T + {t}[:, None]) * H + h_idx) * P"
         f" + offs_p[None, :], mask={mask}[:, None] & mask_p[None, :], other=0.0)")


def _state(body: Emitter, name: str, ptr: str, chunk: str = "chunk") -> None:
    off, mask = STATE_TILE
    body(f"{name} = tl.load({ptr} + {off.replace('chunk', chunk)}, mask={mask}, other=0.0)")


def _dA_block(rows_: str, cols: str) -> str:
    """Block (rows_, cols) of the chunk's dA = dy v^T (`render_keys_prep_kernel`)."""
    return (f"tl.load(ssmc_dA + ((chunk * H + h_idx) * CS + {rows_} * BT + offs_c[:, None]) * CS"
            f" + {cols} * BT + offs_c[None, :])")


class _Kernel:
    def __init__(self, plan: Plan, body: Emitter):
        self.plan, self.body = plan, body
        self.o = _Ops(plan, body)
        self.prog, self.ct = plan.program, self.o.ct
        # the factored products' operand type: fp16 would overflow where fp32 does not
        self.ft = "tl.float32" if narrow_operands(self.o.dt) else self.o.dt

    def fdot(self, a: str, b: str) -> str:
        return f"tl.dot(({a}).to({self.ft}), ({b}).to({self.ft}){self.o.prec})"

    def block(self, tile, tag: str, suffix: str) -> BlockOperands:
        return BlockOperands(self.prog, self.ct, self.body, tile, tag, suffix)

    def other_rows(self) -> None:
        for line in KEY_ROWS.splitlines():
            self.body(line)

    def sums(self, suffix: str, rows_: str, counts_only: bool = False) -> RunningSums:
        return RunningSums(self.plan, self.body, suffix, rows_, counts_only=counts_only)

    def block_sums(self) -> None:
        """Block i's stored running sums (from its start: `L`; resets from the chunk's: `Z`),
        with `Z_prev`, the resets before the block, `lcf`, the exponent from its start, and
        `lrL`, the sums to its end (resets apart)."""
        b = self.body
        self.rows = self.sums("", "i * BT + offs_c")
        prev = self.sums("P", "tl.maximum(i * BT - 1, 0)", counts_only=True)
        b(f"Z_prev = tl.where(i > 0, {prev.Z}, 0.0)")   # block 0: no step before it
        b(f"lcf = {with_resets(self.rows.L, f'{self.rows.Z} - Z_prev[None, :]')}")
        b(f"lrL = {prefix.to_chunk_end('at', block=True)}")

    def own_block(self) -> None:
        """Block i's operands, its own pairs and the state terms the prep kernel left in dq
        and dk."""
        b, o = self.body, self.o
        o.operand("query", "query")
        o.operand("key", "key")
        self.block_sums()
        self.own_pairs()
        # the terms from outside the chunk (`render_keys_prep_kernel`), then the other blocks'
        b("dq_x = tl.load(ssmc_dq + row * N + offs_n[None, :], mask=nmask, other=0.0)")
        b("dk_x = tl.load(ssmc_dk + row * N + offs_n[None, :], mask=nmask, other=0.0)")

    def own_pairs(self) -> None:
        """The pairs (u, s) inside block i, in the forward's levels of its diagonal
        (`chunked_keys.level_factors`): per level, `dq_in` += f_row (dA_l (k f_key)) and
        `dk_in` += f_key (dA_l^T (q f_row)), dA_l the level's pairs of dA's diagonal block;
        the pairs u = s (weight 1) elementwise. Then `rect`, the decay gradient's pairs inside
        the block: rect[r] = sum over s < r <= u of M[u, s], M = dA D q k (the pairs whose
        weight the decay at r enters), the suffix sum of q dq_in - k dk_in: the pairs with both
        ends at r or later cancel in it, but only within the block's 16 steps."""
        b = self.body
        b(f"dA_blk = {_dA_block('i', 'i')}")
        b("da_diag = tl.load(ssmc_dA + ((chunk * H + h_idx) * CS + i * BT + offs_c) * CS"
          " + i * BT + offs_c)")
        b("dq_in = da_diag[:, None] * key")
        b("dk_in = da_diag[:, None] * query")

        def level():
            level_factors(self.plan, b, self.rows, "i * BT")
            b("dA_l = tl.where(lv_pairs, dA_blk, 0.0)")
            b(f"dq_in += f_row * {self.fdot('dA_l', 'key * f_key')}")
            b(f"dk_in += f_key * {self.fdot('tl.trans(dA_l)', 'query * f_row')}")
        diagonal_levels(b, level)
        b("rect = tl.cumsum(query * dq_in - key * dk_in, axis=0, reverse=True)")

    def earlier_keys(self) -> None:
        """dq's terms from the key blocks before block i, nearest first: each key's decay to
        the step before block i is its sum to its block's end plus the blocks between."""
        b = self.body
        b(f"dqx = tl.zeros([BT, BN], dtype={self.ct})")
        b(f"mid = tl.zeros([BN], dtype={self.ct})")
        b("for jj in range(1, i + 1):")
        with b.block():
            b("j = i - jj")
            self.other_rows()
            blk = self.block(KEY_QK_TILE, "kj", "k")
            kj = blk.operand("key", "kj")
            keys = self.sums("K", "j * BT + offs_c", counts_only=True)
            tot = prefix.block_total(b, "T_j", "j * BT + BT - 1")
            later = prefix.to_chunk_end("atK", block=True)
            rest = with_resets(f"{later} + mid[None, :]", f"Z_prev[None, :] - {keys.Z}")
            b(f"kf = {kj} * tl.exp({rest})")
            b(f"dAj = {_dA_block('i', 'j')}")   # [u in i, s in j]
            b(f"dqx += {self.fdot('dAj', 'kf')}")
            b(f"mid += {tot}")
        b("dq_x += tl.exp(lcf) * dqx")

    def later_queries_dk(self) -> None:
        """dk's terms from the query blocks after block i: each through the step before
        query block j, with the decay from there (qf) and to there (kfac)."""
        b = self.body
        b(f"mid = tl.zeros([BN], dtype={self.ct})")
        b("for j in range(i + 1, R):")
        with b.block():
            self.other_rows()
            q = self.block(KEY_QK_TILE, "qj", "qj").operand("query", "q_qj")
            queries = self.sums("Q", "j * BT + offs_c")
            prev = self.sums("Jp", "j * BT - 1", counts_only=True)   # the step before j
            since = queries.resets_since(prev, "", "[None, :]")
            b(f"qf = {q} * tl.exp({with_resets(queries.L, since)})")
            b(f"kfac = tl.exp({with_resets('lrL + mid[None, :]', f'{prev.Z}[None, :] - Z')})")
            b(f"dAj = {_dA_block('j', 'i')}")   # [u in j, s in i]
            b(f"dk_x += kfac * {self.fdot('tl.trans(dAj)', 'qf')}")
            b(f"mid += {prefix.block_total(b, 'T_j', 'j * BT + BT - 1')}")

    def decay_gradient(self) -> None:
        """dl_r = sum of M over the pairs s < r <= u (module docstring), block i's part of
        them in four pieces: both in the block (`rect`); u in it, s before it (q dq_x); s in it,
        u after it (k dk_x); and s before, u after it (`carry`, kept from block i + 1's: the
        pairs across block i + 1 gained, those leaving from block i lost). In the compute
        type: these sums in float64 left fp32 GLA's dg 6.86e-7 off float64 against 6.96e-7
        in fp32 (relative L2; bf16 unchanged at 5.19e-3) and took 8% of the kernel (H100,
        b=8 t=2048 h=16 n=p=128: 1.96 ms against 1.80)."""
        b = self.body
        b("a = query * dq_x")
        b("k_out = key * dk_x")
        b("carry += a_next - tl.sum(k_out, axis=0)")
        b("dl = (rect + tl.cumsum(a, axis=0, reverse=True)"
          " + (tl.cumsum(k_out, axis=0) - k_out) + carry[None, :])")
        # a reset step's decay is exactly 0 in every kernel: its log-decay's gradient is 0
        # (`ChainRule.input_grads`, resets_zeroed), not the other pairs' rounding residue.
        # The reset count rises at it; the row before block i's first is Z_prev's
        before = self.sums("B", "tl.maximum(i * BT + offs_c - 1, 0)", counts_only=True)
        b(f"Z_before = tl.where(offs_c[:, None] > 0, {before.Z}, Z_prev[None, :])")
        b(f"dl = tl.where({self.rows.Z} > Z_before, 0.0, dl)")
        b("a_next = tl.sum(a, axis=0)")
        for name, v in (("dq", "dq_in + dq_x"), ("dk", "dk_in + dk_x"), ("dl", "dl")):
            b(f"tl.store(ssmc_{name} + row * N + offs_n[None, :], {v}, mask=nmask)")


def _block_walk(body: Emitter) -> None:
    """Row block i of the chunk, walked from the last to the first."""
    body("i = R - 1 - ii")
    body("c0 = cs0 + i * BT")
    for line in rows().splitlines():
        body(line)
    body("row = (b_idx * T + t_row[:, None]) * H + h_idx")
    body("nmask = mask_t[:, None] & mask_n[None, :]")


def render_keys_prep_kernel(plan: Plan) -> str:
    """The products over p the dq/dk kernel needs, once per (chunk, head, n-block), the whole
    chunk (BT = CS rows): dA = dy v^T on the causal half (stored by the first n-block); the
    terms from outside the chunk, exp(decay from its start) (dy S_in^T) into dq and
    exp(decay to its end) (v G^T) into dk; and sum_p G * S_end into `ssmc_gs`, S_end the state
    leaving the chunk."""
    body = Emitter(indent=1)
    o = _Ops(plan, body)
    b, ct = body, o.ct
    b(f"dA = tl.zeros([BT, BT], dtype={ct})")
    b(f"dyS = tl.zeros([BT, BN], dtype={ct})")
    b(f"vG = tl.zeros([BT, BN], dtype={ct})")
    b(f"gs = tl.zeros([BN], dtype={ct})")
    b("for p0 in range(0, P, BP):")
    with b.block():
        _p_block(b)
        _dy(b, "dy", "t_row", "mask_t")
        v = BlockOperands(o.prog, ct, b, V_TILE, "v", "v").operand("value", "value")
        _state(b, "S_in", "ssmc_states")
        _state(b, "G", "ssmc_dstates")
        b("if cs0 + CS >= length:")
        with b.block():
            _state(b, "S_end", "ssmc_finals", "seq")
        b("else:")
        with b.block():
            _state(b, "S_end", "ssmc_states", "(chunk + 1)")
        b(f"dA += {o.dot('dy', f'tl.trans({v})')}")
        b(f"dyS += {o.dot('dy', 'tl.trans(S_in)')}")
        b(f"vG += {o.dot(v, 'tl.trans(G)')}")
        b("gs += tl.sum(G * S_end, axis=1)")
    b("if pid_n == 0:")
    with b.block():
        b("tl.store(ssmc_dA + ((chunk * H + h_idx) * CS + offs_c[:, None]) * CS"
          " + offs_c[None, :], tl.where(offs_c[:, None] >= offs_c[None, :], dA, 0.0))")
    o.stored_decay()
    b("row = (b_idx * T + t_row[:, None]) * H + h_idx")
    b("nmask = mask_t[:, None] & mask_n[None, :]")
    b("tl.store(ssmc_dq + row * N + offs_n[None, :], tl.exp(lcf) * dyS, mask=nmask)")
    b("tl.store(ssmc_dk + row * N + offs_n[None, :], tl.exp(lr) * vG, mask=nmask)")
    b("tl.store(ssmc_gs + (chunk * H + h_idx) * N + offs_n, gs, mask=mask_n)")
    return _chunk_kernel("ssmc_chunked_bwd_keys_prep", plan,
                         "ssmc_dy, ssmc_states, ssmc_dstates, ssmc_finals, ssmc_dA, ssmc_gs, "
                         "ssmc_dq, ssmc_dk", " NPB: tl.constexpr,", body, split_n=True)


def render_keys_kernel(plan: Plan) -> str:
    """dq, dk and d log-decay: a program per (chunk, head, n-block): every term of them is
    per key channel, given dA (all of p); dv, which needs A summed over all of n, is
    `ssmc_chunked_bwd_keys_dv`'s. Apart, each keeps its registers (one kernel for both held
    too many tiles at n = 128 and spilled)."""
    body = Emitter(indent=2)
    k = _Kernel(plan, body)
    _block_walk(body)
    k.own_block()
    k.earlier_keys()
    k.later_queries_dk()
    k.decay_gradient()
    # sum_p G * S_end, S_end the state leaving the chunk (`render_keys_prep_kernel`)
    prelude = ("    carry = tl.load(ssmc_gs + (chunk * H + h_idx) * N + offs_n, mask=mask_n,"
               f" other=0.0)\n    a_next = tl.zeros([BN], dtype={k.ct})")
    return _walking_kernel(
        "ssmc_chunked_bwd_keys", plan,
        "ssmc_dA, ssmc_gs, ssmc_dq, ssmc_dk, ssmc_dl", " NPB: tl.constexpr,", True, prelude,
        body)


def _kernel(name: str, plan: Plan, args: str, extra: str, split_n: bool, text: str) -> str:
    """A kernel over (chunk, head, block): its signature and chunk set-up, then `text`."""
    setup = chunk_setup(split_n, "ssmc_cu", "ssmc_chunk_off", "ssmc_chunk_seq",
                        "tl.program_id(0).to(tl.int64)", "CS", "cs0")
    return f"""
@triton.jit
def {name}(
    {input_params(plan.program)}, {prefix.PARAMS}
    {args},
    {PARAMS}{extra}
):
{setup}
{text}
"""


def _walking_kernel(name: str, plan: Plan, args: str, extra: str, split_n: bool,
                    prelude: str, body: Emitter) -> str:
    """A kernel whose `body` walks the chunk's row blocks from the last (`_block_walk`)."""
    # the block count in int32: an int64 one made every row offset of the walk int64 (GLA
    # n=128 bf16, Triton 3.6 sm_90a: 208 registers against 166)
    return _kernel(name, plan, args, extra, split_n, f"""    R = tl.cdiv(tl.minimum(CS, length - cs0), BT).to(tl.int32)
{prelude}
    for ii in range(0, R):
{body.text()}""")


def _chunk_kernel(name: str, plan: Plan, args: str, extra: str, body: Emitter,
                  split_n: bool = False) -> str:
    """A kernel whose `body` takes the whole chunk (BT = CS rows)."""
    return _kernel(name, plan, args, extra, split_n,
                   f"    c0 = cs0\n{indent(rows(), 1)}\n{body.text()}")


def render_keys_dv_kernel(plan: Plan) -> str:
    """dv = A^T dy + (k exp(decay to the chunk's end)) G, A the chunk's scores
    (chunked_keys.py) and G the gradient of the state leaving it; the second product over n
    in blocks of BN (BK_bwd), which keeps the key's decay tiles few."""
    body = Emitter(indent=1)
    k = KeyOps(plan, body)
    _dy(body, "dy", "t_row", "mask_t")
    scores_t = k.scores_tile("T")
    body(f"dv = {k.dot(f'{scores_t}.to({k.dt})', f'dy.to({k.dt})')}")
    body("for n0 in range(0, N, BN):")
    with body.block():
        body("offs_n = n0 + tl.arange(0, BN)")
        body("mask_n = offs_n < N")
        blk = BlockOperands(k.prog, k.ct, body, QK_TILE, "qk", "")
        key = blk.operand("key", "key")
        sums = RunningSums(plan, body, "", "offs_c", counts_only=True)
        end = RunningSums(plan, body, "E", "CS - 1", counts_only=True)
        later = prefix.to_chunk_end("at")
        to_end = (f"tl.exp({with_resets(later, end.resets_since(sums, '[None, :]'))})"
                  f"{end.sign(sums, '[None, :]')}")
        _state(body, "G", "ssmc_dstates")
        body(f"dv += {k.dot(f'{key} * {to_end}', 'G', k.ft)}")
    body("tl.store(ssmc_dv + ((b_idx * T + t_row[:, None]) * H + h_idx) * P"
         " + offs_p[None, :], dv, mask=mask_t[:, None] & mask_p[None, :])")
    return _chunk_kernel("ssmc_chunked_bwd_keys_dv", plan,
                         "ssmc_dy, ssmc_dstates, ssmc_scores, ssmc_dv", "", body)


def render_keys_y_kernel(plan: Plan) -> str:
    """y before the epilogue (summed over directions into an fp32 buffer), as the forward's
    output pass forms it, from the states and scores the backward's forward pass saved."""
    body = Emitter(indent=1)
    c = _Chunk(plan, body)
    _state(body, "state_in", "ssmc_states")
    c.value()
    output_body(KeyOps(plan, body), "value")
    store_y(body)
    return _chunk_kernel("ssmc_chunked_bwd_y", plan,
                         "ssmc_y, ssmc_states, ssmc_scores",
                         " ACCUM_IN: tl.constexpr,", body)
