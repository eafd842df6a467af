"""The chunked lowering for decays that vary over the key dim (GLA-class gates).

L[t, n] the running sums of the log-decays from the chunk's start, with their resets counted
apart in Z (`templates.split_resets`: a zero or underflowing decay, so exp of a sum is exactly
0 across one), formed once per chunk by `ssmc_chunked_prefix` (stored from each row block's
start: chunked_prefix.py). Key s is seen from row t of its chunk with the weight
exp(L_t - L_s), per n, so the chunk's decayed scores A[t, s] = sum_n q_t k_s exp(...) do not
depend on p: `ssmc_chunked_scores` forms them once per (chunk, head) into a buffer (fp32,
fp64 for fp64 plans), one program per row block r of BT (16) steps, in two launches (diagonal
blocks, then the earlier ones, so that neither program holds the other's tiles):

* the diagonal block: its lower-left quadrant factored through the first half's last step
  (one tensor-core product), the pairs within each half, where the weight has no reference
  point to factor through, exp(L_t - L_s) formed elementwise a slice of n at a time
  (`diagonal_scores_split`: BT^2 * BN / 2 exponentials);
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
before block r, the row factor that of that step seen from t), so in a type with fp32's range
a factor overflows only where a weight the output needs does. fp16 operands stop at 65504:
their factored products are taken in fp32. Negative decays carry their sign as the parity of
their count in each factor's range, split the same way.
"""
from __future__ import annotations

from ....plan import Plan
from ..common import compute_type, dot_type, input_params, precision_arg
from ..render import Emitter, Tile
from ..templates import chunk_setup, indent, rows, with_resets
from .chunked_tiles import (FIXED, KEY_KT_TILE, KEY_ROWS, QK_TILE, T_AXIS, BlockOperands,
                             RowOperands)
from . import chunked_prefix as prefix
from .chunked_prefix import RunningSums, sign_of


def diagonal_walk(plan: Plan, rows_: RunningSums, body: Emitter, per_step) -> None:
    """The diagonal block's steps s one at a time (unrolled): step s's key and query rows
    `k_r`, `q_r` and its stored running sums (`Ls`, `Zs`), against which the block rows' own
    (`rows_`) make `dec`, D[:, s, :] (the rows u >= s seeing key s; 0 on the others), and
    `dec_back`, D[s, :, :] (the keys u <= s that row s sees). `per_step()` emits the step's
    work."""
    prog, ct = plan.program, compute_type(plan)
    body("for s in tl.static_range(BT):")
    with body.block():
        row = RowOperands(prog, ct, body, "s")
        row.operand("key", "k_r")
        row.operand("query", "q_r")
        step = RunningSums(plan, body, "s", "i * BT + s")
        gap = with_resets(f"{rows_.L} - {step.L}[None, :]",
                          rows_.resets_since(step, "", "[None, :]"))
        sign = rows_.sign(step, "", "[None, :]")
        body(f"gap = {gap}")
        body(f"dec = tl.exp(tl.where(offs_c[:, None] >= s, gap, float('-inf'))){sign}")
        body(f"dec_back = tl.exp(tl.where(offs_c[:, None] <= s, -gap, float('-inf'))){sign}")
        per_step()


#: the row block's (t, n-slice) view: the diagonal block is formed a slice of n at a time
SLICE_TILE = Tile([T_AXIS, ("n", "offs_nd", "mask_nd")], FIXED)


