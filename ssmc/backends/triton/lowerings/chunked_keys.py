"""The chunked lowering for decays that vary over the key dim (GLA-class gates).

L[t, n] the running sums of the log-decays from the chunk's start, with their resets counted
apart in Z (`templates.split_resets`: a zero or underflowing decay, so exp of a sum is exactly
0 across one), formed once per chunk by `ssmc_chunked_prefix` (stored from each row block's
start: chunked_prefix.py). Key s is seen from row t of its chunk with the weight
exp(L_t - L_s), per n, so the chunk's decayed scores A[t, s] = sum_n q_t k_s exp(...) do not
depend on p: `ssmc_chunked_scores` forms them once per (chunk, head) into a buffer (fp32,
fp64 for fp64 plans), one program per row block r of BT (16) steps, in two launches (diagonal
blocks, then the earlier ones, so that neither program holds the other's tiles):

* the diagonal block, in log2(BT) levels (`level_factors`): at half-width g (BT / 2 down to
  1) the block's rows fall into groups of 2g steps, and the pairs (t, s) with t in the second
  half of a group and s in its first factor through m, the last step of the first half:
  exp(L_t - L_s) = exp(L_t - L_m) exp(L_m - L_s), one tensor-core product per level,
  (q exp(L - L_m)) (k exp(L_m - L))^T on those pairs. Every pair t > s of the block lies in
  exactly one level; t = s has weight 1 (`diagonal_scores`). As in the earlier blocks, the
  factors' exponents are sums over disjoint steps;
* an earlier key block j < r: the weight factors through the step before row block r,
  exp(L_t - L_ref) * exp(L_ref - L_s), so its scores are one tensor-core matmul,
  (q exp(L - L_ref)) (k exp(L_ref - L))^T. Both exponents are sums of log-decays over
  disjoint steps, each <= 0 for decays of size at most 1, so neither factor overflows and the
  product is the weight (an underflowing factor means an underflowing weight).

The output pass then takes the whole chunk (CS rows) per (chunk, head, p-block), and is two
tensor-core products: y = (q exp(L)) S_in + A v. The backward's dv is A^T dy + (k exp(decay
to the chunk's end)) G the same way.

Decays larger than 1 in size (log-decay > 0) make factors above 1. Each factor is itself the
weight between two steps of the chunk (the key factor is the weight of s seen from the step
before block r, or from the level's m; the row factor that of that step seen from t), so in a
type with fp32's range a factor overflows only where a weight the output needs does. fp16
operands stop at 65504: their factored products are taken in fp32. Negative decays carry
their sign as the parity of their count in each factor's range, split the same way.
"""
from __future__ import annotations

from ....plan import Plan
from ..common import compute_type, dot_type, input_params, precision_arg
from ..render import Emitter, Tile
from ..templates import chunk_setup, indent, rows, with_resets
from .chunked_tiles import FIXED, KEY_KT_TILE, KEY_ROWS, QK_TILE, T_AXIS, BlockOperands
from . import chunked_prefix as prefix
from .chunked_prefix import RunningSums


def level_factors(plan: Plan, body: Emitter, rows_: RunningSums, first: str,
                  keys: tuple[str, str] = ("offs_n", "mask_n")) -> None:
    """One level of a row block's diagonal (module docstring), its half-width `lv_g` in scope,
    for the block's rows from chunk position `first` with sums `rows_` over `keys`: `f_row`,
    the weight of each row's reference step m seen from it (rows in the second half of their
    group, else 0), `f_key`, that of each key seen from its m (first halves, else 0), and
    `lv_pairs`, the level's (t, s). A row is one or the other, so one exponential serves both
    (the span (m, t] or (t, m], the exponent's sign flipped); the other is 0 by a select,
    never a product with an overflowed factor."""
    body("lv_rel = offs_c % (2 * lv_g)")
    body("lv_hi = lv_rel >= lv_g")
    body("offs_m = offs_c - lv_rel + lv_g - 1")
    mid = RunningSums(plan, body, "Lv", f"{first} + offs_m", keys=keys)
    after = with_resets(f"{rows_.L} - {mid.L}", rows_.resets_since(mid))
    body(f"f_lv = tl.exp(tl.where(lv_hi, 1.0, -1.0)[:, None] * ({after})){rows_.sign(mid)}")
    body("f_row = tl.where(lv_hi[:, None], f_lv, 0.0)")
    body("f_key = tl.where(lv_hi[:, None], 0.0, f_lv)")
    body("lv_pairs = ((offs_c[:, None] - lv_rel[:, None] == offs_c[None, :] - lv_rel[None, :])"
         " & lv_hi[:, None] & (lv_rel[None, :] < lv_g))")


