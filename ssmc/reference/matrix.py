"""The materialised float64 reference: y = M x with the semiseparable matrix built explicitly.

Independent of the scan: decay products are built pairwise, `L[t, s] = decay_{s+1} ... decay_t`,
never via a running state.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedError
from ..ir import Direction, Program
from . import driver
from .evaluate import canonical_inputs, prologue


def _full(x, T):
    return x.expand(x.shape[0], T, *x.shape[2:])


def decay_products(decay, T, like):
    """L (b, h, n, p', t, s) with L[t, s] = prod_{r=s+1..t} decay_r for s <= t, else 0."""
    if decay is None:
        decay = torch.ones(1, 1, 1, 1, 1, dtype=like.dtype, device=like.device)
    a = _full(decay, T).permute(0, 2, 3, 4, 1)  # (b, h, n, p', t)
    one = torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)
    # rows built out of place: writing into one tensor would break autograd through it
    rows, prev = [], None
    for i in range(T):
        parts = [one, one.new_zeros(*one.shape[:-1], T - i - 1)]
        if i > 0:
            parts.insert(0, a[..., i:i + 1] * prev[..., :i])
        prev = torch.cat(parts, -1)
        rows.append(prev)
    return torch.stack(rows, -2)


def semiseparable(decay, key, query, T):
    """M (b, h, p', t, s) = sum_n query[t, n] L[t, s, n] key[s, n]."""
    L = decay_products(decay, T, key)
    k = _full(key, T).squeeze(-1).permute(0, 2, 3, 1)    # (b, h, n, s)
    q = _full(query, T).squeeze(-1).permute(0, 2, 3, 1)  # (b, h, n, t)
    return torch.einsum("bhnt,bhnpts,bhns->bhpts", q, L, k)


def matrix_core(decay, key, value, query, h0, T):
    v = _full(value, T).squeeze(3)  # (b, t, h, p)
    M = semiseparable(decay, key, query, T)
    M = M.expand(M.shape[0], M.shape[1], v.shape[-1], T, T)
    y = torch.einsum("bhpts,bshp->bthp", M, v)
    if decay is None:
        through = torch.ones(1, T, 1, 1, 1, dtype=v.dtype, device=v.device)
    else:
        through = torch.cumprod(_full(decay, T), dim=1)  # prod_{r<=t} decay_r
    q = _full(query, T)  # (b, t, h, n, 1)
    y = y + (q * through * h0.unsqueeze(1)).sum(3)
    L_last = decay_products(decay, T, key)[..., T - 1, :]  # (b, h, n, p', s)
    L_last = L_last.expand(*L_last.shape[:3], v.shape[-1], T)
    k = _full(key, T).squeeze(-1).permute(0, 2, 3, 1)       # (b, h, n, s)
    vs = v.permute(0, 2, 3, 1)                               # (b, h, p, s)
    final = torch.einsum("bhnps,bhns,bhps->bhnp", L_last, k, vs) + through[:, T - 1] * h0
    return y, final


def matrix(program: Program, tensors: dict, sizes: dict, initial_state=None, cu_seqlens=None,
           return_final_state=False):
    return driver.run(program, matrix_core, tensors, sizes, initial_state, cu_seqlens,
                      return_final_state)


def attention_matrix(program: Program, tensors: dict, sizes: dict) -> torch.Tensor:
    """M with shape (b, h, t, t): y[t] = sum_s M[t, s] value[s] before the epilogue."""
    env = canonical_inputs(program, tensors, sizes)
    ops = prologue(program, env)
    if ops["decay"] is not None and ops["decay"].shape[-1] > 1:
        raise UnsupportedError(f"{program.name}: the decay varies over 'p', so there is one "
                               "matrix per value channel; attention_matrix returns one per head")
    T = sizes["t"]
    total = 0
    for direction in program.recurrence.directions:
        if direction.column:    # ssmc.matrix refuses grids before this; kept from silence
            raise UnsupportedError(f"{program.name}: no attention matrix over grid orders")
        parts = dict(ops)
        if direction is Direction.REVERSE:
            parts = {k: driver._flip(v) for k, v in parts.items()}
        M = semiseparable(parts["decay"], parts["key"], parts["query"], T)[:, :, 0]
        if direction is Direction.REVERSE:
            M = M.flip(-1).flip(-2)
        total = total + M
    B, H = sizes["b"], sizes["h"]
    return total.expand(B, H, T, T)
