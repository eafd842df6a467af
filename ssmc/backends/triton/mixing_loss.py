"""The fused matrix-matching loss: sum_{t, s} (M[t, s] - P[t, s])^2 per (b, h), with M the
definition's hidden attention matrix and P = causal softmax(q k^T scale) of a teacher, tile by
tile: both matrices live in registers, never in device memory.

Scope: one forward direction and a decay that is positive with an exact log and does not vary
over p (none, time-invariant, scalar: Mamba-2, RetNet; over n: GLA, Mamba-1's per-channel
heads); `fused(plan)` says why not otherwise, and the backend then runs the block-row torch
path. Scores use tensor cores where the decay does not vary over n; a decay over n is applied
exactly on a (BT, BT, BN) broadcast, BN key dims at a time, whose gradient parts the program
adds to the rows of dq_s / dk_s it owns.

Two kernels are generated per definition (`render`), one program per (b, h) walking the
blocks of t, so that a step's host work is a few launches and allocations (at short t the
host's time is the step's time; the prologue and the chain rule as torch ops were about 150
ops a step):

* `ssmc_mixing_prep`: the prologue on each block, stored in one workspace (`_operands`): the
  operands q_s, k_s (b h, t, n) and the log-decay's sums below (linear in t).
* `ssmc_mixing_grads`: the chain rule, operand gradients to input gradients (`_render_grads`).

The fixed kernels, one program per (b * h, block of BT rows or columns), the programs of the
blocks with the most tiles launched first (`_program`):

* `mixing_loss_fwd`: the softmax row statistics in a first pass over the key blocks (online
  max and sum, as flash attention, `_stats`); then the loss over the same blocks.
* `mixing_loss_bwd_rows`: the statistics of its rows again (stored for the columns kernel),
  D[t] = sum_s P dP in a second pass, then dq (teacher) = scale dS k and dq_s = (dM * W) k_s,
  with dM = 2 g (M - P), dP = -dM, dS = P (dP - D).
* `mixing_loss_bwd_cols`: dk (teacher) = scale dS^T q and dk_s = (dM * W)^T q_s, walking the
  row blocks below each column block (no atomics).

`matrix_bwd_rows` / `matrix_bwd_cols` are the same gradients for `ssmc.attention_matrix`, with
dM read from its gradient (per head, or one for all heads where it was reduced).

Decay weights W[t, s] = exp(sum_{s < u <= t} ld_u) are assembled from sums over disjoint ranges:
inside the row block (cin[t]), the blocks in between (a float64 difference of block prefix
sums, exact enough at any length), and the column block after s (aft[s]); within one block,
cin[t] - cin[s]. Log-decays below RESET_BELOW (exp underflows fp32: -1e4, -inf) are counted
as resets apart (z: W = 0 across one) and never enter a sum. d log-decay comes from the
identity d ld_r = sum_{t >= r} (q_s . dq_s - k_s . dk_s)[t] (exactly 0 at a reset).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...ir import DecayKind, Direction
from ...ir.backward import BackwardExprs
from ...plan import Plan
from ..base import registered
from ..chain_rule import ChainRule
from .common import HEADER, fp32_precision, input_args, input_params, interpreting, next_pow2
from .render import Context, Emitter, Tile
from .templates import RESET_BELOW


def fused(plan: Plan) -> str | None:
    """None where the kernels here compute this plan's loss (and the attention matrix's
    backward), else why not."""
    prog = plan.program
    if prog.recurrence.directions != (Direction.FORWARD,):
        return "the fused loss kernels take one forward direction"
    if plan.dtype == "float64":
        return "the fused loss kernels compute in float32"
    if prog.recurrence.decay is not None:
        if not prog.decay_log_safe:
            return "the decay may be zero or negative"
        if prog.decay_kind is DecayKind.FULL or "p" in prog.log_decay.axes:
            return "the decay varies over p (one matrix per value channel)"
    if prog.recurrence.transition.kind != "diagonal":
        return f"the {prog.recurrence.transition.kind!r} transition is not implemented"
    return None


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
    if LOWP:
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _weights(offs_t, offs_s, mask_s, i, j, bh, cin_ptr, aft_ptr, z_ptr, pre_ptr, T, NB,
             DECAY: tl.constexpr):
    """W (BT, BT) of rows offs_t (block i) and columns offs_s (block j <= i); 0 where s > t."""
    causal = (offs_t[:, None] >= offs_s[None, :]) & mask_s[None, :]
    if DECAY == 1:
        mask_t = offs_t < T
        cin_t = tl.load(cin_ptr + bh * T + offs_t, mask=mask_t, other=0.0)
        cin_s = tl.load(cin_ptr + bh * T + offs_s, mask=mask_s, other=0.0)
        aft_s = tl.load(aft_ptr + bh * T + offs_s, mask=mask_s, other=0.0)
        z_t = tl.load(z_ptr + bh * T + offs_t, mask=mask_t, other=0)
        z_s = tl.load(z_ptr + bh * T + offs_s, mask=mask_s, other=0)
        # the blocks strictly between j and i (float64 prefix sums; unused on the diagonal)
        ip = tl.maximum(i - 1, 0)
        mid = (tl.load(pre_ptr + bh * NB + ip) - tl.load(pre_ptr + bh * NB + j)).to(tl.float32)
        ex = tl.where(i == j, cin_t[:, None] - cin_s[None, :],
                      cin_t[:, None] + mid + aft_s[None, :])
        ok = causal & (z_t[:, None] == z_s[None, :])
        w = tl.exp(tl.where(ok, ex, float("-inf")))
    else:
        w = tl.where(causal, 1.0, 0.0)
    return w


@triton.jit
def _weights_diag(offs_t, mask_t, offs_s, mask_s, offs_n, mask_n, i, j, bh, cin_ptr, aft_ptr,
                  z_ptr, pre_ptr, T, N, NB):
    """W (BT, BT, BN) of a decay over n, for the key dims offs_n (as `_weights`, per n)."""
    causal = (offs_t[:, None] >= offs_s[None, :]) & mask_s[None, :]
    at_t = (bh * T + offs_t[:, None]) * N + offs_n[None, :]
    at_s = (bh * T + offs_s[:, None]) * N + offs_n[None, :]
    m_t = mask_t[:, None] & mask_n[None, :]
    m_s = mask_s[:, None] & mask_n[None, :]
    cin_t = tl.load(cin_ptr + at_t, mask=m_t, other=0.0)
    cin_s = tl.load(cin_ptr + at_s, mask=m_s, other=0.0)
    aft_s = tl.load(aft_ptr + at_s, mask=m_s, other=0.0)
    z_t = tl.load(z_ptr + at_t, mask=m_t, other=0)
    z_s = tl.load(z_ptr + at_s, mask=m_s, other=0)
    ip = tl.maximum(i - 1, 0)
    mid = (tl.load(pre_ptr + (bh * NB + ip) * N + offs_n, mask=mask_n, other=0.0) -
           tl.load(pre_ptr + (bh * NB + j) * N + offs_n, mask=mask_n, other=0.0)).to(tl.float32)
    ex = tl.where(i == j, cin_t[:, None, :] - cin_s[None, :, :],
                  cin_t[:, None, :] + mid[None, None, :] + aft_s[None, :, :])
    ok = causal[:, :, None] & (z_t[:, None, :] == z_s[None, :, :])
    return tl.exp(tl.where(ok, ex, float("-inf")))


@triton.jit
def _chunk(ptr, bh, offs, mask, offs_n, mask_n, T, N):
    """A (BT, BN) tile of a (b h, t, n) operand."""
    return tl.load(ptr + (bh * T + offs[:, None]) * N + offs_n[None, :],
                   mask=mask[:, None] & mask_n[None, :], other=0.0)


@triton.jit
def _m_diag(i, j, bh, offs_t, mask_t, offs_s, mask_s, qs_ptr, ks_ptr, cin_ptr, aft_ptr,
            z_ptr, pre_ptr, T, N, NB, BT: tl.constexpr, BN: tl.constexpr):
    """M (BT, BT) of a decay over n: the exact broadcast, BN key dims at a time."""
    m = tl.zeros([BT, BT], tl.float32)
    for nc in range(0, N, BN):
        offs_n = nc + tl.arange(0, BN)
        mask_n = offs_n < N
        q = _chunk(qs_ptr, bh, offs_t, mask_t, offs_n, mask_n, T, N)
        k = _chunk(ks_ptr, bh, offs_s, mask_s, offs_n, mask_n, T, N)
        w = _weights_diag(offs_t, mask_t, offs_s, mask_s, offs_n, mask_n, i, j, bh, cin_ptr,
                          aft_ptr, z_ptr, pre_ptr, T, N, NB)
        m += tl.sum(q[:, None, :] * k[None, :, :] * w, 2)
    return m


@triton.jit
def _grad_diag(dm, i, j, bh, offs_t, mask_t, offs_s, mask_s, other_ptr, out_ptr, cin_ptr,
               aft_ptr, z_ptr, pre_ptr, T, N, NB, BN: tl.constexpr, ROWS: tl.constexpr):
    """Add a tile's part of dq_s (ROWS: sum_s dM k_s W, into rows offs_t) or of dk_s
    (sum_t dM q_s W, into rows offs_s) to `out_ptr`, BN key dims at a time; the program owns
    those rows, so a read-modify-write needs no atomics, and its first tile (j = 0 for rows,
    i = j for columns) reads nothing: the workspace needs no zeros."""
    if ROWS:
        before = j          # tiles of these rows before this one
    else:
        before = i - j
    for nc in range(0, N, BN):
        offs_n = nc + tl.arange(0, BN)
        mask_n = offs_n < N
        w = _weights_diag(offs_t, mask_t, offs_s, mask_s, offs_n, mask_n, i, j, bh, cin_ptr,
                          aft_ptr, z_ptr, pre_ptr, T, N, NB)
        if ROWS:
            k = _chunk(other_ptr, bh, offs_s, mask_s, offs_n, mask_n, T, N)
            part = tl.sum(dm[:, :, None] * k[None, :, :] * w, 1)
            at = (bh * T + offs_t[:, None]) * N + offs_n[None, :]
            mask = mask_t[:, None] & mask_n[None, :]
        else:
            q = _chunk(other_ptr, bh, offs_t, mask_t, offs_n, mask_n, T, N)
            part = tl.sum(dm[:, :, None] * q[:, None, :] * w, 0)
            at = (bh * T + offs_s[:, None]) * N + offs_n[None, :]
            mask = mask_s[:, None] & mask_n[None, :]
        later = mask & (offs_n[None, :] * 0 + before > 0)
        tl.store(out_ptr + at, tl.load(out_ptr + at, mask=later, other=0.0) + part, mask=mask)


@triton.jit
def _tiles(i, j, bh, b_idx, h_idx, hk_idx, qs_t, qt_t, lse_t, offs_t, mask_t,
           qs_ptr, ks_ptr, kt_ptr, skb, skt, skh, skd,
           cin_ptr, aft_ptr, z_ptr, pre_ptr, T, N, DH, NB, scale,
           BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DECAY: tl.constexpr,
           LOWP: tl.constexpr, PREC: tl.constexpr):
    """(M, P, W, k_s, k_teacher) of the tile (row block i, column block j)."""
    offs_s = j * BT + tl.arange(0, BT)
    mask_s = offs_s < T
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    ks = tl.load(ks_ptr + (bh * T + offs_s[:, None]) * N + offs_n[None, :],
                 mask=mask_s[:, None] & (offs_n[None, :] < N), other=0.0)
    kt = tl.load(kt_ptr + b_idx * skb + offs_s[:, None] * skt + hk_idx * skh +
                 offs_d[None, :] * skd, mask=mask_s[:, None] & (offs_d[None, :] < DH),
                 other=0.0).to(tl.float32)
    if DECAY == 2:
        m = _m_diag(i, j, bh, offs_t, mask_t, offs_s, mask_s, qs_ptr, ks_ptr, cin_ptr, aft_ptr,
                    z_ptr, pre_ptr, T, N, NB, BT, BN)
        w = m        # not used: the gradients recompute the weights per chunk of n
    else:
        w = _weights(offs_t, offs_s, mask_s, i, j, bh, cin_ptr, aft_ptr, z_ptr, pre_ptr, T, NB,
                     DECAY)
        m = _dot(qs_t, tl.trans(ks), LOWP, PREC) * w
    causal = (offs_t[:, None] >= offs_s[None, :]) & mask_s[None, :] & mask_t[:, None]
    sc = _dot(qt_t, tl.trans(kt), LOWP, PREC) * scale
    p = tl.where(causal, tl.exp(sc - lse_t[:, None]), 0.0)
    return m, p, w, ks, kt


@triton.jit
def _rows_in(bh, b_idx, h_idx, offs_t, mask_t, qs_ptr, qt_ptr, sqb, sqt, sqh, sqd, T, N, DH,
             BN: tl.constexpr, BD: tl.constexpr):
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    qs = tl.load(qs_ptr + (bh * T + offs_t[:, None]) * N + offs_n[None, :],
                 mask=mask_t[:, None] & (offs_n[None, :] < N), other=0.0)
    qt = tl.load(qt_ptr + b_idx * sqb + offs_t[:, None] * sqt + h_idx * sqh +
                 offs_d[None, :] * sqd, mask=mask_t[:, None] & (offs_d[None, :] < DH),
                 other=0.0).to(tl.float32)
    return qs, qt


@triton.jit
def _operands(ws_ptr, T, N, NB, DECAY: tl.constexpr):
    """(qs, ks, cin, aft, z, pre, end): the operands in the workspace of a call (`Launch`), one
    fp32 buffer: qs, ks (b h, t, n); for a decay cin, aft, z (b h, t), or (b h, t, n) for one
    over n, and pre, float64 (b h, nb) or (b h, nb, n) at the next even offset; `end`, where
    the backward's part starts (`_gradients`). Axis 0 of every kernel's grid is b * h."""
    nbh = tl.num_programs(0).to(tl.int64)
    bht = nbh * T
    ks_ptr = ws_ptr + bht * N
    cin_ptr = ks_ptr + bht * N
    if DECAY == 2:
        width = N
    else:
        width = 1
    aft_ptr = cin_ptr + bht * width
    z_ptr = aft_ptr + bht * width
    if DECAY == 0:
        pre_ptr = cin_ptr.to(tl.pointer_type(tl.float64))
        end = 2 * bht * N
    else:
        at = 2 * bht * N + 3 * bht * width
        at += at % 2
        pre_ptr = (ws_ptr + at).to(tl.pointer_type(tl.float64))
        end = at + 2 * nbh * NB * width
    return ws_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, end


@triton.jit
def _gradients(ws_ptr, T, N, NB, DECAY: tl.constexpr):
    """(lse, dd, dq_s, dk_s): the backward's part of the workspace (`Launch`), after the
    operands: lse and dd (b h, t), dq_s and dk_s (b h, t, n)."""
    bht = tl.num_programs(0).to(tl.int64) * T
    _, _, _, _, _, _, end = _operands(ws_ptr, T, N, NB, DECAY)
    lse_ptr = ws_ptr + end
    dqs_ptr = lse_ptr + 2 * bht
    return lse_ptr, lse_ptr + bht, dqs_ptr, dqs_ptr + bht * N


@triton.jit
def _stats(qt, offs_t, b_idx, hk_idx, kt_ptr, skb, skt, skh, skd, T, DH, i, scale,
           BT: tl.constexpr, BD: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    """The log-sum-exp of the teacher's causal scores of rows offs_t (block i): online max
    and sum over the key blocks, as flash attention (every row has its diagonal, so the max
    is finite)."""
    offs_d = tl.arange(0, BD)
    mx = tl.full([BT], float("-inf"), tl.float32)
    sm = tl.zeros([BT], tl.float32)
    for j in range(0, i + 1):
        offs_s = j * BT + tl.arange(0, BT)
        mask_s = offs_s < T
        kt = tl.load(kt_ptr + b_idx * skb + offs_s[:, None] * skt + hk_idx * skh +
                     offs_d[None, :] * skd, mask=mask_s[:, None] & (offs_d[None, :] < DH),
                     other=0.0).to(tl.float32)
        sc = _dot(qt, tl.trans(kt), LOWP, PREC) * scale
        sc = tl.where((offs_t[:, None] >= offs_s[None, :]) & mask_s[None, :], sc, float("-inf"))
        new = tl.maximum(mx, tl.max(sc, 1))
        sm = sm * tl.exp(mx - new) + tl.sum(tl.exp(sc - new[:, None]), 1)
        mx = new
    return mx + tl.log(sm)


@triton.jit
def _program(NB, LAST_FIRST: tl.constexpr):
    """(row or column block, b * h) of this program in a (b * h, NB) grid. A block's programs
    have i + 1 tiles (rows) or NB - j (columns): the b * h programs of the longest block come
    first, then the next (axis 0 varies fastest), so no long program starts last and leaves the
    GPU waiting on one (at short t the last wave is most of the time)."""
    blk = tl.program_id(1)
    if LAST_FIRST:
        blk = NB - 1 - blk
    return blk, tl.program_id(0).to(tl.int64)


@triton.jit
def mixing_loss_fwd(ws_ptr, qt_ptr, sqb, sqt, sqh, sqd, kt_ptr, skb, skt, skh, skd, part_ptr,
                    T, H, HPK, N, DH, NB, scale,
                    BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    i, bh = _program(NB, True)
    b_idx, h_idx = bh // H, bh % H
    hk_idx = h_idx // HPK
    qs_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, _ = _operands(ws_ptr, T, N, NB, DECAY)
    offs_t = i * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    qs, qt = _rows_in(bh, b_idx, h_idx, offs_t, mask_t, qs_ptr, qt_ptr, sqb, sqt, sqh, sqd,
                      T, N, DH, BN, BD)
    # pass 1: the softmax normalisers; pass 2: the loss
    lse = _stats(qt, offs_t, b_idx, hk_idx, kt_ptr, skb, skt, skh, skd, T, DH, i, scale, BT,
                 BD, LOWP, PREC)
    acc = tl.zeros([BT], tl.float32)
    for j in range(0, i + 1):
        m, p, w, ks, kt = _tiles(i, j, bh, b_idx, h_idx, hk_idx, qs, qt, lse, offs_t,
                                 mask_t, qs_ptr, ks_ptr, kt_ptr, skb, skt, skh, skd,
                                 cin_ptr, aft_ptr, z_ptr, pre_ptr, T, N, DH, NB, scale, BT,
                                 BN, BD, DECAY, LOWP, PREC)
        e = m - p
        acc += tl.sum(e * e, 1)
    tl.store(part_ptr + bh * NB + i, tl.sum(tl.where(mask_t, acc, 0.0), 0))


@triton.jit
def mixing_loss_bwd_rows(ws_ptr, qt_ptr, sqb, sqt, sqh, sqd, kt_ptr, skb, skt, skh, skd,
                         g_ptr, sgb, sgh, dqt_ptr, T, H, HPK, N, DH, NB, scale,
                         BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                         DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    i, bh = _program(NB, True)
    b_idx, h_idx = bh // H, bh % H
    hk_idx = h_idx // HPK
    qs_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, _ = _operands(ws_ptr, T, N, NB, DECAY)
    lse_ptr, dd_ptr, dqs_ptr, dks_ptr = _gradients(ws_ptr, T, N, NB, DECAY)
    offs_t = i * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    qs, qt = _rows_in(bh, b_idx, h_idx, offs_t, mask_t, qs_ptr, qt_ptr, sqb, sqt, sqh, sqd,
                      T, N, DH, BN, BD)
    # the softmax statistics of its own rows (the forward's pass 1), for the columns kernel too
    lse = _stats(qt, offs_t, b_idx, hk_idx, kt_ptr, skb, skt, skh, skd, T, DH, i, scale, BT,
                 BD, LOWP, PREC)
    tl.store(lse_ptr + bh * T + offs_t, lse, mask=mask_t)
    g2 = 2.0 * tl.load(g_ptr + b_idx * sgb + h_idx * sgh)
    # pass 1: D[t] = sum_s P dP, dP = -2 g (M - P)
    dd = tl.zeros([BT], tl.float32)
    for j in range(0, i + 1):
        m, p, w, ks, kt = _tiles(i, j, bh, b_idx, h_idx, hk_idx, qs, qt, lse, offs_t, mask_t,
                                 qs_ptr, ks_ptr, kt_ptr, skb, skt, skh, skd, cin_ptr, aft_ptr,
                                 z_ptr, pre_ptr, T, N, DH, NB, scale, BT, BN, BD, DECAY,
                                 LOWP, PREC)
        dd += tl.sum(p * (g2 * (p - m)), 1)
    tl.store(dd_ptr + bh * T + offs_t, dd, mask=mask_t)
    # pass 2: the row-side gradients
    dqs = tl.zeros([BT, BN], tl.float32)
    dqt = tl.zeros([BT, BD], tl.float32)
    for j in range(0, i + 1):
        m, p, w, ks, kt = _tiles(i, j, bh, b_idx, h_idx, hk_idx, qs, qt, lse, offs_t, mask_t,
                                 qs_ptr, ks_ptr, kt_ptr, skb, skt, skh, skd, cin_ptr, aft_ptr,
                                 z_ptr, pre_ptr, T, N, DH, NB, scale, BT, BN, BD, DECAY,
                                 LOWP, PREC)
        dm = g2 * (m - p)
        ds = p * (-dm - dd[:, None])
        if DECAY == 2:
            offs_s = j * BT + tl.arange(0, BT)
            _grad_diag(dm, i, j, bh, offs_t, mask_t, offs_s, offs_s < T, ks_ptr, dqs_ptr,
                       cin_ptr, aft_ptr, z_ptr, pre_ptr, T, N, NB, BN, True)
        else:
            dqs += _dot(dm * w, ks, LOWP, PREC)
        dqt += _dot(ds, kt, LOWP, PREC)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    if DECAY != 2:
        tl.store(dqs_ptr + (bh * T + offs_t[:, None]) * N + offs_n[None, :], dqs,
                 mask=mask_t[:, None] & (offs_n[None, :] < N))
    tl.store(dqt_ptr + ((b_idx * T + offs_t[:, None]) * H + h_idx) * DH + offs_d[None, :],
             (dqt * scale).to(dqt_ptr.dtype.element_ty),
             mask=mask_t[:, None] & (offs_d[None, :] < DH))


@triton.jit
def mixing_loss_bwd_cols(ws_ptr, qt_ptr, sqb, sqt, sqh, sqd, kt_ptr, skb, skt, skh, skd,
                         g_ptr, sgb, sgh, dkt_ptr, T, H, HPK, N, DH, NB, scale,
                         BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                         DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    j, bh = _program(NB, False)
    b_idx, h_idx = bh // H, bh % H
    hk_idx = h_idx // HPK
    qs_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, _ = _operands(ws_ptr, T, N, NB, DECAY)
    lse_ptr, dd_ptr, dqs_ptr, dks_ptr = _gradients(ws_ptr, T, N, NB, DECAY)
    g2 = 2.0 * tl.load(g_ptr + b_idx * sgb + h_idx * sgh)
    dks = tl.zeros([BT, BN], tl.float32)
    dkt = tl.zeros([BT, BD], tl.float32)
    for i in range(j, NB):
        offs_t = i * BT + tl.arange(0, BT)
        mask_t = offs_t < T
        qs, qt = _rows_in(bh, b_idx, h_idx, offs_t, mask_t, qs_ptr, qt_ptr, sqb, sqt, sqh,
                          sqd, T, N, DH, BN, BD)
        lse = tl.load(lse_ptr + bh * T + offs_t, mask=mask_t, other=0.0)
        dd = tl.load(dd_ptr + bh * T + offs_t, mask=mask_t, other=0.0)
        m, p, w, ks, kt = _tiles(i, j, bh, b_idx, h_idx, hk_idx, qs, qt, lse, offs_t, mask_t,
                                 qs_ptr, ks_ptr, kt_ptr, skb, skt, skh, skd, cin_ptr, aft_ptr,
                                 z_ptr, pre_ptr, T, N, DH, NB, scale, BT, BN, BD, DECAY,
                                 LOWP, PREC)
        dm = tl.where(mask_t[:, None], g2 * (m - p), 0.0)
        ds = p * (-dm - dd[:, None])
        if DECAY == 2:
            offs_s = j * BT + tl.arange(0, BT)
            _grad_diag(dm, i, j, bh, offs_t, mask_t, offs_s, offs_s < T, qs_ptr, dks_ptr,
                       cin_ptr, aft_ptr, z_ptr, pre_ptr, T, N, NB, BN, False)
        else:
            dks += _dot(tl.trans(dm * w), qs, LOWP, PREC)
        dkt += _dot(tl.trans(ds), qt, LOWP, PREC)
    offs_s = j * BT + tl.arange(0, BT)
    mask_s = offs_s < T
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    if DECAY != 2:
        tl.store(dks_ptr + (bh * T + offs_s[:, None]) * N + offs_n[None, :], dks,
                 mask=mask_s[:, None] & (offs_n[None, :] < N))
    tl.store(dkt_ptr + ((b_idx * T + offs_s[:, None]) * H + h_idx) * DH + offs_d[None, :],
             (dkt * scale).to(dkt_ptr.dtype.element_ty),
             mask=mask_s[:, None] & (offs_d[None, :] < DH))


# ------------------------------------------------------- the attention matrix's backward

@triton.jit
def _grad_tile(g_ptr, sgb, sgh, sgt, sgs, b_idx, h_idx, offs_t, mask_t, offs_s, mask_s, gscale):
    """dM of a tile, from the gradient of `attention_matrix` (strides 0 over reduced heads)."""
    return tl.load(g_ptr + b_idx * sgb + h_idx * sgh + offs_t[:, None] * sgt +
                   offs_s[None, :] * sgs, mask=mask_t[:, None] & mask_s[None, :],
                   other=0.0) * gscale


@triton.jit
def matrix_bwd_rows(ws_ptr, g_ptr, sgb, sgh, sgt, sgs, T, H, N, NB, gscale,
                    BT: tl.constexpr, BN: tl.constexpr, DECAY: tl.constexpr,
                    LOWP: tl.constexpr, PREC: tl.constexpr):
    """dq_s = sum_s (dM * W) k_s for one block of rows, dM read from the matrix's gradient."""
    i, bh = _program(NB, True)
    qs_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, _ = _operands(ws_ptr, T, N, NB, DECAY)
    lse_ptr, dd_ptr, dqs_ptr, dks_ptr = _gradients(ws_ptr, T, N, NB, DECAY)
    b_idx, h_idx = bh // H, bh % H
    offs_t = i * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    offs_n = tl.arange(0, BN)
    dqs = tl.zeros([BT, BN], tl.float32)
    for j in range(0, i + 1):
        offs_s = j * BT + tl.arange(0, BT)
        mask_s = offs_s < T
        dm = _grad_tile(g_ptr, sgb, sgh, sgt, sgs, b_idx, h_idx, offs_t, mask_t, offs_s, mask_s,
                        gscale)
        if DECAY == 2:
            _grad_diag(dm, i, j, bh, offs_t, mask_t, offs_s, mask_s, ks_ptr, dqs_ptr, cin_ptr,
                       aft_ptr, z_ptr, pre_ptr, T, N, NB, BN, True)
        else:
            ks = _chunk(ks_ptr, bh, offs_s, mask_s, offs_n, offs_n < N, T, N)
            w = _weights(offs_t, offs_s, mask_s, i, j, bh, cin_ptr, aft_ptr, z_ptr, pre_ptr, T,
                         NB, DECAY)
            dqs += _dot(dm * w, ks, LOWP, PREC)
    if DECAY != 2:
        tl.store(dqs_ptr + (bh * T + offs_t[:, None]) * N + offs_n[None, :], dqs,
                 mask=mask_t[:, None] & (offs_n[None, :] < N))


