"""The scan lowering's backward: gradients of the recurrence operands, for every decay kind.

Forward (one head, in the direction's own time 1..T, S_0 the initial state):

    S_t = a_t * S_{t-1} + k_t v_t^T,      y_t = S_t^T q_t          (S: n x p, * elementwise)

Given dy_t = dL/dy_t (the epilogue's derivative already applied) and G = dL/dS_T (grad_final),
the adjoint state dS_t = dL/dS_t runs in reverse time:

    dS_T = G + q_T dy_T^T,    dS_t = a_{t+1} * dS_{t+1} + q_t dy_t^T,    dL/dS_0 = a_1 * dS_1

and the operand gradients are

    dq_t = S_t dy_t (sum over p)     dk_t = dS_t v_t (sum over p)     dv_t = dS_t^T k_t (over n)
    da_t = dS_t * S_{t-1}            (summed in-kernel over p / n where the decay lacks them)

The decay gradient needs S_{t-1} and dS_t at the same step, in opposite time orders. Memory
stays linear in t by recomputation: `ssmc_scan_ckpt_fwd` runs the forward recurrence and stores
the state entering every CK-step segment (and, when the epilogue needs it, y itself);
`ssmc_scan_bwd` walks the segments last to first, recomputes the segment's states from its
checkpoint into a per-program scratch of CK states, then walks the segment backwards. This
handles decays that vary over p (Mamba-1 with p > 1) and is used for every decay kind. "Time"
is the direction's own step order: a grid's column orders (cross2d) map step i to its grid
position in-kernel (`scan.T_OF_I`), so every gradient lands at its row-major t.

Sums over p (dq, dk, and da for decays without p) are per p-block partials (a leading p-block
axis), added on the host. Outputs are in the compute type (fp32, fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton

from ....plan import Plan
from ..common import (HEADER, chunk_layout, compute_dtype, compute_type, direction_slices,
                      input_args, input_params, next_pow2, num_sequences)
from ..render import Context, Emitter, Tile, tile_mask
from ..templates import indent
from .scan import T_OF_I

FIXED = {"b": "b_idx", "t": "t_idx", "h": "h_idx", "g": "g_idx"}

#: steps per checkpoint: the scratch holds CK states of n x BP per program
CK = 16

SETUP = '''
    seq = tl.program_id(0).to(tl.int64)
    h_idx = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(1)
    pid_p = tl.program_id(2)
    NPB = tl.num_programs(2)
    g_idx = h_idx // HPG
    if IS_VARLEN:
        b_idx = seq * 0
        start = tl.load(ssmc_cu + seq).to(tl.int64)
        end = tl.load(ssmc_cu + seq + 1).to(tl.int64)
        c_base = tl.load(ssmc_ck_off + seq).to(tl.int64)
    else:
        b_idx = seq
        start = seq * 0
        end = start + T
        c_base = seq * tl.cdiv(T, CK)
    length = end - start
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < N
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    state_off = ((seq * H + h_idx) * N + offs_n[:, None]) * P + offs_p[None, :]
    state_mask = mask_n[:, None] & mask_p[None, :]
'''


def _operand(ctx: Context, node, name: str, mask_axes) -> str:
    """Evaluate an operand on the state tile, zero outside the tile's masks."""
    var = ctx.value(node, f"{name}_raw")
    mask = tile_mask(ctx.tile, [a for a in node.axes if a in mask_axes])
    ctx.emit(f"{name} = {var}" if mask is None else f"{name} = tl.where({mask}, {var}, 0.0)")
    return name


