"""The fused matrix-matching loss: sum_{t, s} (M[t, s] - P[t, s])^2 per (b, h), with M the
definition's hidden attention matrix and P = causal softmax(q k^T scale) of a teacher, tile by
tile: both matrices live in registers, never in device memory.

Scope: one forward direction and a decay that is positive with an exact log and does not vary
over p (none, time-invariant, scalar: Mamba-2, RetNet; over n: GLA, Mamba-1's per-channel
heads); `fused(plan)` says why not otherwise, and the backend then runs the block-row torch
path. The prologue runs on the host (the operands q_s, k_s (b, h, t, n) and log-decays
(b, h, t) or (b, h, t, n) are linear in t); the kernels are fixed, not generated per
definition, and the chain rule turns operand gradients into input gradients as for every
kernel (`chain_rule.py`). Scores use tensor cores where the decay does not vary over n; a
decay over n is applied exactly on a (BT, BT, BN) broadcast, BN key dims at a time, whose
gradient parts the program adds to the rows of dq_s / dk_s it owns.

Three kernels, one program per (b * h, block of BT rows or columns), the programs of the
blocks with the most tiles launched first (`_program`):

* `mixing_loss_fwd`: the softmax row statistics in a first pass over the key blocks (online
  max and sum, as flash attention), the log-sum-exp stored; then the loss over the same blocks
  (skipped when the backward recomputes the statistics).
* `mixing_loss_bwd_rows`: D[t] = sum_s P dP in a first pass, then dq (teacher) = scale dS k and
  dq_s = (dM * W) k_s, with dM = 2 g (M - P), dP = -dM, dS = P (dP - D).
* `mixing_loss_bwd_cols`: dk (teacher) = scale dS^T q and dk_s = (dM * W)^T q_s, walking the
  row blocks below each column block (no atomics).

`matrix_bwd_rows` / `matrix_bwd_cols` are the same gradients for `ssmc.attention_matrix`, with
dM read from its gradient (per head, or one for all heads where it was reduced).

Decay weights W[t, s] = exp(sum_{s < u <= t} ld_u) are assembled from sums over disjoint ranges:
inside the row block (cin[t]), the blocks in between (a float64 difference of block prefix
sums, exact enough at any length), and the column block after s (after[s]); within one block,
cin[t] - cin[s]. Log-decays below RESET_BELOW (exp underflows fp32: -1e4, -inf) are counted
as resets apart (W = 0 across one) and never enter a sum. d log-decay comes from the identity
d ld_r = sum_{t >= r} (q_s . dq_s - k_s . dk_s)[t] on the host (exactly 0 at a reset).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ir import DecayKind, Direction
from ...plan import Plan
from .. import matrix_rows
from ..chain_rule import CanonicalInputs, ChainRule
from .common import fp32_precision, interpreting, next_pow2
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
    those rows, so a read-modify-write needs no atomics."""
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
        tl.store(out_ptr + at, tl.load(out_ptr + at, mask=mask, other=0.0) + part, mask=mask)


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
def mixing_loss_fwd(qs_ptr, ks_ptr, qt_ptr, sqb, sqt, sqh, sqd, kt_ptr, skb, skt, skh, skd,
                    cin_ptr, aft_ptr, z_ptr, pre_ptr, lse_ptr, part_ptr,
                    T, H, HPK, N, DH, NB, scale,
                    BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
                    STATS_ONLY: tl.constexpr):
    i, bh = _program(NB, True)
    b_idx, h_idx = bh // H, bh % H
    hk_idx = h_idx // HPK
    offs_t = i * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    qs, qt = _rows_in(bh, b_idx, h_idx, offs_t, mask_t, qs_ptr, qt_ptr, sqb, sqt, sqh, sqd,
                      T, N, DH, BN, BD)
    offs_d = tl.arange(0, BD)
    # pass 1: the softmax normalisers (every row has its diagonal, so the max is finite)
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
    lse = mx + tl.log(sm)
    tl.store(lse_ptr + bh * T + offs_t, lse, mask=mask_t)
    if not STATS_ONLY:
        # pass 2: the loss
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
def mixing_loss_bwd_rows(qs_ptr, ks_ptr, qt_ptr, sqb, sqt, sqh, sqd, kt_ptr, skb, skt, skh,
                         skd, cin_ptr, aft_ptr, z_ptr, pre_ptr, lse_ptr, g_ptr, dd_ptr,
                         dqs_ptr, dqt_ptr, T, H, HPK, N, DH, NB, scale,
                         BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                         DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    i, bh = _program(NB, True)
    b_idx, h_idx = bh // H, bh % H
    hk_idx = h_idx // HPK
    offs_t = i * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    qs, qt = _rows_in(bh, b_idx, h_idx, offs_t, mask_t, qs_ptr, qt_ptr, sqb, sqt, sqh, sqd,
                      T, N, DH, BN, BD)
    lse = tl.load(lse_ptr + bh * T + offs_t, mask=mask_t, other=0.0)
    g2 = 2.0 * tl.load(g_ptr + bh)
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
             dqt * scale, mask=mask_t[:, None] & (offs_d[None, :] < DH))


