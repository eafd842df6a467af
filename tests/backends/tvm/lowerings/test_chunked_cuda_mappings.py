"""Index arithmetic of the CUDA chunked lowering's copies and passes, emulated in numpy with
the formulas the kernels use (lowerings/chunked_cuda/: chunk_pass.py's staged store and key
pairs, seq_pass.py's vectors, out_pass.py's state prefetch, copies.py's value pairs): every
element written once, from the right place, aligned, coalesced, free of bank conflicts. The
kernels themselves only run on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from ssmc.backends.tvm.lowerings.chunked_cuda.tiles import (  # noqa: E402
    THREADS,
    WARPS,
    stage_cols,
)


@pytest.mark.parametrize("NB,BPS,esz,N,P", [(128, 64, 2, 128, 64), (64, 64, 4, 64, 64),
                                            (48, 24, 2, 40, 20), (16, 8, 2, 36, 13),
                                            (64, 16, 4, 40, 13)])
def test_chunk_pass_staged_store_mapping(NB, BPS, esz, N, P):
    """Every (p, n) of ws[slot, h] is written exactly once, from the accumulator entry that
    holds it; the accumulators' scatter into sO is free of shared-memory bank conflicts; the
    16-byte copies are aligned at both ends."""
    SW = stage_cols(NB, esz)
    mt_total, nt = NB // 16, BPS // 8
    mtw = -(-mt_total // WARPS)
    # 1. accumulators -> sO[col, row] (each_acc's row_/col_, stored where the m-tile is valid)
    owner = np.zeros((BPS, NB), int)
    for wp in range(WARPS):
        for i in range(mtw):
            for j in range(nt):
                for r in range(2):
                    for c in range(2):
                        words = {}
                        for ln in range(32):
                            g, tg = ln // 4, ln % 4
                            row = min(wp + WARPS * i, mt_total - 1) * 16 + g + r * 8
                            col = j * 8 + tg * 2 + c
                            if wp + WARPS * i < mt_total:
                                owner[col, row] += 1
                                word = (col * SW + row) * esz // 4
                                words.setdefault(word % 32, set()).add(word)
                        assert all(len(v) == 1 for v in words.values()), "bank conflict"
    assert (owner == 1).all()
    # 2. sO -> ws, over every block (nb_, pb_) of the grid
    VE = 16 // esz
    per = VE if N % VE == 0 else 1
    cols = NB // per
    total = BPS * cols
    nit = -(-total // THREADS)
    written = np.zeros((P, N), int)
    for nb in range(-(-N // NB)):
        for pb in range(-(-P // BPS)):
            for it in range(nit):
                for tx in range(THREADS):
                    ix = it * THREADS + tx
                    r, c = ix // cols, ix % cols * per
                    n, p = nb * NB + c, pb * BPS + r
                    if ix < total and n < N and p < P:
                        assert n + per <= N and c + per <= NB   # whole vectors
                        if per > 1:
                            assert (r * SW + c) * esz % 16 == 0 and (p * N + n) * esz % 16 == 0
                        written[p, n:n + per] += 1
    assert (written == 1).all()


@pytest.mark.parametrize("PN,SV,VE", [(8192, 4, 8), (8192, 2, 8), (360, 4, 8), (4096, 4, 4),
                                      (2600, 1, 4)])
def test_seq_pass_vector_mapping(PN, SV, VE):
    """The vectorised sequential pass covers every state entry of a (sequence, head) exactly
    once, in whole aligned vectors, consecutive threads on consecutive vectors."""
    assert PN % VE == 0
    E = SV * VE
    nblk = -(-PN // (THREADS * E))
    seen = np.zeros(PN, int)
    for eb in range(nblk):
        for v in range(SV):
            starts = [((eb * SV + v) * THREADS + tx) * VE for tx in range(THREADS)]
            assert all(b - a == VE for a, b in zip(starts, starts[1:]))  # coalesced
            for e in starts:
                if e < PN:
                    assert e % VE == 0 and e + VE <= PN
                    seen[e:e + VE] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("Q,NB,N,cl", [(64, 128, 128, 64), (64, 128, 128, 37), (16, 32, 40, 9)])
def test_key_pairs_transpose(Q, NB, N, cl):
    """plan.tile KV: the key tile from 16-byte row loads, two steps an item, entry k of the two
    rows packed into one 32-bit word of sWt (low half: the even step), equals key^T (zero
    past cl and N), with consecutive threads on consecutive step pairs."""
    VL, pad = 8, 8
    rng = np.random.default_rng(0)
    key = rng.integers(0, 1 << 16, size=(Q, -(-N // VL) * VL), dtype=np.uint16)  # bf16 bits
    words = key.view("<u4")                                   # little-endian rows, 2 a word
    half, cv = Q // 2, NB // VL
    swt = np.full(NB * (Q + pad) // 2, 0xDEADBEEF, dtype=np.uint32)
    for nb in range(-(-N // NB)):
        swt[:] = 0xDEADBEEF
        for ix in range(-(-(half * cv) // THREADS) * THREADS):
            if ix >= half * cv:
                continue
            r, c = ix % half, ix // half * VL
            n = nb * NB + c
            vv = []
            for row in (2 * r, 2 * r + 1):
                ok = row < cl and n < N
                vv.append(words[row, n // 2:n // 2 + 4] if ok else np.zeros(4, np.uint32))
            for k in range(VL):
                sh = np.uint32(k % 2 * 16)
                e0 = (vv[0][k // 2] >> sh) & np.uint32(65535)
                e1 = (vv[1][k // 2] >> sh) & np.uint32(65535)
                swt[((c + k) * (Q + pad) + r * 2) // 2] = e0 | (e1 << np.uint32(16))
        tile = swt.view("<u2").reshape(NB, Q + pad)[:, :Q]    # sWt[nn, j]
        want = np.zeros((NB, Q), np.uint16)
        n_hi = min(N, (nb + 1) * NB) - nb * NB
        want[:n_hi, :cl] = key[:cl, nb * NB:nb * NB + n_hi].T
        assert (tile == want).all()


@pytest.mark.parametrize("BP,KC,VL,esz,N,P", [(64, 128, 8, 2, 128, 64), (64, 64, 8, 2, 64, 40),
                                              (24, 48, 8, 2, 48, 20), (16, 16, 8, 2, 16, 13)])
def test_state_prefetch_mapping(BP, KC, VL, esz, N, P):
    """plan.tile SP: the state tile's vectors (state_prefetch's formulas) cover every (p, n)
    of the block's BP x KC tile once, from ws[.., p, n:n + VL] (16-byte aligned) to the same
    entries of sK's row p (16-byte aligned, rows of KC + 8); zero outside; consecutive threads
    on consecutive vectors of a row."""
    pad, ew = 8, 4 // esz
    cv = KC // VL
    total = BP * cv
    items = -(-total // THREADS)
    rng = np.random.default_rng(1)
    for pb in range(-(-P // BP)):
        ws = rng.integers(1, 1 << 16, size=(P, N), dtype=np.uint16)
        words = ws.view("<u4").reshape(-1)                    # ws[p, n] as flat words
        sk = np.full(BP * (KC + pad) // ew, 0xDEADBEEF, dtype=np.uint32)
        spv = np.zeros((items, 4), np.uint32)
        for tx in range(THREADS):                             # the loads
            for u in range(items):
                ix = u * THREADS + tx
                r, c = ix // cv, ix % cv * VL
                n, p = c, pb * BP + r
                if ix < total and n < N and p < P:
                    assert (p * N + n) * esz % 16 == 0 and n + VL <= N
                    spv[u] = words[(p * N + n) // ew:(p * N + n) // ew + 4]
                else:
                    spv[u] = 0
            for u in range(items):                            # the stores
                ix = u * THREADS + tx
                r, c = ix // cv, ix % cv * VL
                if ix < total:
                    assert (r * (KC + pad) + c) * esz % 16 == 0
                    o = (r * (KC + pad) + c) // ew
                    assert (sk[o:o + 4] == 0xDEADBEEF).all()  # written once
                    sk[o:o + 4] = spv[u]
        tile = sk.view("<u2").reshape(BP, KC + pad)[:, :KC]
        want = np.zeros((BP, KC), np.uint16)
        p_hi = min(P, (pb + 1) * BP) - pb * BP
        want[:p_hi, :min(N, KC)] = ws[pb * BP:pb * BP + p_hi, :KC]
        assert (tile == want).all()
        # coalesced: lanes of a warp on consecutive vectors
        starts = [(ix // cv, ix % cv * VL) for ix in range(32)]
        assert all(b[0] * KC + b[1] - a[0] * KC - a[1] == VL for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("Q,bp,P,cl", [(64, 64, 64, 64), (64, 64, 64, 37), (16, 24, 20, 16),
                                       (32, 8, 5, 9), (128, 32, 64, 128)])
def test_value_pairs_mapping(Q, bp, P, cl):
    """plan.tile VT (value_pairs' formulas): every (channel, step) of the bp x Q tile written
    once, from the value at (step, channel) (zero past the chunk's length cl or the last
    channel), as whole 32-bit words (even steps); a warp's 32 words (row stride Q + 8
    elements) fall in 32 distinct banks."""
    ncb, total = bp // 8, Q // 2 * bp
    assert total % 64 == 0   # whole warps (the last batch may leave some idle: ix_ < total)
    for pb in range(-(-P // bp)):
        value = np.arange(1, Q * P + 1).reshape(Q, P)
        tile = np.full((bp, Q + 8), -1)
        for ix in range(total):
            c = ix // 32 % ncb * 8 + ix % 8
            r2 = (ix // 32 // ncb * 4 + ix % 32 // 8) * 2
            p = pb * bp + c
            for k in range(2):
                assert tile[c, r2 + k] == -1
                tile[c, r2 + k] = value[r2 + k, p] if r2 + k < cl and p < P else 0
            assert (c * (Q + 8) + r2) % 2 == 0
        want = np.zeros((bp, Q), int)
        p_hi = min(P, (pb + 1) * bp) - pb * bp
        want[:p_hi, :cl] = value[:cl, pb * bp:pb * bp + p_hi].T
        assert (tile[:, :Q] == want).all()
        for warp in range(total // 32):
            banks = {(c * (Q + 8) + r2) // 2 % 32 for ix in range(warp * 32, warp * 32 + 32)
                     for c, r2 in [(ix // 32 % ncb * 8 + ix % 8,
                                    (ix // 32 // ncb * 4 + ix % 32 // 8) * 2)]}
            assert len(banks) == 32
