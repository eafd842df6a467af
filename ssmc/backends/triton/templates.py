"""Kernel set-up snippets shared by the chunked lowering's forward and backward kernels.

Each is parameterised by the pointer argument names (the backward prefixes its own with `ssmc_`
so they cannot clash with the op's input names). Every snippet is returned indented for a
kernel's top level (4 spaces) unless told otherwise.
"""
from __future__ import annotations

from ..base import RESET_BELOW


def indent(text: str, level: int) -> str:
    return "\n".join("    " * level + line for line in text.splitlines())


def prologue(split_n: bool, heads: bool = False) -> str:
    """Per program: head, group, n/p offsets and masks, the row offsets of a block. With
    `split_n`, program axis 2 holds n-blocks times NPB p-blocks; otherwise it is the p-block
    alone and n is covered by one block. With `heads`, program axis 1 holds blocks of HEADS
    consecutive heads (the kernel takes H as an argument and walks them from `h_first`)."""
    head = ("    h_first = tl.program_id(1).to(tl.int64) * HEADS\n    h_idx = h_first\n"
            if heads else
            "    h_idx = tl.program_id(1).to(tl.int64)\n    H = tl.num_programs(1)\n")
    if split_n:
        pid = ("    pid_n = tl.program_id(2) // NPB\n"
               "    pid_p = tl.program_id(2) % NPB\n")
        offs_n = "pid_n * BN + tl.arange(0, BN)"
    else:
        pid = "    pid_p = tl.program_id(2)\n"
        offs_n = "tl.arange(0, BN)"
    return f"""
{head}{pid}    g_idx = h_idx // HPG
    offs_n = {offs_n}
    mask_n = offs_n < N
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    offs_c = tl.arange(0, BT)
"""


def seq_setup(split_n: bool, cu: str, chunk_off: str,
              seq: str = "tl.program_id(0).to(tl.int64)") -> str:
    """A program per (sequence, head, block): the sequence's bounds, its first chunk `c_base`
    and the offsets/mask of its (n, p) state block; `seq` the expression of its sequence."""
    return f"""
    seq = {seq}
{prologue(split_n)}
    if IS_VARLEN:
        b_idx = seq * 0
        start = tl.load({cu} + seq).to(tl.int64)
        end = tl.load({cu} + seq + 1).to(tl.int64)
        c_base = tl.load({chunk_off} + seq).to(tl.int64)
    else:
        b_idx = seq
        start = seq * 0
        end = start + T
        c_base = seq * tl.cdiv(T, BT)
    length = end - start
    state_off = ((seq * H + h_idx) * N + offs_n[:, None]) * P + offs_p[None, :]
    state_mask = mask_n[:, None] & mask_p[None, :]
"""


def chunk_setup(split_n: bool, cu: str, chunk_off: str, chunk_seq: str, chunk: str, size: str,
                first: str, heads: bool = False) -> str:
    """A program per (chunk, head, block): `chunk` (the expression giving it), its sequence and
    bounds, and `first`, the chunk's first step within the sequence (chunks `size` steps long)."""
    return f"""
    chunk = {chunk}
{prologue(split_n, heads)}
    if IS_VARLEN:
        seq = tl.load({chunk_seq} + chunk).to(tl.int64)
        b_idx = seq * 0
        start = tl.load({cu} + seq).to(tl.int64)
        end = tl.load({cu} + seq + 1).to(tl.int64)
        {first} = (chunk - tl.load({chunk_off} + seq).to(tl.int64)) * {size}
    else:
        n_chunks = tl.cdiv(T, {size})
        seq = chunk // n_chunks
        b_idx = seq
        start = seq * 0
        end = start + T
        {first} = (chunk % n_chunks) * {size}
    length = end - start
"""


def grid_position(u: str) -> str:
    """The row-major time step of position `u` of a column order (direction="cross2d"): the
    grid of GH rows and T // GH columns read column by column (`ssmc.ir.orders`)."""
    return f"({u} % GH) * (T // GH) + {u} // GH"


