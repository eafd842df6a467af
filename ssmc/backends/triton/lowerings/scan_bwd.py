"""The scan lowering's backward: gradients of the recurrence operands, for every decay kind.

Forward (one head, in the direction's own time 1..T, S_0 the initial state):

    S_t = a_t * S_{t-1} + k_t v_t^T,      y_t = S_t^T q_t          (S: n x p, * elementwise)

Given dy_t = dL/dy_t (the epilogue's derivative already applied) and G = dL/dS_T (grad_final),
the adjoint state dS_t = dL/dS_t runs in reverse time:

    dS_T = G + q_T dy_T^T,    dS_t = a_{t+1} * dS_{t+1} + q_t dy_t^T,    dL/dS_0 = a_1 * dS_1

and the operand gradients are

    dq_t = S_t dy_t (sum over p)     dk_t = dS_t v_t (sum over p)     dv_t = dS_t^T k_t (over n)
    da_t = dS_t * S_{t-1}            (never stored: each input's decay term is formed in-kernel,
                                      `decay_terms`)

The decay gradient needs S_{t-1} and dS_t at the same step, in opposite time orders. Memory
stays linear in t by recomputation, in blocks of BT steps as the forward runs them
(`scan.emit_block_states`): `ssmc_scan_ckpt_fwd` stores the state entering every block (and,
when the epilogue needs it, y itself); `ssmc_scan_bwd` walks the blocks last to first,
recomputes a block's BT states from its checkpoint with one prefix scan over its rows in time
order, and runs the adjoint dS_t = m_t * dS_{t+1} + q_t dy_t^T (m_t = a_{t+1}; the step after
the block's last takes the carry a * dS from the block after it) as a second prefix scan, over
the same rows loaded last first: a reverse scan compiles to about four times the shuffles. The
operands the adjoint and the gradients use are loaded in that order, those of the recompute in
time order; S_{t-1} and m_t are the states and decays moved by a row (tl.gather). Everything
a block needs stays in registers. This handles decays that vary over p (Mamba-1 with p > 1)
and is used for every decay kind. "Time" is the direction's own step order: a grid's column
orders (cross2d) map step i to its grid position in-kernel (`templates.rows`), so every
gradient lands at its row-major t.

Every order of the op runs in the same launch (`scan.SETUP`); each order writes its own
gradient buffers (a leading order axis), so the backward is deterministic. Sums over p (dq, dk,
and the decay terms of inputs without p) are per p-block partials (a p-block axis after the
order's), added on the host, with a group's heads where query and key are the group's
(`scan_bwd_launch.grouped_operands`). Outputs are in the compute type (fp32, fp64 for fp64
inputs).
"""
from __future__ import annotations

from ....plan import Plan
from ..common import HEADER, compute_type, input_params
from ..render import Context, Emitter
from ..templates import indent, rows
from .decay_terms import decay_terms, emit as emit_terms
from .scan import (AFFINE, BLOCK, SETUP, SETUP_PARAMS, STEPS, emit_block_states, emit_operands,
                   emit_row_decays, emit_steps, last_state, rows_tile, step_state_init)


#: where a block's checkpoint lives: (order, block, h, n, p)
CKPT_OFF = ("((((order - FIRST_ORDER) * NCK + chunk) * H + h_idx) * N + offs_n[:, None]) * P"
            " + offs_p[None, :]")

#: the block number of a sequence's first block
C_BASE = '''    if IS_VARLEN:
        c_base = tl.load(ssmc_ck_off + seq).to(tl.int64)
    else:
        c_base = seq * tl.cdiv(T, CK)'''


def emit_ckpt_y(body: Emitter, states: str) -> None:
    """The checkpointing forward's y (fp32, summed over the orders) from `states`: atomically
    when the orders share a launch, else added to the earlier orders' sum."""
    body("if WRITE_Y:")
    with body.block():
        body(f"y = tl.sum(query * {states}, axis=1)")
        body("y_mask = mask_t[:, None] & mask_p[None, :]")
        body("y_off = ((b_idx * T + t_row[:, None]) * H + h_idx) * P + offs_p[None, :]")
        body("if ATOMIC:")
        with body.block():
            body("tl.atomic_add(ssmc_y + y_off, y, mask=y_mask, sem=\"relaxed\")")
        body("else:")
        with body.block():
            body("if ACCUM_IN:")
            with body.block():
                body("y += tl.load(ssmc_y + y_off, mask=y_mask, other=0.0)")
            body("tl.store(ssmc_y + y_off, y, mask=y_mask)")


