"""q k^T of every chunk, once per (chunk, group), where query and key are the same for every
head of a group (Mamba-2's C and B with fewer groups than heads).

The forward's output pass runs per head and formed this product again for every head of the
group: with 80 heads to one group, a third of its matmul work. Formed here once, it is read
back per head (a chunk's is 16 KB at 64 steps, so the heads of a chunk find it in L2) where a
group has SHARED_QK_HEADS heads or more; the output pass then compiled to 134 registers
against 173 (sm_90, Triton 3.6; three programs an SM either way). The backward's dv
kernel forms it per head still: reading it there compiled to 200 bytes spilled against 32.
Decays without n only: a per-key decay sits inside the product (chunked_keys.py forms those
scores per head).
"""
from __future__ import annotations

from ....plan import Plan
from ..common import compute_type, dot_type, input_params, next_pow2, precision_arg
from ..render import Context, Emitter
from ..templates import chunk_setup, indent, rows
from .chunked_tiles import QK_TILE


def head_free(plan: Plan) -> bool:
    """Whether query and key read no input with a head axis (the same for every head of a
    group)."""
    prog = plan.program
    axes = {i.name: i.axes for i in prog.inputs}
    exprs = (prog.recurrence.query.expr, prog.recurrence.key.expr)
    return all("h" not in axes[s.name] for e in exprs for s in e.free_symbols if s.name in axes)


def head_free_operands(plan: Plan, sizes: dict) -> frozenset:
    """Query and key where they are a group's (`head_free`) and a group has several heads:
    the operands a backward may hand the chain rule summed over each group's heads."""
    if not head_free(plan) or sizes["h"] == sizes["g"]:
        return frozenset()
    return frozenset({"query", "key"})


def shares_qk(plan: Plan) -> bool:
    """Whether the output pass may read q k^T from `render_qk_kernel`'s buffer (renders the
    kernel and the reading branch; `reads_qk` decides per call)."""
    ld = plan.program.log_decay
    return head_free(plan) and (ld is None or "n" not in ld.axes)


#: heads a group must have for the output pass to read q k^T: per (chunk, head) the product
#: costs its kernel's reads of query and key and a write and a read of itself (48 KB at 64
#: steps, n = 128, fp32) over the group's heads, against the key (16 KB) and one matmul it
#: saves; with one or two heads a group that is more traffic, not less (not measured yet)
SHARED_QK_HEADS = 4


def reads_qk(plan: Plan, sizes: dict) -> bool:
    """Whether this call's output pass reads q k^T (`QK_READ`) rather than forming it."""
    return shares_qk(plan) and sizes["h"] // sizes["g"] >= SHARED_QK_HEADS


def qk_load(ptr: str, rows_expr: str, cols_expr: str, length: str) -> str:
    """The product's rows `rows_expr` and columns `cols_expr` of the kernel's `chunk` (group
    g_idx; H heads, HPG to a group), chunks `length` steps long."""
    return (f"tl.load({ptr} + ((chunk * (H // HPG) + g_idx) * {length} + ({rows_expr})[:, None])"
            f" * {length} + ({cols_expr})[None, :])")


def render_qk_kernel(plan: Plan) -> str:
    """`ssmc_chunk_qk`: one program per (chunk, group), launched with HPG = 1 (its h_idx and
    g_idx are the group's) and BT = the chunk's length; the whole of n in one block."""
    prog = plan.program
    body = Emitter(indent=1)
    dt = dot_type(plan)
    for which in ("query", "key"):
        node = getattr(prog.recurrence, which)
        ctx = Context(prog, QK_TILE, body, which, compute_type(plan))
        if ctx.direct_load(node, which, dt) is None:
            v = ctx.value(node, f"{which}_raw")
            body(f"{which} = tl.where(mask_t[:, None] & mask_n[None, :], {v}, 0.0).to({dt})")
    # the output pass's own precision: its product, formed here instead
    body(f"qk = tl.dot(query, tl.trans(key){precision_arg(plan)})")
    body("tl.store(ssmc_qk + ((chunk * H + h_idx) * BT + offs_c[:, None]) * BT"
         " + offs_c[None, :], qk)")
    setup = chunk_setup(False, "ssmc_cu", "ssmc_chunk_off", "ssmc_chunk_seq",
                        "tl.program_id(0).to(tl.int64)", "BT", "c0")
    return f"""
@triton.jit
def ssmc_chunk_qk(
    {input_params(prog)},
    ssmc_qk, ssmc_cu, ssmc_chunk_off, ssmc_chunk_seq, T, HPG, N, P, GH,
    BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, REVERSE: tl.constexpr,
    COLUMN: tl.constexpr, IS_VARLEN: tl.constexpr,
):
{setup}
{indent(rows(), 1)}
{body.text()}
"""


def launch_qk(module, args, qk, n_chunks: int, groups: int, layout, sizes: dict, chunk: int,
              order: dict, is_varlen: bool, launch: dict) -> None:
    """Fill `qk` (n_chunks, groups, chunk, chunk) for one direction's order. `layout`: the
    (cu_seqlens, chunk offsets, chunk sequences) buffers or stand-ins."""
    module.ssmc_chunk_qk[(n_chunks, groups)](
        *args, qk, *layout, sizes["t"], 1, sizes["n"], sizes["p"], sizes.get("grid_h", 1),
        BT=chunk, BN=max(next_pow2(sizes["n"]), 16), BP=16, **order, IS_VARLEN=is_varlen,
        **launch)
