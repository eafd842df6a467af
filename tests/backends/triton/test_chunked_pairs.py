"""Two opposite orders in one output pass (chunked_pairs.py): which orders pair, and the paired
kernels against the float64 reference and against the same op one order a launch.

A pair's first order adds its row block into the fp32 sum and its second order's mirror block
reads it back in the same program: a wrong mirror block, a missed barrier or a reset flag read
from the wrong order shows up as a wrong sum here. Covered: cross2d (both pairs) and
bidirectional; positive decays whose chunks have resets in one order of a pair and not the
other (the counting kernels take both blocks), in both, and in neither; decays of 0 and below
(no reset kernels); no decay; q k^T read from its buffer (four heads a group); a segmented
state pass; an epilogue; initial and final states; several row blocks per chunk.
"""
from __future__ import annotations

import pytest
import torch

import ssmc
from ssmc.ir.nodes import DIRECTION_SETS
from ssmc.ir.orders import grid_step_positions
from ssmc.backends.triton.lowerings import chunked_launch, chunked_pairs
from tests.backends.triton.conftest import TOL
from tests.backends.triton.test_backward import GRAD_TOL
from tests.backends.triton.test_cross2d_chunked import (definition, exp_decay, inputs_for as
                                                        grid_inputs, signed_gate)
from tests.backends.triton.test_scan import builtin, inputs_for, state_for
from tests.helpers import check_against_reference

pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_which_orders_pair():
    cross2d, both = DIRECTION_SETS["cross2d"], DIRECTION_SETS["bidirectional"]
    assert chunked_pairs.order_groups(cross2d, 128, 64, True) == [(0, 2), (1, 3)]
    assert chunked_pairs.order_groups(both, 96, 32, True) == [(0, 1)]
    assert chunked_pairs.order_groups(DIRECTION_SETS["forward"], 64, 64, True) == [(0,)]
    # a sequence that is not a whole number of row blocks, packed sequences, per-key decays
    assert chunked_pairs.order_groups(cross2d, 66, 64, True) == [(0,), (1,), (2,), (3,)]
    assert chunked_pairs.order_groups(both, 128, 64, False) == [(0,), (1,)]


@pytest.fixture
def launches(monkeypatch):
    """The output launches' order groups, recorded; `launches.single()` makes every later
    launch take one order (the unpaired kernels, for comparison)."""
    class Groups(list):
        paired = True

        def single(self):
            self.paired = False

    groups = Groups()
    real = chunked_pairs.order_groups

    def spy(directions, T, rows, pairable):
        got = real(directions, T, rows, pairable and groups.paired)
        groups.extend(got)
        return got

    monkeypatch.setattr(chunked_launch, "order_groups", spy)
    return groups


def _tiles(monkeypatch, **override):
    real = chunked_launch.tiles
    monkeypatch.setattr(chunked_launch, "tiles",
                        lambda *args: dict(real(*args), **override))


def _paired_and_single(launches, run):
    """`run()` with the pairs and again one order a launch: both outputs (fp32) agree to
    rounding (the orders are added in another order)."""
    paired = run()
    assert any(len(g) == 2 for g in launches), launches
    launches.single()
    single = run()
    for a, b in zip(paired, single):
        off = float((a - b).abs().max() / b.abs().max())
        assert off <= 1e-6, off


def _cross2d_resets(grid, resets_at: dict[int, list[int]]) -> dict:
    """exp_decay's inputs: small log-decays, and -1e4 (a decay of 0 to fp32: a reset) at the
    steps `resets_at[k]` of order k's own slice (its steps in its own order)."""
    inputs = grid_inputs(exp_decay, grid, seed=5, b=1)
    gen = torch.Generator().manual_seed(5)
    u = -0.05 * torch.rand(inputs["u"].shape, generator=gen)
    for k, steps in resets_at.items():
        at = grid_step_positions(DIRECTION_SETS["cross2d"][k], *grid)
        for s in steps:
            u[:, k, int(at[s])] = -1e4
    return dict(inputs, u=u)


