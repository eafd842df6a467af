"""The sequential float64 reference: the recurrence exactly as DESIGN.md states it."""
from __future__ import annotations

import torch

from ..ir import Program
from . import driver


def _at(x, i):
    return x[:, i if x.shape[1] > 1 else 0]


def scan_core(decay, key, value, query, h0, T):
    """state_t = decay_t * state_{t-1} + key_t (x) value_t;  y_t = sum_n query_t * state_t."""
    state = h0.clone()
    ys = []
    for i in range(T):
        if decay is not None:
            state = _at(decay, i) * state
        state = state + _at(key, i) * _at(value, i)
        ys.append((_at(query, i) * state).sum(-2))
    B = state.shape[0]
    y = torch.stack(ys, 1) if ys else state.new_zeros(B, 0, state.shape[1], state.shape[3])
    return y.expand(B, T, state.shape[1], state.shape[3]), state


def scan(program: Program, tensors: dict, sizes: dict, initial_state=None, cu_seqlens=None,
         return_final_state=False):
    return driver.run(program, scan_core, tensors, sizes, initial_state, cu_seqlens,
                      return_final_state)