@triton.jit
def mixing_loss_bwd_cols(qs_ptr, ks_ptr, qt_ptr, sqb, sqt, sqh, sqd, kt_ptr, skb, skt, skh,
                         skd, cin_ptr, aft_ptr, z_ptr, pre_ptr, lse_ptr, g_ptr, dd_ptr,
                         dks_ptr, dkt_ptr, T, H, HPK, N, DH, NB, scale,
                         BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                         DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    j, bh = _program(NB, False)
    b_idx, h_idx = bh // H, bh % H
    hk_idx = h_idx // HPK
    g2 = 2.0 * tl.load(g_ptr + bh)
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
             dkt * scale, mask=mask_s[:, None] & (offs_d[None, :] < DH))


# ------------------------------------------------------- the attention matrix's backward

@triton.jit
def _grad_tile(g_ptr, sgb, sgh, sgt, sgs, b_idx, h_idx, offs_t, mask_t, offs_s, mask_s, gscale):
    """dM of a tile, from the gradient of `attention_matrix` (strides 0 over reduced heads)."""
    return tl.load(g_ptr + b_idx * sgb + h_idx * sgh + offs_t[:, None] * sgt +
                   offs_s[None, :] * sgs, mask=mask_t[:, None] & mask_s[None, :],
                   other=0.0) * gscale


@triton.jit
def matrix_bwd_rows(qs_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, g_ptr, sgb, sgh, sgt,
                    sgs, dqs_ptr, T, H, N, NB, gscale,
                    BT: tl.constexpr, BN: tl.constexpr, DECAY: tl.constexpr,
                    LOWP: tl.constexpr, PREC: tl.constexpr):
    """dq_s = sum_s (dM * W) k_s for one block of rows, dM read from the matrix's gradient."""
    i, bh = _program(NB, True)
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
def matrix_bwd_cols(qs_ptr, ks_ptr, cin_ptr, aft_ptr, z_ptr, pre_ptr, g_ptr, sgb, sgh, sgt,
                    sgs, dks_ptr, T, H, N, NB, gscale,
                    BT: tl.constexpr, BN: tl.constexpr, DECAY: tl.constexpr,
                    LOWP: tl.constexpr, PREC: tl.constexpr):
    """dk_s = sum_t (dM * W)^T q_s for one block of columns."""
    j, bh = _program(NB, False)
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


# --------------------------------------------------------------------------- host side

