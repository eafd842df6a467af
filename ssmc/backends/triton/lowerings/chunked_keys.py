"""The chunked lowering for decays that vary over the key dim (GLA-class gates).

l[t, n] the log-decays with their resets split out (`templates.split_resets`: a zero or
underflowing decay is counted apart, so exp of a sum is exactly 0 across one). Key s is seen
from row t of its chunk with the weight exp(sum of l over s < u <= t), per n, so the chunk's
decayed scores A[t, s] = sum_n q_t k_s exp(...) do not depend on p: `ssmc_chunked_scores`
forms them once per (chunk, head) into a buffer (fp32, fp64 for fp64 plans), one program per
row block r of BT (16) steps, in two launches (diagonal blocks, then the earlier ones, so that
neither program holds the other's tiles):

* the diagonal block: exp(lc_t - lc_s), lc the running sum within the block, formed
  elementwise on its causal half (BT^2 * BN work) a slice of n at a time, where the weight has
  no reference point inside the block to factor through;
* an earlier key block j < r: the weight factors through the row block's start,
  exp(lc_t) * exp(sum over s < u < start of r), so its scores are one tensor-core matmul,
  (q exp(lc)) (k exp(rest))^T. Both exponents are sums of log-decays over disjoint steps, each
  <= 0 for decays of size at most 1, so neither factor overflows and the product is the weight
  (an underflowing factor means an underflowing weight).

The output pass then takes the whole chunk (CS rows) per (chunk, head, p-block), and is two
tensor-core products: y = (q exp(L)) S_in + A v, L the running sum from the chunk's start.
The backward's dv is A^T dy + (k exp(decay to the chunk's end)) G the same way.

Decays larger than 1 in size (log-decay > 0) make factors above 1. Each factor is itself the
weight between two steps of the chunk (the key factor is the weight of s seen from the last row
of block r - 1, the row factor that of the step before block r seen from t), so in a type with
fp32's range a factor overflows only where a weight the output needs does. fp16 operands stop
at 65504: their factored products are taken in fp32. Negative decays carry their sign as the
parity of their count in each factor's range, split the same way.
"""
from __future__ import annotations

from ....plan import Plan
from ..common import compute_type, dot_type, input_params, precision_arg
from ..render import Emitter, Tile
from ..templates import chunk_setup, indent, later_sum, rows, with_resets
from .chunked_tiles import (FIXED, KEY_KT_TILE, KEY_ROWS, QK_TILE, T_AXIS, BlockOperands,
                             RowOperands)


def sign_of(count: str) -> str:
    """+1 or -1: the sign of a product holding `count` negative decays."""
    return f"tl.where(({count}) % 2 == 1, -1.0, 1.0)"


def diagonal_walk(prog, ct: str, body: Emitter, per_step) -> None:
    """The diagonal block's steps s one at a time (unrolled): step s's key and query rows
    `k_r`, `q_r` and the running sums of its block's log-decays up to s (`lcs`, `zcs`, `ngs`),
    kept as the walk goes, against which `lc`, `zc`, `ngc` (the block rows' own) make `dec`,
    D[:, s, :] (the rows u >= s seeing key s; 0 on the others), and `dec_back`, D[s, :, :]
    (the keys u <= s that row s sees). `per_step()` emits the step's work."""
    sgn = prog.decay_signed
    body(f"lcs = tl.zeros([BN], dtype={ct})")
    body(f"zcs = tl.zeros([BN], dtype={ct})")
    if sgn:
        body("ngs = tl.zeros([BN], dtype=tl.int32)")
    body("for s in tl.static_range(BT):")
    with body.block():
        row = RowOperands(prog, ct, body, "s")
        row.operand("key", "k_r")
        row.operand("query", "q_r")
        ld, rz, ng = row.log_decays()
        body(f"lcs += {ld}")
        body(f"zcs += {rz}")
        body(f"gap = {with_resets('lc - lcs[None, :]', 'zc - zcs[None, :]')}")
        sign = ""
        if sgn:
            body(f"ngs += {ng}")
            sign = f" * {sign_of('ngc - ngs[None, :]')}"
        body(f"dec = tl.exp(tl.where(offs_c[:, None] >= s, gap, float('-inf'))){sign}")
        body(f"dec_back = tl.exp(tl.where(offs_c[:, None] <= s, -gap, float('-inf'))){sign}")
        per_step()


#: the row block's (t, n-slice) view: the diagonal block is formed a slice of n at a time
SLICE_TILE = Tile([T_AXIS, ("n", "offs_nd", "mask_nd")], FIXED)