def rows(first: str = "c0", i: str = "i_row", mask: str = "mask_t", t: str = "t_row",
         offs: str = "offs_c") -> str:
    """The rows of one block (unindented): position `i` from the sequence start (`first` plus
    `offs`, the tile's row offsets), its mask, and `t`, the time step it reads in the
    direction's own order (COLUMN: a grid's column order, indexed in place: no column-major
    copy of any input or output)."""
    return f"""{i} = {first} + {offs}
{mask} = {i} < length
if REVERSE:
    {t} = end - 1 - {i}
else:
    {t} = start + {i}
if COLUMN:
    {t} = {grid_position(t)}"""


def state_init(flag: str, ptr: str, var: str, ct: str) -> str:
    """`var`, an (n, p) state block: loaded from `ptr` when `flag`, else zeros (indent 1)."""
    return f"""    if {flag}:
        {var} = tl.load({ptr} + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        {var} = tl.zeros([BN, BP], dtype={ct})"""


def chunk_state_store(ptr: str, value: str, level: int = 2) -> str:
    """Store an (n, p) block of chunk `chunk`'s state (indented `level`)."""
    return indent(f"tl.store({ptr} + ((chunk * H + h_idx) * N + offs_n[:, None]) * P"
                  f" + offs_p[None, :],\n         {value}, mask=state_mask)", level)


#: A log-decay below RESET_BELOW (`ssmc.backends.base`) is a reset. The running-sum
#: (positive-decay) kernels keep such steps out of their sums and count them apart: a difference
#: of running sums that hold -inf is NaN, and one of sums that hold -1e4 rounds the other steps
#: away.
#: what one reset adds to an exponent: exp(-65536 + the sum of any finite decays) is exactly 0
RESET_WEIGHT = 65536.0
#: a block's sum of folded log-decays (`fold_resets`) below this holds a reset: its other steps
#: (each above RESET_BELOW, at most 256 of them) sum to more. Kernels test it to count resets
#: apart only in the rare blocks that have one, at the cost of one scalar branch elsewhere.
HAS_RESET_BELOW = -RESET_WEIGHT / 2


def split_resets(ld: str, rz: str) -> list[str]:
    """Lines moving the resets of log-decays `ld` into `rz` (1.0 per reset, else 0.0)."""
    return [f"{rz} = tl.where({ld} < {RESET_BELOW}, 1.0, 0.0)",
            f"{ld} = tl.where({rz} > 0.0, 0.0, {ld})"]


def fold_resets(ld: str) -> str:
    """`ld` with each reset replaced by -RESET_WEIGHT: only for a sum that is exponentiated
    whole (never subtracted from another), which is then exactly 0 across a reset, or whose
    resets are split out again (`split_resets`) before it is."""
    return f"tl.where(({ld}) < {RESET_BELOW}, -{RESET_WEIGHT}, {ld})"


def with_resets(regular: str, resets: str) -> str:
    """An exponent from a sum of regular log-decays and the count of resets in its range."""
    return f"({regular}) - {RESET_WEIGHT} * ({resets})"


def later_sum(v: str, axis: int = 0) -> str:
    """Per step of a block, the sum of v over its later steps: a suffix sum minus the step
    itself, not the total minus a running sum (two reductions in different orders: not 0 on
    the last step, and it cancels for strong decays). Resets must be split out of v first."""
    return f"tl.cumsum({v}, axis={axis}, reverse=True) - {v}"


def after(v: str, zero: str = "0.0") -> str:
    """Per step s of a (BT,) vector, the sum of the later steps r > s, summed directly rather
    than as a suffix sum minus v_s: a log-decay of -inf (a zero decay) or -1e4 would make that
    difference NaN or round away the small terms."""
    return f"tl.sum(tl.where(offs_c[None, :] > offs_c[:, None], {v}[None, :], {zero}), axis=1)"


def segment(v: str, zero: str = "0.0") -> str:
    """(BT, BT): [t, s] = the sum of v over the steps s < r <= t (0 for t <= s), each a direct
    sum (see `after`)."""
    return f"tl.cumsum(tl.where(offs_c[:, None] > offs_c[None, :], {v}[:, None], {zero}), axis=0)"


def signed(value: str, count: str) -> str:
    """`value` negated where `count` (negative decays in its product) is odd."""
    return f"tl.where(({count}) % 2 == 1, -({value}), {value})"