@triton.jit
def matrix_bwd_cols(ws_ptr, g_ptr, sgb, sgh, sgt, sgs, T, H, N, NB, gscale,
                    BT: tl.constexpr, BN: tl.constexpr, DECAY: tl.constexpr,
                    LOWP: tl.constexpr, PREC: tl.constexpr):
    """dk_s = sum_t (dM * W)^T q_s for one block of columns."""
    j, bh = _program(NB, False)
    qs_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, _ = _operands(ws_ptr, T, N, NB, DECAY)
    lse_ptr, dd_ptr, dqs_ptr, dks_ptr = _gradients(ws_ptr, T, N, NB, DECAY)
    b_idx, h_idx = bh // H, bh % H
    offs_s = j * BT + tl.arange(0, BT)
    mask_s = offs_s < T
    offs_n = tl.arange(0, BN)
    dks = tl.zeros([BT, BN], tl.float32)
    for i in range(j, NB):
        offs_t = i * BT + tl.arange(0, BT)
        mask_t = offs_t < T
        dm = _grad_tile(g_ptr, sgb, sgh, sgt, sgs, b_idx, h_idx, offs_t, mask_t, offs_s, mask_s,
                        gscale)
        if DECAY == 2:
            _grad_diag(dm, i, j, bh, offs_t, mask_t, offs_s, mask_s, qs_ptr, dks_ptr, cin_ptr,
                       aft_ptr, z_ptr, pre_ptr, T, N, NB, BN, False)
        else:
            qs = _chunk(qs_ptr, bh, offs_t, mask_t, offs_n, offs_n < N, T, N)
            w = _weights(offs_t, offs_s, mask_s, i, j, bh, cin_ptr, aft_ptr, z_ptr, pre_ptr, T,
                         NB, DECAY)
            dks += _dot(tl.trans(dm * w), qs, LOWP, PREC)
    if DECAY != 2:
        tl.store(dks_ptr + (bh * T + offs_s[:, None]) * N + offs_n[None, :], dks,
                 mask=mask_s[:, None] & (offs_n[None, :] < N))


