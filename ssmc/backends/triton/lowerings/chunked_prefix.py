"""Running sums of per-key log-decays, formed once per (chunk, head) and read by every per-key
kernel of the chunked lowering.

`ssmc_chunked_prefix` stores, for each chunk's steps in the direction's own order (resets split
out of every sum, `templates.split_resets`):

* `L`: the inclusive running sum from the start of the step's row block of RB steps (the scores
  kernel's row block), the compute type;
* `lend`: the sum over the later steps to the chunk's end (the state pass's, the reverse
  pass's and the dv kernel's key weights), and for the backward `lsuf`, the same to the row
  block's end (its factored key blocks);
* `Z`: the count of resets from the chunk's start (int8; int16 for chunks of 128 steps or more),
  and for a decay that may be negative `NG`, the parity of the negative decays (int8).

The kernels load these instead of each summing the chunk's log-decays again (H100, GLA b=8
t=2048 h=16 n=p=128, bf16: the state pass spent half of its 0.62 ms and the scores kernel a
quarter of its 1.29 ms in those sums).

Sums restart at each row block so that a difference of two of them (the weight of key s seen
from row t of the same block, exp(L_t - L_s)) cancels no more than RB steps' worth of fp32
rounding; longer spans add block totals (the sums at block ends), like-signed terms. Suffix
sums are stored as the walks formed them: over whole 64-step chunks (or from block totals
less running sums) the fp32 gradient of a time-invariant per-key decay at t=65 was 5.4e-6 to
7.4e-6 off relative, against 2.5e-6 with the stored suffixes. Counts are exact at any span.
Rows past a sequence's end add 0: their sums repeat its last step's.
"""
from __future__ import annotations

import torch
import triton

from ....plan import Plan
from ..common import compute_dtype, compute_type, input_params
from ..render import Emitter
from ..templates import chunk_setup, indent, later_sum, rows
from .chunked_tiles import QK_TILE, BlockOperands

#: the kernels' parameters that receive the sums (after the inputs'): ssmc_rb is RB, a
#: constexpr so that a chunk's block totals unroll (`chunk_total`)
PARAMS = "ssmc_lcum, ssmc_lend, ssmc_lsuf, ssmc_zcum, ssmc_ngp, ssmc_rb: tl.constexpr,"
#: key dims per program of the prefix kernel
PREFIX_BN = 64


def sign_of(parity: str) -> str:
    """+1 or -1: the sign of a product whose negative decays have parity `parity` (a sum of
    parities is one too)."""
    return f"tl.where(({parity}) % 2 == 1, -1.0, 1.0)"


def _address(rows_: str, size: str, keys: tuple[str, str], transposed: bool
             ) -> tuple[str, str]:
    """(offsets, lane mask) of the stored sums at `rows_` (positions within the chunk: a
    vector, or one position for a (keys,) vector) of a `size`-step chunk."""
    offs, mask = keys
    base = f"(chunk * H + h_idx) * {size}"
    if "offs_" not in rows_:
        return f"({base} + {rows_}) * N + {offs}", mask
    if transposed:
        return f"({base} + {rows_}[None, :]) * N + {offs}[:, None]", f"{mask}[:, None]"
    return f"({base} + {rows_}[:, None]) * N + {offs}[None, :]", f"{mask}[None, :]"