def ckpt_params(prog) -> str:
    """The checkpointing forward kernels' parameters (both forms)."""
    return f"""    {input_params(prog)},
    ssmc_y, ssmc_ckpt, ssmc_h0, cu_ptr, ssmc_ck_off,
    T, HPG, N: tl.constexpr, P, GH, NCK, {SETUP_PARAMS},
    BN: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr, CK: tl.constexpr,
    HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, ACCUM_IN: tl.constexpr,
    WRITE_Y: tl.constexpr, ATOMIC: tl.constexpr, EVEN_P: tl.constexpr,"""


def render_ckpt_steps(plan: Plan) -> str:
    """`ssmc_scan_ckpt_fwd_steps`: the checkpointing forward in the step-at-a-time form
    (`scan.emit_steps`), for checkpoints every CK steps, a multiple of STEPS."""
    prog = plan.program
    ct = compute_type(plan)
    pre, body = emit_steps(prog, ct, lambda b: emit_ckpt_y(b, "state"))
    store = Emitter(indent=2)
    store("if c0 % CK == 0:")
    with store.block():
        store("chunk = c_base + c0 // CK")
        store(f"tl.store(ssmc_ckpt + {CKPT_OFF}, tl.sum(state, axis=0), mask=state_mask)")
    return f'''
@triton.jit
def ssmc_scan_ckpt_fwd_steps(
{ckpt_params(prog)}
):
{SETUP}
{C_BASE}
{step_state_init("ssmc_h0", ct)}
{pre.text()}
    for c0 in range(0, length, {STEPS}):
{store.text()}
{body.text()}
'''