def diagonal_levels(body: Emitter, per_level) -> None:
    """The levels of a row block's diagonal, half-widths BT / 2 down to 1, as a loop;
    `per_level()` emits a level's work."""
    body("lv_g = BT // 2")
    body("while lv_g > 0:")
    with body.block():
        per_level()
        body("lv_g = lv_g // 2")


#: the row block's (t, n-slice) view: the scores' diagonal block takes n a slice at a time
SLICE_TILE = Tile([T_AXIS, ("n", "offs_nd", "mask_nd")], FIXED)


def diagonal_scores(k: "KeyOps") -> None:
    """The diagonal block's scores (module docstring), stored whole: q_t k_t on its diagonal,
    the levels' tensor-core products below it, 0 above. BND key dims at a time, each slice's
    operands and sums loaded once for all levels: whole (BT, BN) tiles held 229 registers at
    n = 128 (bf16, 2 warps, ptxas sm_90a), slices of 32 168 (`SCORES_SLICE`)."""
    prog, body, ct = k.prog, k.body, k.ct
    body(f"a_blk = tl.zeros([BT, BT], dtype={ct})")
    body(f"a_diag = tl.zeros([BT], dtype={ct})")
    body("for nd in range(0, BN, BND):")
    with body.block():
        body("offs_nd = nd + tl.arange(0, BND)")
        body("mask_nd = offs_nd < N")
        blk = BlockOperands(prog, ct, body, SLICE_TILE, "qd", "_d")
        q = blk.operand("query", "q_d")
        kk = blk.operand("key", "k_d")
        keys = ("offs_nd", "mask_nd")
        sums = RunningSums(k.plan, body, "_d", "r * BT + offs_c", keys=keys)
        body(f"a_diag += tl.sum({q} * {kk}, axis=1)")

        def level():
            level_factors(k.plan, body, sums, "r * BT", keys)
            body("a_blk += tl.where(lv_pairs, "
                 + k.dot(f"{q} * f_row", f"tl.trans({kk} * f_key)", k.ft) + ", 0.0)")
        diagonal_levels(body, level)
    body("tl.store(a_ptr + r * BT, tl.where(offs_c[:, None] == offs_c[None, :], a_diag[:, None],"
         " a_blk))")
    body("for ju in range(r + 1, CS // BT):   # above the diagonal: zeros, a buffer fully written")
    body("    tl.store(a_ptr + ju * BT, tl.zeros([BT, BT], dtype=ssmc_scores.dtype.element_ty))")


def narrow_operands(dt: str) -> bool:
    """Whether matmul operands of type `dt` have a range below fp32's (module docstring)."""
    return dt == "tl.float16"


