"""Scan orders over a grid (direction="cross2d") and the per-order axis `k`.

A cross2d recurrence runs the same 1-D recurrence along four orders of an H x W grid whose t
axis is row-major, and sums the four results before the epilogue. An input with the axis `k`
holds one slice per order; order d reads slice d. Everything here is order bookkeeping that
kernels, the chain rule and the reference share: which program one order runs (the inputs
without `k`), which views of the tensors it reads, and where its step s lands on the grid.
"""
from __future__ import annotations

import torch

from .nodes import Direction, Elementwise, Input, Program

ORDER_AXIS = "k"


def has_order_axis(program: Program) -> bool:
    return any(ORDER_AXIS in i.axes for i in program.inputs)


def _strip(e: Elementwise | None) -> Elementwise | None:
    if e is None or ORDER_AXIS not in e.axes:
        return e
    return Elementwise(e.expr, tuple(a for a in e.axes if a != ORDER_AXIS))


def order_program(program: Program) -> Program:
    """The program one order runs: every input and operand without the axis `k` (an order
    reads its own slice). The directions stay: kernels still need to know the order."""
    if not has_order_axis(program):
        return program
    r = program.recurrence
    rec = type(r)(key=_strip(r.key), value=_strip(r.value), query=_strip(r.query),
                  decay=_strip(r.decay), directions=r.directions, transition=r.transition)
    inputs = tuple(Input(i.name, tuple(a for a in i.axes if a != ORDER_AXIS))
                   for i in program.inputs)
    # the derivatives are expressions over input symbols, the same for every order
    return program.replace(inputs=inputs, recurrence=rec, log_decay=_strip(program.log_decay),
                           backward=program.backward)


def order_tensors(program: Program, tensors: dict, order: int) -> dict:
    """The tensors order `order` reads: an input with `k` as its slice (a view, no copy)."""
    out = dict(tensors)
    for inp in program.inputs:
        if ORDER_AXIS in inp.axes and inp.name in tensors:
            out[inp.name] = tensors[inp.name].select(inp.axes.index(ORDER_AXIS), order)
    return out


def stack_order_grads(program: Program, per_order: list[dict]) -> dict:
    """Gradients of the inputs from each order's gradients (of `order_program`'s inputs): an
    input with `k` gets order d's gradient in slice d, the others the sum over orders."""
    out = {}
    for inp in program.inputs:
        parts = [g.get(inp.name) for g in per_order]
        if all(p is None for p in parts):
            continue
        if ORDER_AXIS in inp.axes:
            like = next(p for p in parts if p is not None)
            parts = [torch.zeros_like(like) if p is None else p for p in parts]
            out[inp.name] = torch.stack(parts, inp.axes.index(ORDER_AXIS))
        else:
            total = None
            for p in parts:
                if p is not None:
                    total = p if total is None else total + p
            out[inp.name] = total
    return out


def grid_step_positions(direction: Direction, grid_h: int, grid_w: int,
                        device=None) -> torch.Tensor:
    """positions[s]: the (row-major) t index that step s of `direction` visits."""
    t = grid_h * grid_w
    steps = torch.arange(t, device=device)
    if direction.reversed:
        steps = t - 1 - steps
    if direction.column:
        steps = (steps % grid_h) * grid_w + steps // grid_h
    return steps


def default_grid(t: int) -> tuple[int, int]:
    """The most nearly square H x W = t (H <= W): a grid to tune or explain a cross2d kernel
    when no call named one."""
    if t < 1:
        return 1, 0
    h = max(d for d in range(1, int(t ** 0.5) + 1) if t % d == 0)
    return h, t // h