def render(plan: Plan) -> str:
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    operands = ("decay", "key", "value", "query")

    # ---- forward: checkpoints (and y)
    pre_f = Emitter(indent=1)
    body_f = Emitter(indent=3)
    emit_operands(prog, ct, pre_f, body_f, operands, tag="f")
    emit_block_states(rec, ct, body_f)
    emit_ckpt_y(body_f, "states")
    body_f(last_state())

    fwd = f'''
@triton.jit
def ssmc_scan_ckpt_fwd(
{ckpt_params(prog)}
):
{SETUP}
{C_BASE}
    if HAS_H0:
        state = tl.load(ssmc_h0 + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        state = tl.zeros([BN, BP], dtype={ct})
{pre_f.text()}
    for c_ck in range(0, length, CK):
        chunk = c_base + c_ck // CK
        tl.store(ssmc_ckpt + {CKPT_OFF}, state, mask=state_mask)
        # the forward's own form: CK // BT blocks of BT steps (BT = 1: a step at a time)
        for c0 in range(c_ck, tl.minimum(c_ck + CK, length), BT):
{indent(rows(), 3)}
{body_f.text()}
'''

    # ---- backward: the block's rows twice over, in time order (the state recompute: a
    # prefix scan) and last row first (the adjoint: a prefix scan again, not a reverse one,
    # which Triton 3.6 compiles to 4x the shuffles: VMamba's n = 16 block 4696 -> 4272
    # instructions, 1396 -> 756 shuffles, sm_90a)
    pre_b = Emitter(indent=1)
    body_b = Emitter(indent=2)
    full = "(BT, BN, BP)"
    for line in rows(i="i_fwd", mask="mask_fwd", t="t_fwd").splitlines():
        body_b(line)
    emit_operands(prog, ct, pre_b, body_b, ("decay", "key", "value"), tag="f",
                  tile=rows_tile("t_fwd", "mask_fwd"), suffix="_fwd")
    body_b(f"state = tl.load(ssmc_ckpt + {CKPT_OFF}, mask=state_mask, other=0.0)")
    emit_block_states(rec, ct, body_b, "_fwd", "mask_fwd")
    body_b("row_fwd = (b_idx * T + t_fwd) * H + h_idx")
    body_b(f"dy_fwd = tl.load(ssmc_dy + row_fwd[:, None] * P + offs_p[None, :], "
           f"mask=mask_fwd[:, None] & mask_p[None, :], other=0.0).to({ct})")
    body_b("part = ((order * NPB + pid_p) * B * T * H + row_fwd)[:, None] * N + offs_n[None, :]")
    body_b("tl.store(ssmc_dq + part, tl.sum(states * dy_fwd[:, None, :], axis=2), "
           "mask=mask_fwd[:, None] & mask_n[None, :])")
    # row j of the adjoint's tile is step BT - 1 - j of the block: its S_{t-1} is row
    # BT - 2 - j of `states`, the checkpoint for the last row
    body_b("last = offs_c[:, None, None] == BT - 1")
    body_b(f"prev = tl.where(last, state[None, :, :], tl.gather(states, tl.broadcast_to("
           f"tl.maximum(BT - 2 - offs_c, 0)[:, None, None], {full}), 0))")
    for line in rows(offs="(BT - 1 - offs_c)").splitlines():
        body_b(line)
    outer_b, inner_b = emit_operands(prog, ct, pre_b, body_b, operands, tag="b")
    emit_row_decays(rec, ct, body_b)
    body_b("row = (b_idx * T + t_row) * H + h_idx")
    body_b("y_mask = mask_t[:, None] & mask_p[None, :]")
    body_b(f"dy = tl.load(ssmc_dy + row[:, None] * P + offs_p[None, :], mask=y_mask, "
           f"other=0.0).to({ct})")
    body_b(f"g = tl.broadcast_to(query * dy[:, None, :], {full})")
    # dS_t = g_t + a_{t+1} dS_{t+1}: row j takes the decay of row j - 1 (a step later); row 0
    # the carry, a * dS of the block after, as it is
    body_b(f"m = tl.where(offs_c[:, None, None] == 0, 1.0, tl.gather(a, tl.broadcast_to("
           f"tl.maximum(offs_c - 1, 0)[:, None, None], {full}), 0))")
    body_b("m, g = tl.associative_scan((m, g), 0, _ssmc_affine)")
    body_b("dS = g + m * carry[None, :, :]")
    body_b("carry = tl.sum(tl.where(last, a * dS, 0.0), axis=0)")
    body_b("rows_n = mask_t[:, None] & mask_n[None, :]")
    body_b("part = ((order * NPB + pid_p) * B * T * H + row)[:, None] * N + offs_n[None, :]")
    body_b("tl.store(ssmc_dk + part, tl.sum(dS * value, axis=2), mask=rows_n)")
    body_b("tl.store(ssmc_dv + (order * B * T * H + row)[:, None] * P + offs_p[None, :], "
           "tl.sum(dS * key, axis=1), mask=y_mask)")
    terms = decay_terms(prog)
    post_b = Emitter(indent=1)
    if terms:
        body_b("da = dS * prev")
        derivs = Context(prog, BLOCK, body_b, "d", ct, extra={**outer_b.loaded, **inner_b.loaded})
        emit_terms(terms, derivs, pre_b, body_b, post_b, ct)
    term_params = "".join(f"{t.param}, " for t in terms)

    bwd = f'''
@triton.jit
def ssmc_scan_bwd(
    {input_params(prog)},
    ssmc_dy, ssmc_ckpt, ssmc_gT, ssmc_dh0, ssmc_dq, ssmc_dk, ssmc_dv, {term_params}
    cu_ptr, ssmc_ck_off,
    B, T, HPG, N: tl.constexpr, P, GH, NCK, {SETUP_PARAMS},
    BN: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr, CK: tl.constexpr,
    HAS_GT: tl.constexpr, IS_VARLEN: tl.constexpr, EVEN_P: tl.constexpr,
):
{SETUP}
{C_BASE}
    if HAS_GT:
        carry = tl.load(ssmc_gT + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        carry = tl.zeros([BN, BP], dtype={ct})
{pre_b.text()}
    n_ck = tl.cdiv(length, BT)
    for cc in range(0, n_ck):
        c0 = (n_ck - 1 - cc) * BT
        chunk = c_base + c0 // BT
{body_b.text()}
{post_b.text()}
    tl.store(ssmc_dh0 + state_off, carry, mask=state_mask)
'''
    return HEADER + AFFINE + fwd + "\n" + render_ckpt_steps(plan) + "\n" + bwd