class RunningSums:
    """Loads of the stored sums for one set of rows and keys, named with `suffix`: `L` (from
    each row's block start), `Z` (from the chunk's start; the compute type) and `NG` (None
    where the decay cannot be negative); `L` left out with `counts_only`."""

    def __init__(self, plan: Plan, body: Emitter, suffix: str, rows_: str, size: str = "CS",
                 keys: tuple[str, str] = ("offs_n", "mask_n"), transposed: bool = False,
                 counts_only: bool = False):
        """`rows_`: the rows' positions within the chunk, a vector or one position (then the
        sums are (keys,) vectors); `transposed`: a (keys, rows) tile instead of (rows, keys);
        `size` the chunk's length (its constexpr in the kernel)."""
        at, lane_mask = _address(rows_, size, keys, transposed)
        s = suffix
        body(f"at{s} = {at}")
        self.L = None if counts_only else f"L{s}"
        if self.L:
            body(f"L{s} = tl.load(ssmc_lcum + at{s}, mask={lane_mask}, other=0.0)")
        body(f"Z{s} = tl.load(ssmc_zcum + at{s}, mask={lane_mask}, other=0)"
             f".to({compute_type(plan)})")
        self.Z, self.NG = f"Z{s}", None
        if plan.program.decay_signed:
            body(f"NG{s} = tl.load(ssmc_ngp + at{s}, mask={lane_mask}, other=0).to(tl.int32)")
            self.NG = f"NG{s}"

    def resets_since(self, lo: RunningSums | None = None, here: str = "", there: str = ""
                     ) -> str:
        """The count of resets after `lo`'s steps through these (from the chunk's start
        without `lo`); `here` / `there` index each side for broadcasting."""
        return self.Z + here if lo is None else f"{self.Z}{here} - {lo.Z}{there}"

    def sign(self, lo: RunningSums | None = None, here: str = "", there: str = "") -> str:
        """" * sign" of the same span's product, "" for a decay that cannot be negative."""
        if self.NG is None:
            return ""
        if lo is None:
            return f" * {sign_of(self.NG + here)}"
        return f" * {sign_of(f'{self.NG}{here} + {lo.NG}{there}')}"


def block_total(body: Emitter, name: str, end_row: str, size: str = "CS") -> str:
    """`name`, the (keys,) sum over the row block that ends at `end_row` (as a vector)."""
    at, mask = _address(end_row, size, ("offs_n", "mask_n"), False)
    body(f"{name} = tl.load(ssmc_lcum + {at}, mask={mask}, other=0.0)")
    return name


def from_chunk_start(body: Emitter, sums: RunningSums, ct: str, size: str = "CS") -> None:
    """Emits `from_start`, `sums`' (rows offs_c of the whole chunk) sums from the chunk's
    start, each row's block sum plus the earlier blocks' totals, and `l_last`
    (`chunk_total`)."""
    body(f"from_start = {sums.L}")
    chunk_total(body, ct, size, lambda tot: body(
        f"from_start += tl.where(offs_c[:, None] > (blk + 1) * ssmc_rb - 1, {tot}[None, :], 0.0)"))


def chunk_total(body: Emitter, ct: str, size: str, per_block=lambda tot: None) -> None:
    """Emits `l_last`, the chunk's total log-decay per key (resets apart), from its row
    blocks' stored totals; `per_block(tot)` emits whatever else a block's total is for.
    Unrolled: a loop here, inside a walk's chunk loop, was the innermost loop, the one Triton
    pipelines, and left the walk's own loads unpipelined (H100, GLA b=8 t=2048 h=16 n=p=128:
    the state pass at 16% occupancy and 39% of DRAM bandwidth)."""
    body(f"l_last = tl.zeros([BN], dtype={ct})")
    body(f"for blk in tl.static_range(0, {size} // ssmc_rb):")
    with body.block():
        tot = block_total(body, "tot", "(blk + 1) * ssmc_rb - 1", size)
        per_block(tot)
        body(f"l_last += {tot}")


def to_chunk_end(at: str, rows_first: bool = True, block: bool = False) -> str:
    """The stored sums of the log-decays after each step to the chunk's end (`block`: to its
    row block's end) at offsets `at` ((rows, keys) tile, or (keys, rows))."""
    mask = "mask_n[None, :]" if rows_first else "mask_n[:, None]"
    return f"tl.load({'ssmc_lsuf' if block else 'ssmc_lend'} + {at}, mask={mask}, other=0.0)"