# --------------------------------------------------------------------------- generated kernels

FIXED = {"b": "b_idx", "h": "h_idx", "g": "g_idx"}
QK_TILE = Tile([("t", "offs_t", "mask_t"), ("n", "offs_n", "mask_n")], FIXED)
#: the operands the loss reads, and their gradients' names in the generated kernels
GRADIENTS = {"query": "ssmc_dq", "key": "ssmc_dk", "log_decay": "ssmc_dld"}


def _decay_mode(program) -> int:
    """DECAY of the kernels: 0 without a decay, 1 a log-decay per step, 2 one over n."""
    if program.recurrence.decay is None:
        return 0
    return 2 if "n" in program.log_decay.axes else 1


def _tile(t: str, mask: str, wide: bool) -> Tile:
    """A block of steps, and the key dims where `wide` (a decay over n)."""
    return Tile([("t", t, mask)] + ([("n", "offs_n", "mask_n")] if wide else []), FIXED)


def _operand(ctx: Context, node, name: str) -> str:
    """`node` evaluated on the context's tile into `name`, in the tile's full shape and 0
    outside its masks (an operand may lack some of the tile's axes)."""
    raw = ctx.value(node, f"{name}_raw")
    mask = " & ".join(ctx.tile.broadcast(m, a) for a, _, m in ctx.tile.tiled)
    emit = ctx.emit
    emit(f"{name} = tl.where({mask}, {raw}, 0.0)")
    return name