def diagonal_scores_split(k: "KeyOps") -> None:
    """The diagonal block's scores, stored: its lower-left quadrant (rows of the second half,
    keys of the first) factored through the first half's last step as the earlier key blocks
    are, one tensor-core product; the two halves' own pairs elementwise, as (2, HB, HB, BND)
    products one slice of BND key dims at a time, each slice's decays exp(L_t - L_s) formed for
    every pair of a half at once: half the exponentials of the whole block's (BT, BT, BND)."""
    prog, body, ct = k.prog, k.body, k.ct
    row = BlockOperands(prog, ct, body, QK_TILE, "qk", "")
    query = row.operand("query", "query")
    key = row.operand("key", "key")
    sums = RunningSums(k.plan, body, "", "r * BT + offs_c")
    mid = RunningSums(k.plan, body, "M", "r * BT + BT // 2 - 1")
    body("lower = offs_c >= BT // 2")
    after = with_resets(f"{sums.L} - {mid.L}[None, :]", sums.resets_since(mid, "", "[None, :]"))
    before = with_resets(f"{mid.L}[None, :] - {sums.L}", mid.resets_since(sums, "[None, :]"))
    sign = sums.sign(mid, "", "[None, :]")
    body(f"q_lo = tl.where(lower[:, None], {query} * tl.exp({after}){sign}, 0.0)")
    body(f"k_hi = tl.where(lower[:, None], 0.0, {key} * tl.exp({before}){sign})")
    body("tl.store(a_ptr + r * BT, " + k.dot("q_lo", "tl.trans(k_hi)", k.ft)
         + ", mask=lower[:, None] & (offs_c[None, :] < BT // 2))")
    body("offs_h = tl.arange(0, BT // 2)")
    body("causal = (offs_h[:, None] >= offs_h[None, :])[None, :, :, None]")
    body(f"halves = tl.zeros([2, BT // 2, BT // 2], dtype={ct})")
    body("for nd in range(0, BN, BND):")
    with body.block():
        body("offs_nd = nd + tl.arange(0, BND)")
        body("mask_nd = offs_nd < N")
        blk = BlockOperands(prog, ct, body, SLICE_TILE, "qd", "_d")
        q = blk.operand("query", "q_d")
        kk = blk.operand("key", "k_d")
        slice_ = RunningSums(k.plan, body, "_d", "r * BT + offs_c", keys=("offs_nd", "mask_nd"))
        names = [q, kk, slice_.L, slice_.Z] + ([slice_.NG] if slice_.NG else [])
        for name in names:
            body(f"{name}4 = tl.reshape({name}, [2, BT // 2, BND])")
        pair = ("4[:, :, None, :]", "4[:, None, :, :]")
        gap = with_resets(f"{slice_.L}{pair[0]} - {slice_.L}{pair[1]}",
                          f"{slice_.Z}{pair[0]} - {slice_.Z}{pair[1]}")
        sign = ""
        if slice_.NG:
            sign = f" * {sign_of(f'{slice_.NG}{pair[0]} + {slice_.NG}{pair[1]}')}"
        body(f"dec_d = tl.exp(tl.where(causal, {gap}, float('-inf'))){sign}")
        body(f"halves += tl.sum({q}4[:, :, None, :] * {kk}4[:, None, :, :] * dec_d, axis=3)")
    body("offs_2 = tl.arange(0, 2)[:, None, None] * (BT // 2)")
    body("h_rows = offs_2 + offs_h[None, :, None]")
    body("h_cols = offs_2 + offs_h[None, None, :]")
    body("tl.store(ssmc_scores + ((chunk * H + h_idx) * CS + r * BT + h_rows) * CS + r * BT"
         " + h_cols, halves)")


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
    body("a_ptr = ssmc_scores + ((chunk * H + h_idx) * CS + r * BT + offs_c[:, None]) * CS"
         " + offs_c[None, :]")
    body("if DIAG:")
    with body.block():
        diagonal_scores_split(k)
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
    `launch_scores`."""
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
    if c0 < length:
{indent(rows(), 2)}
{body.text()}
"""


#: key dims per slice of the scores kernel's diagonal block, and the warps of its diagonal and
#: off-diagonal launches: measured on an H100 (GLA, B=8 T=2048 H=16 K=V=128, bf16, the
#: kernel's time in one forward): 16 / 2 and 4 warps 1.293 ms; 32 / 4 and 4 1.379; 8 / 4 and
#: 4 1.363; 32 / 4 and 8 1.780; both in one launch 1.522 (slices of 32), 1.642 walking the
#: diagonal a step at a time. ptxas for sm_90a, bf16, n=128, 4 warps: 128 and 158 registers.
SCORES_SLICE = 16
SCORES_WARPS = {True: 2, False: 4}


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