def diagonal_scores_sliced(k: "KeyOps") -> None:
    """`scores` (BT, BT) of the diagonal block as (BT, BT, BND) products, one slice of BND
    key dims at a time: each slice's decays exp(lc_t - lc_s) are formed for every (t, s) pair
    at once and summed over the slice's n in one reduction, where a walk over the steps
    (`diagonal_walk`) takes a reduction across the lanes per step."""
    prog, body = k.prog, k.body
    body(f"scores = tl.zeros([BT, BT], dtype={k.ct})")
    body("causal = offs_c[:, None, None] >= offs_c[None, :, None]")
    body("for nd in range(0, BN, BND):")
    with body.block():
        body("offs_nd = nd + tl.arange(0, BND)")
        body("mask_nd = offs_nd < N")
        blk = BlockOperands(prog, k.ct, body, SLICE_TILE, "qd", "_d")
        q = blk.operand("query", "q_d")
        kk = blk.operand("key", "k_d")
        k.running_decay(blk, "_d")   # lc_d, zc_d (and ngc_d): their pairwise differences
        gap = with_resets("lc_d[:, None, :] - lc_d[None, :, :]",
                          "zc_d[:, None, :] - zc_d[None, :, :]")
        sign = ""
        if prog.decay_signed:
            sign = f" * {sign_of('ngc_d[:, None, :] - ngc_d[None, :, :]')}"
        body(f"dec_d = tl.exp(tl.where(causal, {gap}, float('-inf'))){sign}")
        body(f"scores += tl.sum({q}[:, None, :] * {kk}[None, :, :] * dec_d, axis=2)")


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

    def running_decay(self, blk: BlockOperands, suffix: str = "") -> tuple[str, str]:
        """`blk`'s (t, n) log-decays loaded; returns the exponent of the decay from the block's
        start through each step (inclusive; resets counted apart) and the sign factor of that
        product ("" for decays that cannot be negative)."""
        ld, rz, ng = blk.log_decays()
        self.body(f"lc{suffix} = tl.cumsum({ld}, axis=0)")
        self.body(f"zc{suffix} = tl.cumsum({rz}, axis=0)")
        sign = ""
        if ng is not None:
            self.body(f"ngc{suffix} = tl.cumsum({ng}, axis=0)")
            sign = f" * {sign_of(f'ngc{suffix}')}"
        return with_resets(f"lc{suffix}", f"zc{suffix}"), sign

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
        diagonal_scores_sliced(k)
        body("tl.store(a_ptr + r * BT, scores)")
        body("return")
    row = BlockOperands(prog, ct, body, QK_TILE, "qk", "")
    query = row.operand("query", "query")
    exponent, sign = k.running_decay(row)
    body(f"q_op = ({query} * tl.exp({exponent}){sign}).to({k.ft})")
    # the earlier key blocks, nearest first: `mid` sums the blocks between j and r
    body(f"mid = tl.zeros([BN], dtype={ct})")
    if sgn:
        body("mid_ng = tl.zeros([BN], dtype=tl.int32)")
    body("for jj in range(1, r + 1):")
    with body.block():
        body("j = r - jj")
        for line in KEY_ROWS.splitlines():
            body(line)
        blk = BlockOperands(prog, ct, body, KEY_KT_TILE, "kj", "k")   # (n, t): no transpose
        kT = blk.operand("key", "kT", k.ft)
        lk, rk, gk = blk.log_decays()
        body(f"rest = {with_resets(later_sum(lk, 1), later_sum(rk, 1))} + mid[:, None]")
        scale = "tl.exp(rest)"
        if sgn:
            scale += f" * {sign_of(f'{later_sum(gk, 1)} + mid_ng[:, None]')}"
        body(f"kT_op = ({kT} * {scale}).to({k.ft})")
        body(f"tl.store(a_ptr + j * BT, {k.dot('q_op', 'kT_op')})")
        body(f"mid += {with_resets(f'tl.sum({lk}, axis=1)', f'tl.sum({rk}, axis=1)')}")
        if sgn:
            body(f"mid_ng += tl.sum({gk}, axis=1)")


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
                        "tl.program_id(0).to(tl.int64) // R", "CS", "cs0")
    return f"""
@triton.jit
def ssmc_chunked_scores(
    {input_params(plan.program)},
    {SCORES_PARAMS}
):
    R = CS // BT
{setup}
    r = tl.program_id(0).to(tl.int64) % R
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
        extra = dict(num_warps=SCORES_WARPS[diag]) if on_gpu else {}
        module.ssmc_chunked_scores[(n_chunks * (CS // BT), H)](
            *args, scores, *layout, *sizes, BT=BT, CS=CS, BN=BN, BP=16,
            BND=min(BN, SCORES_SLICE), DIAG=diag, **order, IS_VARLEN=varlen, **extra)


def output_body(k: KeyOps, value: str) -> None:
    """y (CS, BP) of the chunk before the epilogue: the entering state's part and A v, with
    `state_in` and the chunk's `value` (matmul type) at hand."""
    body = k.body
    row = BlockOperands(k.prog, k.ct, body, QK_TILE, "qk", "")
    query = row.operand("query", "query")
    exponent, sign = k.running_decay(row)
    body(f"y = {k.dot(f'{query} * tl.exp({exponent}){sign}', 'state_in', k.ft)}")
    body(f"y += {k.dot(f'{k.scores_tile()}.to({k.dt})', value)}")