#: id(program) -> (program, its `_grad_terms`): asked on every backward (an lru_cache would
#: hash the program's nodes each time)
_TERMS: dict[int, tuple] = {}


def _grad_terms(program) -> tuple:
    """((input, ((operand, d operand / d input), ...)), ...) for the inputs the loss's
    gradient reaches (through the query, the key and the log-decay; the value and the
    epilogue come after the matrix)."""
    memo = _TERMS.get(id(program))
    if memo is not None and memo[0] is program:
        return memo[1]
    exprs = program.backward
    if not isinstance(exprs, BackwardExprs):
        ChainRule(program)                  # raises the chain rule's error for this program
    ops = exprs.operands
    terms = []
    for inp in program.inputs:
        d = tuple((op, ops[op][inp.name]) for op in GRADIENTS if inp.name in ops.get(op, {}))
        if d:
            terms.append((inp.name, d))
    _TERMS[id(program)] = (program, tuple(terms))
    return tuple(terms)


def _setup(emit: Emitter, carries: list[str], grads: bool = False) -> None:
    emit("bh = tl.program_id(0).to(tl.int64)")
    emit("ssmc_qs, ssmc_ks, ssmc_cin, ssmc_aft, ssmc_z, ssmc_pre, ssmc_end = _operands(")
    emit("    ssmc_ws, T, N, NB, DECAY)")
    if grads:
        emit("ssmc_lse, ssmc_dd, ssmc_dqs, ssmc_dks = _gradients(ssmc_ws, T, N, NB, DECAY)")
    emit("b_idx = bh // H")
    emit("h_idx = bh % H")
    emit("g_idx = h_idx // HPG")
    emit("offs_c = tl.arange(0, BT)")
    emit("offs_n = tl.arange(0, BN)")
    emit("mask_n = offs_n < N")
    for line in carries:
        emit(line)


