"""The Triton scan lowering over a grid (direction="cross2d") against the float64 reference:
outputs and the gradients of every input.

A cross2d recurrence runs along four orders of the row-major H x W grid (row-major, column-major
and both reversed) and sums them before the epilogue; the kernels map each step to its grid
position themselves. Every decay structure the scan takes (none, time-invariant per head,
scalar, diagonal per key, full per (p, n) like Mamba-1 and VMamba), with and without inputs
that hold one slice per order (axis k, as VMamba's dt, A, B, C), on odd grids (H != W, 1 x W,
H x 1), fp32 and bf16, and decays the language accepts beyond (0, 1): exactly 0 and negative.

Tolerances (relative RMS and relative max error): fp32 1e-5; bf16 2e-2 for the output and 3e-2
for the gradients, which are rounded to bf16 (as in test_backward.py).
"""
from __future__ import annotations

import pytest
import torch

from ssmc import dsl as S
from ssmc.backends import get_backend
from ssmc.plan import Plan
from tests.backends.triton.test_scan import definition
from tests.helpers import check_against_reference

pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DECAYS = ("none", "time_invariant", "scalar", "diagonal", "full")
#: the decay's raw input per decay structure ("a" is a gate through sigmoid, "A" a negative
#: rate multiplied by softplus(dt))
DECAY_INPUTS = {"none": {}, "time_invariant": {"A": "h"}, "scalar": {"dt": "b t h", "A": "h"},
                "diagonal": {"a": "b t h n"}, "full": {"dt": "b t h p", "A": "h p n"}}
#: two batch entries and heads where the order axis k is in play (the kernels read a slice of
#: k through the other axes' strides); one of each elsewhere: the interpreter's time grows
#: with the programs launched
SIZES = dict(b=2, h=2, n=4, p=3)
SMALL = dict(b=1, h=1, n=4, p=3)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 3e-2)}


def _with_k(axes: str) -> str:
    """`axes` with the order axis k in front of t (or first when there is no t)."""
    letters = axes.split()
    at = letters.index("t") if "t" in letters else 0
    return " ".join(letters[:at] + ["k"] + letters[at:])


def cross2d(decay: str, per_order: bool):
    """y = cross2d recurrence + D * x, VMamba-style: x (b t h p) is shared by the orders; with
    `per_order`, the decay's inputs and B, C hold one slice per order."""
    axes = {"x": "b t h p", **DECAY_INPUTS[decay], "B": "b t n", "C": "b t n", "D": "h p"}
    if per_order:
        axes = {k: _with_k(v) if k not in ("x", "D") else v for k, v in axes.items()}

    def body(v):
        value, dec = v["x"], None
        if "dt" in v:
            dt = S.softplus(v["dt"])
            value, dec = v["x"] * dt, S.exp(dt * v["A"])
        elif "A" in v:
            dec = S.exp(v["A"])
        elif "a" in v:
            dec = S.sigmoid(v["a"] + 2)
        y = S.recurrence(decay=dec, key=v["B"], value=value, query=v["C"], direction="cross2d")
        return y + v["D"] * v["x"]
    return definition(f"cross2d_{decay}{'_k' if per_order else ''}", axes, body)


def inputs_for(defn, grid, sizes=SIZES, dtype=torch.float32, seed=0) -> dict:
    """Standard normal inputs; A (a rate) negative in (-2, -0.5), dt scaled by 0.5."""
    sizes = dict(sizes, t=grid[0] * grid[1], k=4)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for inp in defn.program.inputs:
        shape = tuple(sizes[a] for a in inp.axes)
        if inp.name == "A":
            x = -(0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64))
        else:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            x = 0.5 * x if inp.name == "dt" else x
        out[inp.name] = x.to(dtype)
    return out


def check(defn, inputs, grid, dtype=torch.float32):
    """On the GPU where there is one (the Triton backend runs CUDA tensors there), else on the
    CPU under the interpreter."""
    tol, grad_tol = TOL[dtype]
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    check_against_reference(defn, inputs, tol=tol, grad_tol=grad_tol, backend="triton",
                            lowering="scan", grid=grid)


# --------------------------------------------------------------------------- tests

def test_cross2d_scan_is_supported():
    """The scan registers grid orders, so auto plans of cross2d run it rather than the
    reference."""
    plan = Plan(program=cross2d("full", True).program, lowering="scan", dtype="float32")
    assert get_backend("triton").supports(plan) is None


@pytest.mark.parametrize("per_order", [False, True], ids=["shared", "per_order"])
@pytest.mark.parametrize("decay", DECAYS)
def test_cross2d_scan(decay, per_order):
    defn = cross2d(decay, per_order)
    sizes = SIZES if per_order else dict(SIZES, b=1)
    check(defn, inputs_for(defn, (3, 2), sizes), (3, 2))


@pytest.mark.parametrize("grid", [(1, 7), (6, 1), (2, 5)], ids=["1x7", "6x1", "2x5"])
@pytest.mark.parametrize("decay", ["scalar", "full"])
def test_cross2d_scan_grids(decay, grid):
    """A single row or column (the column orders equal the row orders) and H < W."""
    defn = cross2d(decay, True)
    check(defn, inputs_for(defn, grid, SMALL, seed=1), grid)