class KeyOps:
    """Types and products of the per-key kernels."""

    def __init__(self, plan: Plan, body: Emitter):
        self.plan, self.prog, self.body = plan, plan.program, body
        self.ct, self.dt = compute_type(plan), dot_type(plan)
        # the factored products' operand type: fp16 would overflow where fp32 does not
        self.ft = "tl.float32" if narrow_operands(self.dt) else self.dt
        self.prec = precision_arg(plan)

    def dot(self, a: str, b: str, dtype: str | None = None) -> str:
        if dtype is None:
            return f"tl.dot({a}, {b}{self.prec})"
        return f"tl.dot(({a}).to({dtype}), ({b}).to({dtype}){self.prec})"

    def scores_tile(self, which: str = "") -> str:
        """The chunk's A (CS, CS) from the scores buffer, rows t >= columns s only (`which`
        "T": transposed, A^T[s, t])."""
        rows_, cols = ("offs_c[:, None]", "offs_c[None, :]")
        if which == "T":
            rows_, cols = cols, rows_
        mask = f"({cols} <= {rows_}) & mask_t[:, None] & mask_t[None, :]"
        return (f"tl.load(ssmc_scores + ((chunk * H + h_idx) * CS + {rows_}) * CS + {cols}, "
                f"mask={mask}, other=0.0)")


def _scores_row_block(k: KeyOps) -> None:
    """Row block r's scores against key blocks j <= r (module docstring), each stored into
    the buffer."""
    prog, ct, body = k.prog, k.ct, k.body
    sgn = prog.decay_signed
    body("if DIAG:")
    with body.block():
        diagonal_scores(k)
        body("return")
    row = BlockOperands(prog, ct, body, QK_TILE, "qk", "")
    query = row.operand("query", "query")
    # the reference: the step before the row block (r >= 1 here), from which the block's own
    # sums run; key block j's factor is its sums to its end plus the blocks up to r
    sums = RunningSums(k.plan, body, "", "r * BT + offs_c")
    ref = RunningSums(k.plan, body, "R", "r * BT - 1", counts_only=True)
    since_ref = with_resets(sums.L, sums.resets_since(ref, "", "[None, :]"))
    body(f"q_op = ({query} * tl.exp({since_ref}){sums.sign(ref, '', '[None, :]')}).to({k.ft})")
    body(f"mid = tl.zeros([BN], dtype={ct})")
    body("for jj in range(1, r + 1):")
    with body.block():
        body("j = r - jj")
        for line in KEY_ROWS.splitlines():
            body(line)
        blk = BlockOperands(prog, ct, body, KEY_KT_TILE, "kj", "k")   # (n, t): no transpose
        kT = blk.operand("key", "kT", k.ft)
        keys = RunningSums(k.plan, body, "K", "j * BT + offs_c", transposed=True)
        tot = prefix.block_total(body, "tot", "j * BT + BT - 1")
        rest = with_resets(f"({tot}[:, None] - {keys.L}) + mid[:, None]",
                           ref.resets_since(keys, "[:, None]"))
        body(f"kT_op = ({kT} * tl.exp({rest}){ref.sign(keys, '[:, None]')}).to({k.ft})")
        body(f"tl.store(a_ptr + j * BT, {k.dot('q_op', 'kT_op')})")
        body(f"mid += {tot}")


#: the scores kernel's pointer and size arguments, after the inputs'
SCORES_PARAMS = """ssmc_scores, ssmc_cu, ssmc_chunk_off, ssmc_chunk_seq,
    T, HPG, N, P, GH,
    BT: tl.constexpr, CS: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BND: tl.constexpr,
    DIAG: tl.constexpr, REVERSE: tl.constexpr, COLUMN: tl.constexpr, IS_VARLEN: tl.constexpr,"""