def _zero(wide: bool, dtype: str = "tl.float32") -> str:
    """A loop-carried zero per key dim (BN,), or a scalar one."""
    return f"tl.zeros([BN], {dtype})" if wide else f"tl.sum(tl.zeros([BT], {dtype}), axis=0)"


def _render_prep(plan: Plan) -> str:
    """`ssmc_mixing_prep`, one program per (b, h) walking the blocks of BT steps: the prologue
    on each block (the query and key (BT, n), the log-decay (BT,) or (BT, n)), stored in the
    operand workspace (`_operands`): q_s, k_s; the log-decay's sums inside the block, cin
    (inclusive) and aft (of the later steps: a suffix sum of the next steps' log-decays, not a
    suffix sum minus the step), the resets up to each step z, and the float64 prefix sums of
    the block sums (pre). Resets (log-decay < RESET_BELOW) are counted apart and never summed."""
    prog = plan.program
    rec = prog.recurrence
    mode = _decay_mode(prog)
    wide = mode == 2
    e = Emitter(indent=2)
    e("row = (bh * T + offs_t[:, None]) * N + offs_n[None, :]")
    e("rmask = mask_t[:, None] & mask_n[None, :]")
    for node, name in ((rec.query, "ssmc_q"), (rec.key, "ssmc_k")):
        _operand(Context(prog, QK_TILE, e, f"{name}_in"), node, name)
        e(f"tl.store({name}s + row, {name}, mask=rmask)")
    carries = []
    if mode:
        carries = [f"zrun = {_zero(wide)}", f"prun = {_zero(wide, 'tl.float64')}"]
        _operand(Context(prog, _tile("offs_t", "mask_t", wide), e, "ssmc_l"), prog.log_decay,
                 "ssmc_ld")
        e("offs_u = offs_t + 1")
        e("mask_u = (offs_c < BT - 1) & (offs_u < T)")
        _operand(Context(prog, _tile("offs_u", "mask_u", wide), e, "ssmc_u"), prog.log_decay,
                 "ssmc_ln")
        e(f"rz = tl.where(ssmc_ld < {RESET_BELOW}, 1.0, 0.0)")
        e("ssmc_ld = tl.where(rz > 0.0, 0.0, ssmc_ld)")
        e(f"ssmc_ln = tl.where(ssmc_ln < {RESET_BELOW}, 0.0, ssmc_ln)")
        at, mask = ("row", "rmask") if wide else ("bh * T + offs_t", "mask_t")
        e(f"tl.store(ssmc_cin + {at}, tl.cumsum(ssmc_ld, axis=0), mask={mask})")
        e(f"tl.store(ssmc_aft + {at}, tl.cumsum(ssmc_ln, axis=0, reverse=True), mask={mask})")
        e(f"tl.store(ssmc_z + {at}, zrun + tl.cumsum(rz, axis=0), mask={mask})")
        e("zrun += tl.sum(rz, axis=0)")
        e("prun += tl.sum(ssmc_ld.to(tl.float64), axis=0)")
        if wide:
            e("tl.store(ssmc_pre + (bh * NB + i) * N + offs_n, prun, mask=mask_n)")
        else:
            e("tl.store(ssmc_pre + bh * NB + i, prun)")
    top = Emitter(indent=1)
    _setup(top, carries)
    return f"""
@triton.jit
def ssmc_mixing_prep(
    {input_params(prog)},
    ssmc_ws, T, H, HPG, N, NB, BT: tl.constexpr, BN: tl.constexpr, DECAY: tl.constexpr,
):
{top.text()}
    for i in range(0, NB):
        offs_t = i * BT + offs_c
        mask_t = offs_t < T
{e.text()}
"""