def block_sizes(N: int, P: int) -> tuple[int, int]:
    """All of n; p in blocks so that a state tile has at most 4096 elements (<= 32 wide)."""
    BN = max(next_pow2(N), 2)
    BP = max(min(next_pow2(P), max(4096 // BN, 2), 32), 2)
    return BN, BP


def decay_layout(plan: Plan) -> str:
    """How the decay gradient is stored: 'np' (b, t, h, n, p), 'n' (p-block, b, t, h, n) or
    's' (p-block, b, t, h), by the axes the decay has."""
    axes = plan.program.recurrence.decay.axes
    if "p" in axes:
        return "np"
    return "n" if "n" in axes else "s"


def render(plan: Plan) -> str:
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    tile = Tile([("n", "offs_n", "mask_n"), ("p", "offs_p", "mask_p")], FIXED)
    has_decay = rec.decay is not None
    ops = {"decay": rec.decay, "key": rec.key, "value": rec.value, "query": rec.query}

    # ---- forward: checkpoints (and y)
    pre_f = Emitter(indent=1)
    body_f = Emitter(indent=3)
    outer = Context(prog, tile, pre_f, "c", ct)
    inner = Context(prog, tile, body_f, "s", ct)
    for name in ("decay", "key", "value"):
        node = ops[name]
        if node is not None:
            _operand(inner if "t" in node.axes else outer, node, name, ("n", "p"))
    body_f("state = decay * state + key * value" if has_decay else "state = state + key * value")
    body_f("if WRITE_Y:")
    with body_f.block():
        if "t" in rec.query.axes:
            _operand(inner, rec.query, "query", ("n", "p"))
        body_f("y = tl.sum(tl.where(state_mask, query * state, 0.0), axis=0)")
        body_f("y_off = ((b_idx * T + t_idx) * H + h_idx) * P + offs_p")
        body_f("if ACCUM_IN:")
        with body_f.block():
            body_f("y += tl.load(ssmc_y + y_off, mask=mask_p, other=0.0)")
        body_f("tl.store(ssmc_y + y_off, y, mask=mask_p)")
    if "t" not in rec.query.axes:
        _operand(outer, rec.query, "query", ("n", "p"))

    fwd = f'''
@triton.jit
def ssmc_scan_ckpt_fwd(
    {input_params(prog)},
    ssmc_y, ssmc_ckpt, ssmc_h0, ssmc_cu, ssmc_ck_off,
    T, HPG, N, P, GH,
    BN: tl.constexpr, BP: tl.constexpr, CK: tl.constexpr, REVERSE: tl.constexpr,
    COLUMN: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, ACCUM_IN: tl.constexpr,
    WRITE_Y: tl.constexpr,
):
{SETUP}
    if HAS_H0:
        state = tl.load(ssmc_h0 + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        state = tl.zeros([BN, BP], dtype={ct})
{pre_f.text()}
    for c0 in range(0, length, CK):
        chunk = c_base + c0 // CK
        tl.store(ssmc_ckpt + ((chunk * H + h_idx) * N + offs_n[:, None]) * P + offs_p[None, :],
                 state, mask=state_mask)
        for i in range(c0, tl.minimum(c0 + CK, length)):
{indent(T_OF_I, 3)}
{body_f.text()}
'''

    # ---- backward
    pre_b = Emitter(indent=1)
    rec_b = Emitter(indent=3)      # forward recompute inside a segment
    rev_b = Emitter(indent=3)      # the reverse walk
    outer_b = Context(prog, tile, pre_b, "c", ct)
    ctx_r = Context(prog, tile, rec_b, "r", ct)
    ctx_v = Context(prog, tile, rev_b, "v", ct)
    for name, node in ops.items():
        if node is not None and "t" not in node.axes:
            _operand(outer_b, node, name, ("n", "p"))
    for name in ("decay", "key", "value"):
        node = ops[name]
        if node is not None and "t" in node.axes:
            _operand(ctx_r, node, name, ("n", "p"))
    rec_b("tl.store(scratch + (i - c0) * (BN * BP) + local, state)")
    rec_b("state = decay * state + key * value" if has_decay else "state = state + key * value")

    for name, node in ops.items():
        if node is not None and "t" in node.axes:
            _operand(ctx_v, node, name, ("n", "p"))
    rev_b("prev = tl.load(scratch + (i - c0) * (BN * BP) + local)")
    rev_b("state = decay * prev + key * value" if has_decay else "state = prev + key * value")
    rev_b("row = (b_idx * T + t_idx) * H + h_idx")
    rev_b("dy = tl.load(ssmc_dy + row * P + offs_p, mask=mask_p, other=0.0).to(" + ct + ")")
    rev_b("dS = tl.where(state_mask, dS + query * dy[None, :], 0.0)")
    rev_b("part = (pid_p.to(tl.int64) * B * T * H + row) * N + offs_n")
    rev_b("dq = tl.sum(tl.where(state_mask, state * dy[None, :], 0.0), axis=1)")
    rev_b("tl.store(ssmc_dq + part, dq, mask=mask_n)")
    rev_b("dk = tl.sum(tl.where(state_mask, dS * value, 0.0), axis=1)")
    rev_b("tl.store(ssmc_dk + part, dk, mask=mask_n)")
    rev_b("dv = tl.sum(tl.where(state_mask, dS * key, 0.0), axis=0)")
    rev_b("tl.store(ssmc_dv + row * P + offs_p, dv, mask=mask_p)")
    if has_decay:
        rev_b("da = tl.where(state_mask, dS * prev, 0.0)")
        layout = decay_layout(plan)
        if layout == "np":
            rev_b("tl.store(ssmc_da + (row * N + offs_n[:, None]) * P + offs_p[None, :], da, "
                  "mask=state_mask)")
        elif layout == "n":
            rev_b("tl.store(ssmc_da + part, tl.sum(da, axis=1), mask=mask_n)")
        else:
            rev_b("tl.store(ssmc_da + pid_p.to(tl.int64) * B * T * H + row, "
                  "tl.sum(tl.sum(da, axis=1), axis=0))")
        rev_b("dS = decay * dS")

    bwd = f'''
@triton.jit
def ssmc_scan_bwd(
    {input_params(prog)},
    ssmc_dy, ssmc_ckpt, ssmc_scratch, ssmc_gT, ssmc_dh0, ssmc_dq, ssmc_dk, ssmc_dv, ssmc_da,
    ssmc_cu, ssmc_ck_off,
    B, T, HPG, N, P, GH,
    BN: tl.constexpr, BP: tl.constexpr, CK: tl.constexpr, REVERSE: tl.constexpr,
    COLUMN: tl.constexpr, HAS_GT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
{SETUP}
    prog_id = (seq * H + h_idx) * NPB + pid_p
    scratch = ssmc_scratch + prog_id * (CK * BN * BP)
    local = offs_n[:, None] * BP + tl.arange(0, BP)[None, :]
    if HAS_GT:
        dS = tl.load(ssmc_gT + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        dS = tl.zeros([BN, BP], dtype={ct})
{pre_b.text()}
    n_ck = tl.cdiv(length, CK)
    for cc in range(0, n_ck):
        c0 = (n_ck - 1 - cc) * CK
        c1 = tl.minimum(c0 + CK, length)
        state = tl.load(ssmc_ckpt + (((c_base + c0 // CK) * H + h_idx) * N + offs_n[:, None]) * P
                        + offs_p[None, :], mask=state_mask, other=0.0)
        for i in range(c0, c1):
{indent(T_OF_I, 3)}
{rec_b.text()}
        tl.debug_barrier()
        for j in range(0, c1 - c0):
            i = c1 - 1 - j
{indent(T_OF_I, 3)}
{rev_b.text()}
        tl.debug_barrier()
    tl.store(ssmc_dh0 + state_off, dS, mask=state_mask)
'''
    return HEADER + fwd + "\n" + bwd


def forward_pass(module, plan: Plan, tensors, sizes, initial_state, cu_seqlens, want_y):
    """Checkpoints per direction (and y summed over directions, fp32, when `want_y`)."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = tensors[prog.inputs[0].name].device
    cdt = compute_dtype(plan)
    S = num_sequences(sizes, cu_seqlens)
    BN, BP = block_sizes(N, P)
    n_ck, ck_off, _ = chunk_layout(sizes, cu_seqlens, CK, device)
    y = torch.zeros(B, T, H, P, dtype=cdt, device=device) if want_y else None
    dummy = torch.zeros(1, dtype=cdt, device=device)
    ckpts = []
    for i, (direction, h0) in enumerate(zip(prog.recurrence.directions,
                                            direction_slices(plan, initial_state))):
        ckpt = torch.empty(max(n_ck, 1), H, N, P, dtype=cdt, device=device)
        h0 = None if h0 is None else h0.to(cdt).contiguous()
        module.ssmc_scan_ckpt_fwd[(S, H, triton.cdiv(P, BP))](
            *input_args(prog, tensors, i), dummy if y is None else y, ckpt,
            dummy if h0 is None else h0,
            dummy if cu_seqlens is None else cu_seqlens, dummy if ck_off is None else ck_off,
            T, H // G, N, P, sizes.get("grid_h", 1), BN=BN, BP=BP, CK=CK,
            REVERSE=direction.reversed, COLUMN=direction.column, HAS_H0=h0 is not None,
            IS_VARLEN=cu_seqlens is not None, ACCUM_IN=i > 0, WRITE_Y=want_y)
        ckpts.append(ckpt)
    return dict(ckpts=ckpts, ck_off=ck_off), y


def backward_pass(module, plan: Plan, tensors, sizes, saved, dy, grad_final, cu_seqlens):
    """Operand gradients per direction as canonical (b, t, h, n, p) tensors, and dL/dS_0.

    Returns a list (one per direction) of (grads: {operand: tensor}, dh0 (S, H, N, P))."""
    prog = plan.program
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
    device = dy.device
    cdt = compute_dtype(plan)
    S = num_sequences(sizes, cu_seqlens)
    BN, BP = block_sizes(N, P)
    NPB = triton.cdiv(P, BP)
    dummy = torch.zeros(1, dtype=cdt, device=device)
    has_decay = prog.recurrence.decay is not None
    layout = decay_layout(plan) if has_decay else None
    scratch = torch.empty(S * H * NPB * CK * BN * BP, dtype=cdt, device=device)
    results = []
    for i, (direction, gT) in enumerate(zip(prog.recurrence.directions,
                                            direction_slices(plan, grad_final))):
        dq = torch.zeros(NPB, B, T, H, N, dtype=cdt, device=device)
        dk = torch.zeros(NPB, B, T, H, N, dtype=cdt, device=device)
        dv = torch.zeros(B, T, H, P, dtype=cdt, device=device)
        da = None
        if has_decay:
            da = torch.zeros(*{"np": (B, T, H, N, P), "n": (NPB, B, T, H, N),
                               "s": (NPB, B, T, H)}[layout], dtype=cdt, device=device)
        dh0 = torch.empty(S, H, N, P, dtype=cdt, device=device)
        gT = None if gT is None else gT.to(cdt).contiguous()
        module.ssmc_scan_bwd[(S, H, NPB)](
            *input_args(prog, tensors, i), dy, saved["ckpts"][i], scratch,
            dummy if gT is None else gT, dh0,
            dq, dk, dv, dummy if da is None else da,
            dummy if cu_seqlens is None else cu_seqlens,
            dummy if saved["ck_off"] is None else saved["ck_off"],
            B, T, H // G, N, P, sizes.get("grid_h", 1), BN=BN, BP=BP, CK=CK,
            REVERSE=direction.reversed, COLUMN=direction.column, HAS_GT=gT is not None,
            IS_VARLEN=cu_seqlens is not None)
        grads = {"query": dq.sum(0).unsqueeze(-1), "key": dk.sum(0).unsqueeze(-1),
                 "value": dv.unsqueeze(3)}
        if has_decay:
            grads["decay"] = {"np": lambda: da, "n": lambda: da.sum(0).unsqueeze(-1),
                              "s": lambda: da.sum(0)[..., None, None]}[layout]()
        results.append((grads, dh0))
    return results