def test_cross2d_scan_channels_as_p():
    """VMamba's layout: one head, its d channels as p (p > BP's default block: two p-blocks)."""
    defn = cross2d("full", True)
    inputs = inputs_for(defn, (2, 3), dict(SMALL, p=40), seed=2)
    check(defn, inputs, (2, 3))


@pytest.mark.parametrize("p", [1, 40])
def test_cross2d_scan_one_state_per_channel(p):
    """VMamba's n = 1 (and n = 1 with p = 1): the scan's blocks are one wide in n (and p), not
    padded to two; several checkpoints and p-blocks (p = 40), both directions of both grid
    axes, every gradient."""
    defn = cross2d("full", True)
    check(defn, inputs_for(defn, (7, 5), dict(SMALL, n=1, p=p), seed=5), (7, 5))


def test_cross2d_scan_several_checkpoints():
    """t = 7 x 5 = 35: the backward recomputes three 16-step segments per order, the last one
    partial, the later ones starting mid-column for the column orders."""
    defn = cross2d("diagonal", True)
    check(defn, inputs_for(defn, (7, 5), SMALL, seed=3), (7, 5))


def test_cross2d_scan_bf16():
    defn = cross2d("full", True)
    inputs = inputs_for(defn, (2, 3), dict(SIZES, b=1), dtype=torch.bfloat16, seed=4)
    check(defn, inputs, (2, 3), torch.bfloat16)


def _raw_decay(name: str):
    """A decay input taken as is, per order and per (t, h, n): the language accepts any real."""
    axes = {"x": "b t h p", "a": "b k t h n", "B": "b k t n", "C": "b k t n", "D": "h p"}
    return definition(name, axes, lambda v: S.recurrence(
        decay=v["a"], key=v["B"], value=v["x"], query=v["C"], direction="cross2d")
        + v["D"] * v["x"])


def test_cross2d_scan_zero_decay():
    """Decays of exactly 0 (a reset) at a third of the steps, the rest in (0, 1)."""
    defn = _raw_decay("cross2d_resets")
    inputs = inputs_for(defn, (3, 5), dict(SIZES, b=1), seed=5)
    gen = torch.Generator().manual_seed(6)
    a = torch.rand(inputs["a"].shape, generator=gen, dtype=torch.float64)
    inputs["a"] = torch.where(torch.rand(a.shape, generator=gen) < 1 / 3, 0.0, a).float()
    assert (inputs["a"] == 0).any()
    check(defn, inputs, (3, 5))


def test_cross2d_scan_negative_decay():
    """Decays in (-1, 1), about half negative: the state flips sign from step to step."""
    defn = _raw_decay("cross2d_negative")
    inputs = inputs_for(defn, (5, 3), dict(SIZES, b=1), seed=7)
    gen = torch.Generator().manual_seed(8)
    inputs["a"] = (2 * torch.rand(inputs["a"].shape, generator=gen) - 1).float()
    assert (inputs["a"] < 0).any()
    check(defn, inputs, (5, 3))


def test_cross2d_scan_gradients_reach_the_chain_rule_unstacked(monkeypatch):
    """The scan's per-order d query, d key and decay terms (their partials summed once for all
    orders) are consecutive slices of one buffer each, which the chain rule takes without a
    stacking copy (VMamba's training step had one sum and one copy per order and operand)."""
    from ssmc.backends import chain_rule
    from ssmc.backends.triton import backward as triton_backward
    import ssmc
    copied = []
    real = triton_backward.stack_orders

    def recording(per_dir, skip=()):
        for key in per_dir[0][0]:
            if chain_rule._stacked([g[key] for g, _ in per_dir]) is None:
                copied.append(key)
        return real(per_dir, skip)

    monkeypatch.setattr(triton_backward, "stack_orders", recording)
    defn = cross2d("full", True)
    grid = (3, 2)
    sizes = dict(SIZES, p=17)    # more than one p-block
    inputs = {k: v.to(DEVICE).requires_grad_(True)
              for k, v in inputs_for(defn, grid, sizes).items()}
    op = ssmc.compile(defn, backend="triton", lowering="scan")
    op(**inputs, grid=grid).sum().backward()
    assert not copied


def test_cross2d_scan_sums_query_and_key_over_heads_in_one_pass(monkeypatch):
    """B and C are every head's (no head axis): the backward sums d query and d key over the
    p-blocks and a group's heads in one pass, not the p-blocks first into a (b, t, h, n) tensor
    that the chain rule sums again (VMamba's 56x56: 616 MB of partials, then 154 MB more)."""
    from ssmc.backends.triton.lowerings import scan_bwd_launch
    real, groups = scan_bwd_launch.summed_partials, []

    def spy(buf, g=None):
        groups.append(g)
        return real(buf, g)

    monkeypatch.setattr(scan_bwd_launch, "summed_partials", spy)
    defn = cross2d("full", True)
    check(defn, inputs_for(defn, (3, 2), dict(SIZES, p=12), seed=6), (3, 2))
    assert groups == [1, 1]