class Launch:
    """The operands of one call in the kernels' layout, and the launch parameters."""

    def __init__(self, qs, ks, ld, q, k, scale: float, low_precision: bool):
        """qs, ks (b, h, t, n) fp32; ld None, (b, h, t) or (b, h, t, n) (a decay over n)."""
        B, H, T, N = qs.shape
        self.B, self.H, self.T, self.N = B, H, T, N
        # the teacher (q, k) is None for the attention matrix's backward
        self.DH = 16 if q is None else q.shape[3]
        self.HPK = 1 if k is None else H // k.shape[2]
        self.decay = 0 if ld is None else (2 if ld.dim() == 4 else 1)
        # a decay over n: W is a (BT, BT, BN) broadcast, BN key dims at a time (16K elements)
        diag = self.decay == 2
        self.BT = (32 if diag else 64) if qs.is_cuda else 16
        self.NB = triton.cdiv(T, self.BT)
        self.qs, self.ks, self.q, self.k, self.scale = qs, ks, q, k, scale
        self.cin, self.aft, self.z, self.pre = self._decay_parts(ld)
        self.consts = dict(BT=self.BT, BN=16 if diag else max(16, next_pow2(N)),
                           BD=max(16, next_pow2(self.DH)), DECAY=self.decay,
                           LOWP=low_precision and not interpreting(), PREC=fp32_precision(),
                           num_warps=4)

    def _decay_parts(self, ld):
        """cin (inclusive sums inside each block), aft (sums after each step inside its block),
        z (resets up to each step), pre (float64 inclusive prefix sums of the block sums); per
        key dim for a decay over n."""
        if ld is None:
            one = self.qs.new_zeros(1)
            return one, one, one.to(torch.int32), one.double()
        B, H, T, BT, NB = self.B, self.H, self.T, self.BT, self.NB
        wide = ld.dim() == 4
        ld = ld if wide else ld[..., None]                          # (b, h, t, n')
        n = ld.shape[3]
        reset = ld < RESET_BELOW
        self.reset = reset if wide else reset[..., 0]
        z = reset.to(torch.int32).cumsum(2, dtype=torch.int32)
        ldc = torch.where(reset, 0.0, ld)
        blocks = torch.nn.functional.pad(ldc, (0, 0, 0, NB * BT - T)).view(B, H, NB, BT, n)
        cin = blocks.cumsum(3)
        aft = torch.cat([blocks.flip(3).cumsum(3).flip(3)[:, :, :, 1:],
                         torch.zeros_like(blocks[:, :, :, :1])], 3)
        pre = blocks.double().sum(3).cumsum(2)                     # (b, h, nb, n')

        def flat(x, steps):
            x = x.reshape(B * H, steps, n)[:, :T if steps != NB else NB]
            return (x if wide else x[..., 0]).contiguous()

        return (flat(cin, NB * BT), flat(aft, NB * BT), flat(z, T), flat(pre, NB))

    def common(self):
        return (self.qs, self.ks, self.q, *self.q.stride(), self.k, *self.k.stride(),
                self.cin, self.aft, self.z, self.pre)

    def sizes(self):
        return (self.T, self.H, self.HPK, self.N, self.DH, self.NB, self.scale)

    def forward(self, stats_only: bool = False):
        """(loss (b, h), lse); with `stats_only` the softmax statistics alone (the backward
        recomputes them rather than keep them from the forward)."""
        lse = self.qs.new_empty(self.B * self.H, self.T)
        part = self.qs.new_zeros(self.B * self.H, self.NB)
        grid = (self.B * self.H, self.NB)
        if self.T:
            mixing_loss_fwd[grid](*self.common(), lse, part, *self.sizes(), **self.consts,
                                  STATS_ONLY=stats_only)
        return part.sum(-1).view(self.B, self.H), lse

    def backward(self, lse, grad):
        """(dq_s, dk_s (b, h, t, n), dq (b, t, h, d), dk per head (b, t, h, d)), in fp32."""
        BH, T = self.B * self.H, self.T
        g = grad.to(torch.float32).reshape(BH).contiguous()
        dd = self.qs.new_empty(BH, T)
        # a decay over n adds each tile's part to dq_s / dk_s in place
        fresh = torch.zeros_like if self.decay == 2 else torch.empty_like
        dqs, dks = fresh(self.qs), fresh(self.ks)
        dqt = self.qs.new_empty(self.B, T, self.H, self.DH)
        dkt = torch.empty_like(dqt)
        grid = (BH, self.NB)
        if T:
            mixing_loss_bwd_rows[grid](*self.common(), lse, g, dd, dqs, dqt, *self.sizes(),
                                       **self.consts)
            mixing_loss_bwd_cols[grid](*self.common(), lse, g, dd, dks, dkt, *self.sizes(),
                                       **self.consts)
        return dqs, dks, dqt, dkt

    def matrix_backward(self, grad, reduce: str):
        """(dq_s, dk_s) from the gradient of the hidden attention matrix: (b, h, t, t), or
        (b, t, t) summed / averaged over heads."""
        BH, T = self.B * self.H, self.T
        fresh = torch.zeros_like if self.decay == 2 else torch.empty_like
        dqs, dks = fresh(self.qs), fresh(self.ks)
        grad = grad.to(torch.float32)
        if grad.dim() == 3:                     # reduced over heads: the same dM for each
            sgb, sgt, sgs = grad.stride()
            strides = (sgb, 0, sgt, sgs)
        else:
            strides = grad.stride()
        gscale = 1.0 / self.H if reduce == "mean" else 1.0
        consts = {k: v for k, v in self.consts.items() if k not in ("BD",)}
        grid = (BH, self.NB)
        if T:
            args = (self.qs, self.ks, self.cin, self.aft, self.z, self.pre, grad, *strides)
            sizes = (T, self.H, self.N, self.NB, gscale)
            matrix_bwd_rows[grid](*args, dqs, *sizes, **consts)
            matrix_bwd_cols[grid](*args, dks, *sizes, **consts)
        return dqs, dks