def _render_grads(plan: Plan) -> str:
    """`ssmc_mixing_grads`, one program per (b, h) walking the blocks backwards: the chain rule
    from the operand gradients dq_s, dk_s (the backward's workspace) to the inputs. d ld_r =
    sum_{t >= r} (q_s . dq_s - k_s . dk_s)[t] (per key dim for a decay over n; exactly 0 at a
    reset) is a suffix sum over the block plus the later blocks' total; each input's terms
    (operand gradient * d operand / d input, `Program.backward`) are added on the tile, summed
    over n where it lacks n and over t (across the blocks) where it lacks t, and stored at the
    strides the host passes: into the input's gradient in its own dtype, or into a per-(b, h)
    fp32 partial the host sums over b and heads."""
    prog = plan.program
    mode = _decay_mode(prog)
    wide = mode == 2
    terms = _grad_terms(prog)
    uses = {op for _, d in terms for op, _ in d}
    carries, e, post = [], Emitter(indent=2), Emitter(indent=1)
    e("row = (bh * T + offs_t[:, None]) * N + offs_n[None, :]")
    e("rmask = mask_t[:, None] & mask_n[None, :]")
    if mode or "query" in uses:
        e("ssmc_dq = tl.load(ssmc_dqs + row, mask=rmask, other=0.0)")
    if mode or "key" in uses:
        e("ssmc_dk = tl.load(ssmc_dks + row, mask=rmask, other=0.0)")
    if mode:
        carries.append(f"carry = {_zero(wide)}")
        e("ssmc_a = (tl.load(ssmc_qs + row, mask=rmask, other=0.0) * ssmc_dq -")
        e("          tl.load(ssmc_ks + row, mask=rmask, other=0.0) * ssmc_dk)")
        if not wide:
            e("ssmc_a = tl.sum(ssmc_a, axis=1)")
        e("ssmc_dld = carry + tl.cumsum(ssmc_a, axis=0, reverse=True)")
        e("carry += tl.sum(ssmc_a, axis=0)")
    # derivatives on the (BT, BN) tile, and on the steps (BT,) for a log-decay without n
    on_tile = Context(prog, QK_TILE, e, "ssmc_d2")
    on_steps = on_tile if wide else Context(prog, _tile("offs_t", "mask_t", False), e, "ssmc_d1")
    if mode:
        _operand(on_steps, prog.log_decay, "ssmc_ld")
        e(f"ssmc_dld = tl.where(ssmc_ld < {RESET_BELOW}, 0.0, ssmc_dld)")
    outs = []
    for k, (name, derivs) in enumerate(terms):
        axes = set(prog.input(name).axes)
        two, one = [], []
        for op, expr in derivs:
            if op == "log_decay" and not wide:      # on the steps alone (BT,)
                d = on_steps.value(expr, f"ssmc_d{k}_{op}")
                one.append(f"tl.where(mask_t, {GRADIENTS[op]} * {d}, 0.0)")
            else:
                d = on_tile.value(expr, f"ssmc_d{k}_{op}")
                two.append(f"tl.where(rmask, {GRADIENTS[op]} * {d}, 0.0)")
        # an input with n is not read by a log-decay without n: its terms are all (BT, BN)
        if "n" in axes:
            e(f"ssmc_v{k} = " + " + ".join(two))
        else:
            e(f"ssmc_v{k} = " + " + ".join(
                ([f"tl.sum({' + '.join(two)}, axis=1)"] if two else []) + one))
        out = f"ssmc_g{k}"
        outs.append(f"{out}, {out}_b, {out}_t, {out}_h, {out}_n")
        at = f"{out} + b_idx * {out}_b + h_idx * {out}_h"
        cast = f".to({out}.dtype.element_ty)"
        if "t" in axes:
            if "n" in axes:
                e(f"tl.store({at} + offs_t[:, None] * {out}_t + offs_n[None, :] * {out}_n, "
                  f"ssmc_v{k}{cast}, mask=rmask)")
            else:
                e(f"tl.store({at} + offs_t * {out}_t, ssmc_v{k}{cast}, mask=mask_t)")
        else:
            carries.append(f"ssmc_acc{k} = {_zero('n' in axes)}")
            e(f"ssmc_acc{k} += tl.sum(ssmc_v{k}, axis=0)")
            if "n" in axes:
                post(f"tl.store({at} + offs_n * {out}_n, ssmc_acc{k}{cast}, mask=mask_n)")
            else:
                post(f"tl.store({at}, ssmc_acc{k}{cast})")
    top = Emitter(indent=1)
    _setup(top, carries, grads=True)
    return f"""
@triton.jit
def ssmc_mixing_grads(
    {input_params(prog)},
    ssmc_ws, {', '.join(outs)},
    T, H, HPG, N, NB, BT: tl.constexpr, BN: tl.constexpr, DECAY: tl.constexpr,
):
{top.text()}
    for ii in range(0, NB):
        i = NB - 1 - ii
        offs_t = i * BT + offs_c
        mask_t = offs_t < T
{e.text()}
{post.text()}
"""