def render_prefix_kernel(plan: Plan) -> str:
    """`ssmc_chunked_prefix`: a program per (chunk, head, block of PREFIX_BN keys), walking
    the chunk's row blocks of BT (= RB) steps."""
    ct = compute_type(plan)
    body = Emitter(indent=2)
    blk = BlockOperands(plan.program, ct, body, QK_TILE, "lg", "")
    ld, rz, ng = blk.log_decays()
    body("at = ((chunk * H + h_idx) * CS + b * BT + offs_c[:, None]) * N + offs_n[None, :]")
    body(f"tl.store(ssmc_lcum + at, tl.cumsum({ld}, axis=0), mask=mask_n[None, :])")
    body("if BLOCK_SUFFIX:")
    body(f"    tl.store(ssmc_lsuf + at, {later_sum(ld)}, mask=mask_n[None, :])")
    body(f"tl.store(ssmc_zcum + at, (z0[None, :] + tl.cumsum({rz}, axis=0))"
         ".to(ssmc_zcum.dtype.element_ty), mask=mask_n[None, :])")
    body(f"z0 += tl.sum({rz}, axis=0)")
    if ng is not None:
        body(f"tl.store(ssmc_ngp + at, ((p0[None, :] + tl.cumsum({ng}, axis=0)) % 2)"
             ".to(tl.int8), mask=mask_n[None, :])")
        body(f"p0 += tl.sum({ng}, axis=0)")
    # each step's decay to the chunk's end, a suffix sum over the whole chunk: the state pass
    # weighs its keys with it (and the backward's decay gradient is as accurate as the walk's
    # sums: from block totals, fp32 gradients of a per-key decay were 3x further off)
    whole = Emitter(indent=1)
    wblk = BlockOperands(plan.program, ct, whole, QK_TILE, "lw", "w")
    lw, _, _ = wblk.log_decays()
    whole("at = ((chunk * H + h_idx) * CS + offs_c[:, None]) * N + offs_n[None, :]")
    whole(f"tl.store(ssmc_lend + at, {later_sum(lw)}, mask=mask_n[None, :])")
    setup = chunk_setup(True, "ssmc_cu", "ssmc_chunk_off", "ssmc_chunk_seq",
                        "tl.program_id(0).to(tl.int64)", "CS", "cs0")
    return f"""
@triton.jit
def ssmc_chunked_prefix(
    {input_params(plan.program)},
    {PARAMS} ssmc_cu, ssmc_chunk_off, ssmc_chunk_seq,
    T, HPG, N, P, GH,
    BT: tl.constexpr, CS: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
    NPB: tl.constexpr, REVERSE: tl.constexpr, COLUMN: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_SUFFIX: tl.constexpr,
):
{setup}
    z0 = tl.zeros([BN], dtype={ct})
    p0 = tl.zeros([BN], dtype=tl.int32)
    for b in tl.static_range(CS // BT):
        c0 = cs0 + b * BT
{indent(rows(), 2)}
{body.text()}
    offs_c = tl.arange(0, CS)
    c0 = cs0
{indent(rows(), 1)}
{whole.text()}
"""


class PrefixSums:
    """The sums' buffers ((chunks, H, CS, N) each) for one direction, in row blocks of RB
    steps, or none for plans without per-key decays (`args` empty)."""

    def __init__(self, plan: Plan, per_key: bool, n_chunks: int, H: int, CS: int, RB: int,
                 N: int, device, block_suffix: bool = False):
        """`block_suffix`: also each step's sum to its row block's end (the backward's
        factored key blocks; the forward has no reader for them)."""
        self.args: tuple = ()
        self.CS, self.RB, self.block_suffix = CS, RB, block_suffix
        if not per_key:
            return
        shape = (max(n_chunks, 1), H, CS, N)
        lcum, lend = (torch.empty(shape, dtype=compute_dtype(plan), device=device)
                      for _ in range(2))
        lsuf = torch.empty(shape, dtype=compute_dtype(plan), device=device) \
            if block_suffix else lend
        # a count of at most CS resets
        zcum = torch.empty(shape, dtype=torch.int8 if CS < 128 else torch.int16, device=device)
        ngp = (torch.empty(shape, dtype=torch.int8, device=device)
               if plan.program.decay_signed else zcum)
        self.args = (lcum, lend, lsuf, zcum, ngp, RB)

    def fill(self, module, args, n_chunks: int, H: int, layout: tuple, sizes: tuple,
             N: int, order: dict, varlen: bool) -> None:
        """Runs the prefix kernel on one direction's inputs `args`; `layout` = (cu,
        chunk_off, chunk_seq), `sizes` = (T, HPG, N, P, GH)."""
        if not self.args or n_chunks == 0:
            return
        module.ssmc_chunked_prefix[(n_chunks, H, triton.cdiv(N, PREFIX_BN))](
            *args, *self.args, *layout, *sizes, BT=self.RB, CS=self.CS, BN=PREFIX_BN, BP=16,
            NPB=1, **order, IS_VARLEN=varlen, BLOCK_SUFFIX=self.block_suffix)