def _launch(plan: Plan, tensors: dict, sizes: dict, q, k, scale: float):
    """(Launch, env, operand leaves' shapes) for a call the fused kernels take."""
    env = CanonicalInputs(plan.program, tensors, sizes, torch.float32)
    ops = matrix_rows.operands(plan.program, env)
    B, T, H, N = (sizes[a] for a in "bthn")

    def heads_major(x, n):   # canonical (b, t, h, n, p) -> (b, h, t, n) contiguous fp32
        return x.expand(B, T, H, n, 1)[..., 0].permute(0, 2, 1, 3).contiguous()

    ld = None
    if ops.decay is not None:
        wide = ops.decay.shape[3] > 1                      # a decay over n
        ld = heads_major(ops.decay, N if wide else 1)
        ld = ld if wide else ld[..., 0]
    launch = Launch(heads_major(ops.query, N), heads_major(ops.key, N), ld, q, k, scale,
                    plan.dtype in ("bfloat16", "float16"))
    return launch, env


#: the most memory (bytes, beyond the inputs') the host-side operands of one call may take for
#: the forward to keep them for its backward (`Prepared`): building them is a large part of a
#: call's host time at small shapes, and nothing next to the kernels' time at large ones, where
#: holding them from the forward to the backward would cost memory instead
KEEP_BYTES = 8 << 20


def _identity(tensors: dict, q, k, scale: float) -> tuple:
    """What makes two calls' operands the same: the very memory (address, layout, dtype,
    device) and its version (bumped by every in-place change) of each tensor, and the scale."""
    return (scale,) + tuple((x.data_ptr(), x.dtype, x.device, tuple(x.shape), x.stride(),
                             x._version) for x in (*tensors.values(), q, k))


class Prepared:
    """The host-side operands of one call (`_launch`: the prologue's operands in the kernels'
    layout, the decay's sums, the canonical inputs the chain rule reads), kept by a forward for
    its own backward, which then builds none of them again (the same values: they are made
    from the same tensors). `matches` tells whether a backward runs on the tensors, in the
    versions, they were made from."""

    def __init__(self, plan: Plan, launch: Launch, env, tensors: dict, q, k, scale: float):
        self.plan, self.launch, self.env = plan, launch, env
        self._identity = _identity(tensors, q, k, scale)

    def matches(self, plan: Plan, tensors: dict, q, k, scale: float) -> bool:
        return plan == self.plan and _identity(tensors, q, k, scale) == self._identity

    @staticmethod
    def nbytes(launch: Launch, env, tensors: dict) -> int:
        """The memory the operands hold apart from the inputs' and the teacher's storages."""
        held = list(vars(launch).values()) + list(env.values())
        own = {x.untyped_storage().data_ptr() for x in (*tensors.values(), launch.q, launch.k)}
        storages = {}
        for x in held:
            if isinstance(x, torch.Tensor) and x.numel():
                st = x.untyped_storage()
                if st.data_ptr() not in own:
                    storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())