def render(plan: Plan) -> str:
    """The generated module of one plan's loss: its prologue and its chain rule."""
    return (HEADER + f"from {__name__} import _gradients, _operands\n" + _render_prep(plan) +
            _render_grads(plan))


#: id(plan) -> (plan, what selects the cache directory and the backend's tag, module)
_MODULES: dict[int, tuple] = {}


def _module(plan: Plan):
    """The generated module of `plan`: a dict lookup per call once loaded (the cache
    directory and the backend's tag are made from these environment variables; building
    them, a Path, is a part of a call's host time worth saving)."""
    env = os.environ
    where = (env.get("SSMC_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"),
             env.get("TRITON_INTERPRET"))
    memo = _MODULES.get(id(plan))
    if memo is not None and memo[0] is plan and memo[1] == where:
        return memo[2]
    backend = registered()["triton"]
    module = backend.load_generated(f"mixing_{plan.cache_key(backend.cache_tag())}",
                                    lambda: render(plan))
    _MODULES[id(plan)] = (plan, where, module)
    return module


# --------------------------------------------------------------------------- host side

class Launch:
    """The workspace of one call and the launch parameters. The workspace is one fp32 buffer
    (a launch's pointers into it are made in the kernels, `_operands` and `_gradients`): the
    operands in the kernels' layout, filled by the generated prologue kernel, then for a
    backward the operand gradients and the softmax statistics."""

    def __init__(self, plan: Plan, tensors: dict, sizes: dict, q, k, scale: float,
                 backward: bool = True, keep: int | None = None):
        """`backward`: with room for a backward; `keep`: unless the workspace would take more
        bytes than that (then `backward` is dropped: the backward makes its own)."""
        prog = plan.program
        B, T, H, G, N = (sizes[a] for a in "bthgn")
        self.plan, self.tensors, self.sizes = plan, tensors, sizes
        self.B, self.H, self.T, self.N, self.HPG = B, H, T, N, H // G
        # the teacher (q, k) is None for the attention matrix's backward
        self.q, self.k, self.scale = q, k, scale
        self.DH = 16 if q is None else q.shape[3]
        self.HPK = 1 if k is None else H // k.shape[2]
        self.decay = _decay_mode(prog)
        diag = self.decay == 2
        self.device = tensors[prog.inputs[0].name].device
        # a decay over n: W is a (BT, BT, BN) broadcast, BN key dims at a time (16K elements)
        self.BT = (32 if diag else 64) if self.device.type == "cuda" else 16
        self.NB = triton.cdiv(T, self.BT)
        self.consts = dict(BT=self.BT, BN=16 if diag else max(16, next_pow2(N)),
                           BD=max(16, next_pow2(self.DH)), DECAY=self.decay,
                           LOWP=plan.dtype in ("bfloat16", "float16") and not interpreting(),
                           PREC=fp32_precision(), num_warps=4)
        # the layout of `_operands` and `_gradients`, in fp32 elements
        BH, width = B * H, N if diag else 1
        size = BH * T * 2 * N
        if self.decay:
            size += 3 * BH * T * width
            size += size % 2 + 2 * BH * self.NB * width       # float64 prefix sums
        grads = BH * T * (2 + 2 * N)
        if keep is not None and 4 * (size + grads) > keep:
            backward = False
        self.backward_room = backward
        self.ws = torch.empty(size + grads * backward, dtype=torch.float32, device=self.device)
        self.module = _module(plan)
        if BH * T:
            self.module.ssmc_mixing_prep[(BH,)](
                *input_args(prog, tensors), self.ws, T, H, self.HPG, N, self.NB,
                BT=self.BT, BN=max(16, next_pow2(N)), DECAY=self.decay, num_warps=4)

    def _args(self):
        return (self.ws, self.q, *self.q.stride(), self.k, *self.k.stride())

    def _sizes(self):
        return (self.T, self.H, self.HPK, self.N, self.DH, self.NB, self.scale)

    def forward(self) -> torch.Tensor:
        """The (b, h) losses."""
        part = self.ws.new_empty(self.B, self.H, self.NB)
        if self.T:
            mixing_loss_fwd[(self.B * self.H, self.NB)](*self._args(), part, *self._sizes(),
                                                        **self.consts)
        return part.sum(-1)

    def backward(self, grad):
        """(dq, dk), the teacher's gradients in its dtype; dq_s, dk_s in the workspace."""
        B, T, H, DH, HPK = self.B, self.T, self.H, self.DH, self.HPK
        q, k = self.q, self.k
        g = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
        dq = torch.empty(B, T, H, DH, dtype=q.dtype, device=self.device)
        # per head, (b, t, hk, heads sharing it, d): summed over those below, in fp32
        dkt = (torch.empty(B, T, H, DH, dtype=k.dtype, device=self.device) if HPK == 1 else
               torch.empty(B, T, H // HPK, HPK, DH, dtype=torch.float32, device=self.device))
        grid = (B * H, self.NB)
        if T:
            mixing_loss_bwd_rows[grid](*self._args(), g, *g.stride(), dq, *self._sizes(),
                                       **self.consts)
            mixing_loss_bwd_cols[grid](*self._args(), g, *g.stride(), dkt, *self._sizes(),
                                       **self.consts)
        if HPK == 1:
            return dq, dkt
        dk = dkt.sum(3)
        return dq, dk if dk.dtype == k.dtype else dk.to(k.dtype)

    def matrix_backward(self, grad, reduce: str) -> None:
        """dq_s, dk_s in the workspace from the gradient of the hidden attention matrix:
        (b, h, t, t), or (b, t, t) summed / averaged over heads."""
        grad = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
        if grad.dim() == 3:                     # reduced over heads: the same dM for each
            sgb, sgt, sgs = grad.stride()
            strides = (sgb, 0, sgt, sgs)
        else:
            strides = grad.stride()
        gscale = 1.0 / self.H if reduce == "mean" else 1.0
        consts = {k: v for k, v in self.consts.items() if k != "BD"}
        if self.T:
            args = (self.ws, grad, *strides, self.T, self.H, self.N, self.NB, gscale)
            grid = (self.B * self.H, self.NB)
            matrix_bwd_rows[grid](*args, **consts)
            matrix_bwd_cols[grid](*args, **consts)

    def input_grads(self) -> dict:
        """Every input's gradient from the operand gradients in the workspace: the chain-rule
        kernel stores each into the input's gradient where one program per (b, h) owns its
        elements, else into an fp32 partial per (b, h) summed here."""
        prog = self.plan.program
        B, T, H, N, HPG = self.B, self.T, self.H, self.N, self.HPG
        result, finish, args = {}, [], []
        for name, _ in _grad_terms(prog):
            inp, x = prog.input(name), self.tensors[name]
            has = set(inp.axes)
            if ("b" in has or B == 1) and ("h" in has or H == 1 or ("g" in has and HPG == 1)):
                out = result[name] = torch.empty(x.shape, dtype=x.dtype, device=self.device)
                st = dict(zip(inp.axes, out.stride()))
                st.setdefault("h", st.get("g", 0))
            else:
                # (b, t if it has t, heads as (g, heads of a group) or h, n if it has n):
                # summed over b and the heads it lacks, it has the input's axes
                axes = ["b"] + [a for a in "tghn" if a in has or (a == "h" and "g" not in has)]
                shape = [{"b": B, "t": T, "n": N, "g": H // HPG}.get(a, H) for a in axes]
                if "g" in has:
                    axes.insert(axes.index("g") + 1, "h")
                    shape.insert(axes.index("h"), HPG)
                out = torch.empty(shape, dtype=torch.float32, device=self.device)
                st = dict(zip(axes, out.stride()))
                dims = [i for i, a in enumerate(axes) if a not in has or (a == "h" and "g" in has)]
                finish.append((inp, x, out, dims))
            args += [out, st.get("b", 0), st.get("t", 0), st["h"], st.get("n", 0)]
        if B * H * T:
            self.module.ssmc_mixing_grads[(B * H,)](
                *input_args(prog, self.tensors), self.ws, *args, T, H, HPG, N, self.NB,
                BT=self.BT, BN=max(16, next_pow2(N)), DECAY=self.decay, num_warps=4)
        else:
            for out in args[::5]:
                out.zero_()
        for inp, x, part, dims in finish:
            result[inp.name] = _finish(inp, x, part.sum(dims))
        for inp in prog.inputs:
            if inp.name not in result:
                x = self.tensors[inp.name]
                result[inp.name] = torch.zeros(x.shape, dtype=x.dtype, device=self.device)
        return result


def _finish(inp, x, g):
    """An input's gradient from its fp32 sum `g` with its axes in canonical order (b t g h n):
    in its own dtype and layout."""
    canon = [a for a in "btghn" if a in inp.axes]
    if list(inp.axes) != canon:
        g = g.permute([canon.index(a) for a in inp.axes])
    elif g.dtype == x.dtype:
        return g
    return g.to(x.dtype, memory_format=torch.contiguous_format)


def _launch(plan: Plan, tensors: dict, sizes: dict, q, k, scale: float, **kwargs) -> Launch:
    """The workspace of a call the fused kernels take, its operands made (`Launch`)."""
    return Launch(plan, tensors, sizes, q, k, scale, **kwargs)


#: the most memory (bytes) a call's workspace with room for its backward may take for the
#: forward to keep it, its operands made, for its backward (`Prepared`): making them again is
#: a launch and an allocation, which at small shapes is a part of a call's host time worth
#: saving, and nothing next to the kernels' time at large ones, where holding them from the
#: forward to the backward would cost memory instead
KEEP_BYTES = 8 << 20


def _identity(tensors: dict, q, k, scale: float) -> tuple:
    """What makes two calls' operands the same: the very memory (address, layout, dtype,
    device) and its version (bumped by every in-place change) of each tensor, and the scale."""
    return (scale,) + tuple((x.data_ptr(), x.dtype, x.device, tuple(x.shape), x.stride(),
                             x._version) for x in (*tensors.values(), q, k))


class Prepared:
    """The operands of one call (`Launch`), kept by a forward for its own backward, which then
    makes none of them again (the same values: they are made from the same tensors).
    `matches` tells whether a backward runs on the tensors, in the versions, they were made
    from."""

    def __init__(self, plan: Plan, launch: Launch, tensors: dict, q, k, scale: float):
        self.plan, self.launch = plan, launch
        self._identity = _identity(tensors, q, k, scale)

    def matches(self, plan: Plan, tensors: dict, q, k, scale: float) -> bool:
        return plan == self.plan and _identity(tensors, q, k, scale) == self._identity


def loss(plan: Plan, tensors: dict, sizes: dict, q, k, scale: float,
         keep: list | None = None) -> torch.Tensor:
    """(b, h) fp32 losses by the fused kernels (`fused(plan)` must be None). With `keep` (a
    list), the call's operands are appended to it as a `Prepared` for the backward, where they
    take at most KEEP_BYTES."""
    launch = _launch(plan, tensors, sizes, q, k, scale, backward=keep is not None,
                     keep=KEEP_BYTES)
    out = launch.forward()
    if launch.backward_room:
        keep.append(Prepared(plan, launch, tensors, q, k, scale))
    return out


def loss_backward(plan: Plan, tensors: dict, sizes: dict, q, k, scale: float, grad,
                  prepared: Prepared | None = None):
    """(input gradients, dq, dk) by the fused kernels; the softmax statistics are recomputed
    (by the rows kernel, a pass over the teacher's scores only). `prepared`: the forward's
    operands, used where they were made from these very tensors (`Prepared.matches`), else
    made again."""
    _grad_terms(plan.program)           # an underivable program fails before any launch
    if prepared is not None and prepared.matches(plan, tensors, q, k, scale):
        launch = prepared.launch
    else:
        launch = _launch(plan, tensors, sizes, q, k, scale)
    dq, dk = launch.backward(grad)
    return launch.input_grads(), dq, dk


def matrix_backward(plan: Plan, tensors: dict, sizes: dict, grad, reduce: str) -> dict:
    """Input gradients of the hidden attention matrix from its gradient, by the kernels above
    (`fused(plan)` must be None): dM is read tile by tile, M is not recomputed."""
    _grad_terms(plan.program)
    launch = _launch(plan, tensors, sizes, None, None, 1.0)
    launch.matrix_backward(grad, reduce)
    return launch.input_grads()
