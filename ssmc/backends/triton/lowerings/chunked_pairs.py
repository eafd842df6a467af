"""Two opposite orders in one output pass (and the calls of the output pass's row-block
functions, chunked.py, that its kernels and these share).

The output pass adds each order's y into an fp32 (b, t, h, p) sum that the next order reads
back: with four orders (cross2d) that sum crosses memory seven times, three quarters of the
pass's traffic at the Mamba-2-style shape (h=8 p=64 n=64, 64x64, b=32: 268 MB each way per
order; the fused output pass took 1.76 ms against 1.32 ms for one launch over four stacked
orders on an H100, benchmarks/RESULTS.md). Two orders that read the same rows in opposite
directions (bidirectional's two; cross2d's 0 and 2, 1 and 3) cover the same rows with their
row blocks wherever every sequence is a whole number of row blocks: block q of one is block
T/BT - 1 - q of the other, reversed. One program then takes both blocks: the first order's
block adds into the sum, a barrier (which makes its stores visible to the program's other
threads), and the mirror block of the second order reads the sum back from the cache it was
just written to and adds its own. At that shape the sum's traffic falls from 1.74 GB a forward
(written by order 0, read and written by orders 1 and 2, read by order 3) to 0.94 GB (pair
(0, 2) writes it; pair (1, 3) reads it, and its first order's partial sum is still written back
from the cache once).

Packed sequences (a sequence's row blocks need not mirror one another's) and per-key decays
(whose stored running sums are one buffer reused order by order) run one order a launch.
"""
from __future__ import annotations

from ....ir import Direction
from ....plan import Plan
from ..common import input_params


def param_names(params: str) -> list[str]:
    """The names of a parameter list as rendered (annotations dropped)."""
    names = (p.split(":")[0].strip() for p in params.replace("\n", " ").split(","))
    return [n for n in names if n]


def flag_of(ptr: str, block: str) -> str:
    """The reset flag of row block `block`'s chunk (`reset_specialised`)."""
    return f"tl.load({ptr} + ({block} // (CS // BT)) * tl.num_programs(1) + tl.program_id(1))"


def block_call(function: str, names: list[str], block: str, swap: dict | None = None) -> str:
    """A call of row-block function `function` on `block` with the kernel's parameters
    `names`, those in `swap` replaced."""
    swap = swap or {}
    return f"{function}({', '.join(swap.get(n, n) for n in names)}, {block})"


#: the output pass's row-block functions: every chunk, or (`reset_specialised`) the plain
#: running sums and the counting body
OUT_BLOCK, OUT_PLAIN, OUT_COUNTING = "_ssmc_out_block", "_ssmc_out_plain", "_ssmc_out_counting"

#: a row-block's buffers that belong to its order (besides the order's inputs)
ORDER_BUFFERS = ("states_ptr", "resets_ptr", "ssmc_scores", "seg_state_ptr", "chunk_prod_ptr")
ORDER_FLAGS = ("REVERSE", "COLUMN")
#: the second order's copy of a per-order parameter
SECOND = "{}_b"

#: a row block q of its sequence and its mirror in the other order (non-packed sequences)
MIRROR = '''    R = CS // BT
    per_seq = tl.cdiv(T, CS) * R
    full = T // BT'''


def order_groups(directions: list[Direction], T: int, rows: int, pairable: bool
                 ) -> list[tuple[int, ...]]:
    """The orders of each output launch, in launch order: where `pairable` (not packed, not
    per-key) pairs of opposite orders whose row blocks of `rows` steps mirror each other's
    (module docstring), else one each."""
    if not pairable or T % rows:
        return [(i,) for i in range(len(directions))]
    groups, taken = [], set()
    for i, d in enumerate(directions):
        if i in taken:
            continue
        partner = next((j for j in range(i + 1, len(directions)) if j not in taken
                        and directions[j].column == d.column
                        and directions[j].reversed != d.reversed), None)
        taken.update({i} if partner is None else {i, partner})
        groups.append((i,) if partner is None else (i, partner))
    return groups


