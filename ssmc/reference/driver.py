"""What both references share: operands, directions, packed sequences, states, epilogue.

A `core(decay, key, value, query, h0)` applies the forward recurrence to one segment of
canonical float64 operands and returns (y (b, t, h, p), final state (b, h, n, p)).
Reverse runs the core on the time-flipped segment, and a grid's column orders on the segment
gathered in column order, so both cores only know forward time. An input with the order
axis `k` gives each order its slice (`ssmc.ir.orders`).
"""
from __future__ import annotations

import torch

from ..ir import Program
from ..ir.orders import grid_step_positions, has_order_axis, order_program, order_tensors
from .evaluate import canonical_inputs, epilogue, prologue


def _time_slice(x, start, stop):
    return x if x is None or x.shape[1] == 1 else x[:, start:stop]


def _flip(x):
    return x if x is None or x.shape[1] == 1 else x.flip(1)


def _gather(x, positions):
    return x if x is None or x.shape[1] == 1 else x[:, positions]


def run(program: Program, core, tensors: dict, sizes: dict, initial_state=None,
        cu_seqlens=None, return_final_state=False):
    """Float64 output (b, t, h, p) and, if asked, the final state(s)."""
    B, T, H, N, P = sizes["b"], sizes["t"], sizes["h"], sizes["n"], sizes["p"]

    def operands(order: int):
        prog, xs = order_program(program), order_tensors(program, tensors, order)
        env = canonical_inputs(prog, xs, sizes)
        ops = {k: None if v is None else v.expand(B, v.shape[1], H, v.shape[3], v.shape[4])
               for k, v in prologue(prog, env).items()}
        return env, ops

    env, ops = operands(0)      # the epilogue reads no input with `k`
    per_order = has_order_axis(program)
    if cu_seqlens is None:
        segments = [(None, 0, T)]
    else:
        bounds = [int(v) for v in cu_seqlens.tolist()]
        segments = [(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    directions = program.recurrence.directions
    bidirectional = len(directions) > 1
    y = torch.zeros(B, T, H, P, dtype=torch.float64, device=ops["value"].device)
    finals = []
    for d_index, direction in enumerate(directions):
        if per_order and d_index:
            _, ops = operands(d_index)
        positions = None
        if direction.column:
            positions = grid_step_positions(direction, sizes["grid_h"], sizes["grid_w"],
                                            ops["value"].device)
        h0_all = None
        if initial_state is not None:
            h0_all = initial_state[d_index] if bidirectional else initial_state
            h0_all = h0_all.to(torch.float64)
        seg_finals = []
        for seq, start, stop in segments:
            parts = {k: _time_slice(v, start, stop) for k, v in ops.items()}
            if seq is not None:  # packed batch: b == 1, one state per sequence
                h0 = None if h0_all is None else h0_all[seq:seq + 1]
            else:
                h0 = h0_all
            if h0 is None:
                h0 = torch.zeros(parts["value"].shape[0] if seq is not None else B, H, N, P,
                                 dtype=torch.float64, device=y.device)
            if stop == start:  # an empty sequence passes its state through
                seg_finals.append(h0)
                continue
            if positions is not None:   # a whole grid: no packed sequences
                parts = {k: _gather(v, positions) for k, v in parts.items()}
            elif direction.reversed:
                parts = {k: _flip(v) for k, v in parts.items()}
            ys, hT = core(parts["decay"], parts["key"], parts["value"], parts["query"], h0,
                          stop - start)
            if positions is not None:
                y[:, positions] += ys
                seg_finals.append(hT)
                continue
            if direction.reversed:
                ys = ys.flip(1)
            y[:, start:stop] += ys
            seg_finals.append(hT)
        finals.append(torch.cat(seg_finals, 0))
    out = epilogue(program, y, env)
    if not return_final_state:
        return out, None
    final = torch.stack(finals, 0) if bidirectional else finals[0]
    return out, final
