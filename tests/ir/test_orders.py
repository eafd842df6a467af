"""Grid orders (cross2d) and the per-order axis k: the bookkeeping kernels, chain rule and
reference share."""
import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.ir import Direction
from ssmc.ir.orders import (grid_step_positions, has_order_axis, order_program, order_tensors,
                            stack_order_grads)


def _by_permutation(direction: Direction, H: int, W: int) -> torch.Tensor:
    """The positions a direction visits, from transposes and flips of a grid of indices."""
    grid = torch.arange(H * W).view(H, W)
    if direction.column:
        grid = grid.t()
    seq = grid.reshape(-1)
    return seq.flip(0) if direction.reversed else seq


@pytest.mark.parametrize("H, W", [(3, 5), (1, 7), (6, 1), (4, 4), (1, 1)])
@pytest.mark.parametrize("direction", list(Direction))
def test_step_positions_are_the_grid_read_in_that_order(direction, H, W):
    assert torch.equal(grid_step_positions(direction, H, W), _by_permutation(direction, H, W))


@ssmc.ssm
def per_order(x: S.In["b t h p"], dt: S.In["b k t h"], A: S.In["k h"], B: S.In["b t n"],
              C: S.In["b k t n"], D: S.In["h"]):
    y = S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C, direction="cross2d")
    return y + D * x


def test_order_program_strips_k_everywhere():
    prog = per_order.program
    assert has_order_axis(prog) and prog.on_grid
    one = order_program(prog)
    assert not has_order_axis(one)
    assert one.input("dt").axes == ("b", "t", "h") and one.input("A").axes == ("h",)
    r = one.recurrence
    for node in (r.decay, r.key, r.value, r.query, one.log_decay):
        assert "k" not in node.axes
    assert r.directions == prog.recurrence.directions
    assert one.backward is prog.backward


def test_order_tensors_are_views_of_each_slice():
    dt = torch.randn(2, 4, 6, 3)
    A = torch.randn(4, 3)
    x = torch.randn(2, 6, 3, 5)
    xs = order_tensors(per_order.program, {"dt": dt, "A": A, "x": x}, 2)
    assert xs["x"] is x
    assert torch.equal(xs["dt"], dt[:, 2]) and xs["dt"].data_ptr() == dt[:, 2].data_ptr()
    assert torch.equal(xs["A"], A[2])


def test_stack_order_grads_stacks_k_inputs_and_sums_shared_ones():
    per = [{"dt": torch.full((2, 6, 3), float(d)), "x": torch.ones(2, 6, 3, 5)}
           for d in range(4)]
    out = stack_order_grads(per_order.program, per)
    assert out["dt"].shape == (2, 4, 6, 3)
    assert torch.equal(out["dt"][:, 3], torch.full((2, 6, 3), 3.0))
    assert torch.equal(out["x"], torch.full((2, 6, 3, 5), 4.0))
    assert "A" not in out