def render_scores_kernel(plan: Plan) -> str:
    """`ssmc_chunked_scores`: a program per (chunk row block, head); launched with
    `launch_scores`. Every entry of the buffer is written (zeros above the diagonal and in row
    blocks past a sequence's end), so that a kept one needs no zero fill first."""
    body = Emitter(indent=2)
    _scores_row_block(KeyOps(plan, body))
    setup = chunk_setup(False, "ssmc_cu", "ssmc_chunk_off", "ssmc_chunk_seq",
                        "tl.program_id(0).to(tl.int64) // RB", "CS", "cs0")
    return f"""
@triton.jit
def ssmc_chunked_scores(
    {input_params(plan.program)}, {prefix.PARAMS}
    {SCORES_PARAMS}
):
    if DIAG:
        RB = CS // BT
    else:   # the row blocks with earlier key blocks: r >= 1
        RB = CS // BT - 1
{setup}
    r = tl.program_id(0).to(tl.int64) % RB + (0 if DIAG else 1)
    c0 = cs0 + r * BT
    # row block r's rows of the chunk's scores, key block j at a_ptr + j * BT
    a_ptr = (ssmc_scores + ((chunk * H + h_idx) * CS + r * BT + offs_c[:, None]) * CS
             + offs_c[None, :])
    if c0 < length:
{indent(rows(), 2)}
{body.text()}
    elif DIAG:   # a row block past its sequence's end: zeros across the chunk
        for jz in range(0, CS // BT):
            tl.store(a_ptr + jz * BT, tl.zeros([BT, BT], dtype=ssmc_scores.dtype.element_ty))
"""


#: the warps of the scores kernel's diagonal and off-diagonal launches, and the diagonal's key
#: dims per slice (`diagonal_scores`), measured on an H100 (GLA, B=8 T=2048 H=16 K=V=128,
#: bf16, both launches' time in one forward, off-diagonal at 4 warps): slices of 16 / 2 warps
#: 0.429 ms, 32 / 2 0.396, 64 / 2 0.394, 128 / 2 0.427, 16 / 4 0.544, 32 / 4 0.452, 64 / 4
#: 0.434 (the split diagonal before the levels: 0.620). ptxas sm_90a, bf16, n = 128, 2 warps:
#: 118, 168 and 255 registers in slices of 16, 32 and 64, most of them the loads' addresses
#: with no stride known at compile time (56, 92 and 143 with the unit strides and alignment a
#: launch on contiguous inputs specializes)
SCORES_WARPS = {True: 2, False: 4}
SCORES_SLICE = 32


def whole_chunk_warps(BN: int, CS: int) -> int:
    """Warps of a per-key kernel that holds a whole chunk's (CS, BN) query or key and its
    decay (the output pass, the backward's y and dv): 8 from 128 x 64 values (H100, n = p =
    128: the output pass spilled 856 B a thread with 4), else 4."""
    return 8 if BN * CS >= 128 * 64 else 4


def launch_scores(module, args, scores, n_chunks: int, H: int, layout: tuple, sizes: tuple,
                  BT: int, CS: int, BN: int, order: dict, varlen: bool, on_gpu: bool) -> None:
    """Fills `scores` ((chunks, H, CS, CS), the compute type) for one direction's inputs `args`;
    `layout` = (cu, chunk_off, chunk_seq) and `sizes` = (T, HPG, N, P, GH)."""
    if n_chunks == 0:
        return
    for diag in (True, False):
        blocks = CS // BT if diag else CS // BT - 1   # row blocks with earlier key blocks
        if blocks == 0:
            continue
        extra = dict(num_warps=SCORES_WARPS[diag]) if on_gpu else {}
        module.ssmc_chunked_scores[(n_chunks * blocks, H)](
            *args, scores, *layout, *sizes, BT=BT, CS=CS, BN=BN, BP=16,
            BND=min(BN, SCORES_SLICE), DIAG=diag, **order, IS_VARLEN=varlen, **extra)


def output_body(k: KeyOps, value: str) -> None:
    """y (CS, BP) of the chunk before the epilogue: the entering state's part and A v, with
    `state_in` and the chunk's `value` (matmul type) at hand."""
    body = k.body
    row = BlockOperands(k.prog, k.ct, body, QK_TILE, "qk", "")
    query = row.operand("query", "query")
    sums = RunningSums(k.plan, body, "", "offs_c")
    prefix.from_chunk_start(body, sums, k.ct)
    exponent = with_resets("from_start", sums.resets_since())
    body(f"y = {k.dot(f'{query} * tl.exp({exponent}){sums.sign()}', 'state_in', k.ft)}")
    body(f"y += {k.dot(f'{k.scores_tile()}.to({k.dt})', value)}")