def loss(plan: Plan, tensors: dict, sizes: dict, q, k, scale: float,
         keep: list | None = None) -> torch.Tensor:
    """(b, h) fp32 losses by the fused kernels (`fused(plan)` must be None). With `keep` (a
    list), the call's host-side operands are appended to it as a `Prepared` for the backward,
    where they take at most KEEP_BYTES."""
    launch, env = _launch(plan, tensors, sizes, q, k, scale)
    out = launch.forward()[0]
    if keep is not None and Prepared.nbytes(launch, env, tensors) <= KEEP_BYTES:
        keep.append(Prepared(plan, launch, env, tensors, q, k, scale))
    return out


def loss_backward(plan: Plan, tensors: dict, sizes: dict, q, k, scale: float, grad,
                  prepared: Prepared | None = None):
    """(input gradients, dq, dk) by the fused kernels; the softmax statistics are recomputed
    (a pass over the teacher's scores only). `prepared`: the forward's operands, used where
    they were made from these very tensors (`Prepared.matches`), else built again."""
    if prepared is not None and prepared.matches(plan, tensors, q, k, scale):
        launch, env = prepared.launch, prepared.env
    else:
        launch, env = _launch(plan, tensors, sizes, q, k, scale)
    _, lse = launch.forward(stats_only=True)
    dqs, dks, dqt, dkt = launch.backward(lse, grad)
    B, T, H = sizes["b"], sizes["t"], sizes["h"]
    grads = _input_grads(plan, env, launch, dqs, dks, tensors, sizes)
    hk = k.shape[2]
    dk = dkt.view(B, T, hk, H // hk, dkt.shape[-1]).sum(3)   # -1 is ambiguous when empty
    return grads, dqt.to(q.dtype), dk.to(k.dtype)


def matrix_backward(plan: Plan, tensors: dict, sizes: dict, grad, reduce: str) -> dict:
    """Input gradients of the hidden attention matrix from its gradient, by the kernels above
    (`fused(plan)` must be None): dM is read tile by tile, M is not recomputed."""
    launch, env = _launch(plan, tensors, sizes, None, None, 1.0)
    dqs, dks = launch.matrix_backward(grad, reduce)
    return _input_grads(plan, env, launch, dqs, dks, tensors, sizes)


def _input_grads(plan: Plan, env, launch: Launch, dqs, dks, tensors, sizes) -> dict:
    """Operand gradients (b, h, t, n) -> input gradients by the chain rule."""
    op_grads = {"query": dqs.permute(0, 2, 1, 3).unsqueeze(-1),
                "key": dks.permute(0, 2, 1, 3).unsqueeze(-1)}
    if launch.decay:
        # d ld_r = sum_{t >= r} (q_s . dq_s - k_s . dk_s)[t], per key dim for a decay over n
        d = launch.qs * dqs - launch.ks * dks                          # (b, h, t, n)
        d = d if launch.decay == 2 else d.sum(-1)
        # across a reset every term is 0: exactly 0 there, not the identity's rounding
        dld = torch.where(launch.reset, 0.0, d.flip(2).cumsum(2).flip(2)).transpose(1, 2)
        op_grads["log_decay"] = (dld if launch.decay == 2 else dld[..., None])[..., None]
    like = dqs.new_zeros((1, 1, 1, 1, 1))
    return ChainRule(plan.program).input_grads(env, like, op_grads, tensors, sizes,
                                               epilogue=False)