def _per_order(plan: Plan) -> list[str]:
    """The parameters that differ between a pair's orders (per-key decays, whose running
    sums would too, are never paired)."""
    return [*param_names(input_params(plan.program)), *ORDER_BUFFERS, *ORDER_FLAGS]


def second_order_args(plan: Plan, args, buffers, order: dict) -> dict:
    """The pair kernel's `_b` arguments: the second order's input arguments `args`, its
    `buffers` (ORDER_BUFFERS' order) and its `order` flags."""
    values = [*args, *buffers, *(order[f] for f in ORDER_FLAGS)]
    names = _per_order(plan)
    assert len(values) == len(names), (names, len(values))
    return {SECOND.format(n): v for n, v in zip(names, values)}


def _second_params(plan: Plan) -> str:
    return "\n    " + " ".join(SECOND.format(n) + (": tl.constexpr," if n in ORDER_FLAGS else ",")
                               for n in _per_order(plan))


def _both(function: str, names: list[str], plan: Plan, indent: str) -> str:
    """The first order's block `mirror` into the sum, then the second's `pid0` onto it."""
    first = block_call(function, names, "mirror", {"WRITE_OUT": "False"})
    second = block_call(function, names, "pid0", {
        **{n: SECOND.format(n) for n in _per_order(plan)}, "ACCUM_IN": "True"})
    return f"{indent}{first}\n{indent}tl.debug_barrier()\n{indent}{second}"


def render_pair_kernels(plan: Plan, params: str, specialised: bool) -> str:
    """`ssmc_chunked_out_pair_fwd` (and, for `reset_specialised` plans,
    `ssmc_chunked_out_pair_resets_fwd`): the output pass of two opposite orders, one program
    per row block of the second order. The launch passes the second order's inputs, buffers
    and flags as the `_b` parameters. `params`: the output pass's; `specialised`: whether
    it runs plain and counting kernels (chunked.reset_specialised)."""
    names = param_names(params)
    head = f'''
@triton.jit
def ssmc_chunked_out_pair_fwd({params}{_second_params(plan)}
):
    pid0 = tl.program_id(0).to(tl.int64)
{MIRROR}
    q = pid0 % per_seq
    if q < full:
        mirror = pid0 + (full - 1 - 2 * q)
'''
    if not specialised:
        return head + _both(OUT_BLOCK, names, plan, " " * 8) + "\n"
    flags = f"({flag_of('resets_ptr', 'mirror')} | {flag_of(SECOND.format('resets_ptr'), 'pid0')})"
    return head + f'''        if {flags} == 0:
{_both(OUT_PLAIN, names, plan, " " * 12)}


@triton.jit
def ssmc_chunked_out_pair_resets_fwd({params}{_second_params(plan)}
    NROWS, ROWS: tl.constexpr,
):
{MIRROR}
    first = tl.program_id(0).to(tl.int64) * ROWS
    blocks = first + tl.arange(0, ROWS)
    qs = blocks % per_seq
    valid = (blocks < NROWS) & (qs < full)
    mirrors = blocks + (full - 1 - 2 * qs)
    flags = (tl.load(resets_ptr + (mirrors // R) * tl.num_programs(1) + tl.program_id(1),
                     mask=valid, other=0)
             | tl.load({SECOND.format("resets_ptr")} + (blocks // R) * tl.num_programs(1)
                       + tl.program_id(1), mask=valid, other=0))
    if tl.max(flags, axis=0) != 0:
        for i in range(0, ROWS):
            pid0 = first + i
            q = pid0 % per_seq
            if pid0 < NROWS:
                if q < full:
                    mirror = pid0 + (full - 1 - 2 * q)
                    if {flags} != 0:
{_both(OUT_COUNTING, names, plan, " " * 24)}
'''