@pytest.mark.parametrize("where", ["one_of_a_pair", "both", "none"])
def test_cross2d_resets_in_one_order_of_a_pair(where, launches):
    """A 16 x 16 grid in four 64-step chunks per order. `one_of_a_pair`: order 0's first chunk
    and order 2's first (the mirror of order 0's last) hold a reset, and order 1's third: pairs
    of a flagged and an unflagged chunk, and of two unflagged ones; `both`: every chunk of
    every order; `none`: no reset anywhere (the plain kernels alone)."""
    resets = {"one_of_a_pair": {0: [3], 2: [10], 1: [130]},
              "both": {k: [5, 70, 140, 200] for k in range(4)},
              "none": {}}[where]
    inputs = {k: v.to(DEVICE) for k, v in _cross2d_resets((16, 16), resets).items()}
    check_against_reference(exp_decay, inputs, tol=2e-5, grad=where != "none",
                            grad_tol=3e-5, backend="triton", lowering="chunked", grid=(16, 16))
    assert launches and all(len(g) == 2 for g in launches), launches
    op = ssmc.compile(exp_decay, backend="triton", lowering="chunked")
    _paired_and_single(launches, lambda: [op(**inputs, grid=(16, 16))])


@pytest.mark.parametrize("case", ["epilogue_per_order", "zero_and_negative", "no_decay"])
def test_cross2d_pairs(case, launches):
    """8 x 16 (two 64-step chunks per order): Mamba-2's decay with per-order inputs and an
    epilogue; a decay of exactly 0 and negative ones (the direct sums, no reset kernels); no
    decay."""
    grid = (8, 16)
    if case == "epilogue_per_order":
        defn = definition("scalar", True, epilogue=True)
        inputs = grid_inputs(defn, grid, seed=7)
    elif case == "zero_and_negative":
        defn = signed_gate
        inputs = dict(grid_inputs(defn, grid, seed=6, b=1),
                      w=torch.tensor([[0.9, 0.0], [-0.8, 0.7], [0.5, -0.95], [0.0, 0.6]]))
    else:
        defn = definition("none", True)
        inputs = grid_inputs(defn, grid, seed=8)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    check_against_reference(defn, inputs, tol=2e-5, grad_tol=3e-5, backend="triton",
                            lowering="chunked", grid=grid)
    op = ssmc.compile(defn, backend="triton", lowering="chunked")
    _paired_and_single(launches, lambda: [op(**inputs, grid=grid)])


@pytest.mark.parametrize("case, tiles, sizes", [
    # four row blocks per chunk, a chunk past the last whole one (t = 96: 1.5 chunks)
    ("rows_per_chunk", dict(CS=64, BT=16), dict(b=2, t=96, h=2, g=1, n=5, p=3)),
    # four heads a group: the output pass reads q k^T from its buffer, one per order
    ("qk_read", dict(CS=32, BT=32), dict(b=1, t=128, h=4, g=1, n=4, p=3)),
    # the state pass in segments side by side (one segment buffer per order)
    ("segmented", dict(CS=16, BT=16, SEG_state=2), dict(b=2, t=96, h=2, g=1, n=4, p=5)),
])
def test_bidirectional_pairs(case, tiles, sizes, launches, monkeypatch):
    """Mamba-2's SSD both ways with initial and final states, against the reference and
    against one order a launch."""
    _tiles(monkeypatch, **tiles)
    defn = builtin("ssd", "bidirectional")
    inputs = {k: v.to(DEVICE) for k, v in inputs_for(defn, sizes, seed=21).items()}
    h0 = state_for(defn, sizes).to(DEVICE)
    # gradients: the chunked backward's fp32 bound
    check_against_reference(defn, inputs, tol=TOL[torch.float32],
                            grad_tol=GRAD_TOL[("chunked", torch.float32)],
                            backend="triton", lowering="chunked", initial_state=h0,
                            return_final_state=True)
    op = ssmc.compile(defn, backend="triton", lowering="chunked")
    _paired_and_single(launches, lambda: list(op(**inputs, initial_state=h0,
                                                 return_final_state=True)))
