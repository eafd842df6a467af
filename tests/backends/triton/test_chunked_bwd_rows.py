"""The chain rule's row terms in the chunked dv kernel (lowerings/chunked_bwd_rows.py): which
plans take them there, and gradients equal to the reference's with the row kernel
(chain_rows.row_parts) out of the way, for every layout of their partial sums (an input with
t and p, t only, p only, neither), several p-blocks, packed sequences, reverse, bf16, and the
cases where dv or y must still be stored."""
from __future__ import annotations

import pytest
import torch

import ssmc.ops
from ssmc import dsl as S
from ssmc.backends.triton import chain_rows
from ssmc.backends.triton.lowerings.chunked_bwd_rows import fused_rows
from ssmc.ops.gla import build as build_gla
from ssmc.plan import Plan
from tests.backends.triton.test_backward import LENGTHS, check_backward
from tests.backends.triton.test_scan import builtin, custom, definition

pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")


def _plan(defn, lowering="chunked"):
    return Plan(program=defn.program, lowering=lowering, dtype="float32",
                has_initial_state=True, return_final_state=True, varlen=False)


@pytest.fixture
def no_row_kernel(monkeypatch):
    """The separate row kernel must not run: the dv kernel evaluated the terms."""
    def refuse(*args, **kwargs):
        raise AssertionError("chain_rows.row_parts ran for a plan whose dv kernel has the rows")
    monkeypatch.setattr(chain_rows, "row_parts", refuse)


def _scaled(direction="forward"):
    """A per-batch scale `s` ("b h": no t, no p) in the epilogue; per-group ones, `w` in the
    value and `u` in the epilogue, are off the (b, t, h, p) rows, and so are the terms that read
    them (x's and dt's): dv and y must still be stored for the rest of the chain rule."""
    def body(v):
        dt = S.softplus(v["dt"])
        y = S.recurrence(decay=S.exp(dt * v["A"]), key=v["B"], value=v["x"] * dt * v["w"],
                         query=v["C"], direction=direction)
        return y * v["s"] + y * v["u"] + v["x"] * S.sigmoid(v["z"])
    return definition(f"scaled_{direction}", dict(
        x="b t h p", dt="b t h", A="h", B="b t g n", C="b t g n", s="b h", w="g", u="g",
        z="b t h p"), body)


def test_mamba2_rows_leave_nothing_to_store():
    rows = fused_rows(_plan(ssmc.ops.mamba2))
    assert set(rows.terms) == {"x", "dt", "z", "D"}
    assert not rows.store_dv and not rows.store_y and rows.uses_y


def test_rows_outside_the_row_inputs_keep_dv_and_y():
    rows = fused_rows(_plan(_scaled()))
    assert set(rows.terms) == {"s", "z"}
    assert rows.store_dv and rows.store_y


@pytest.mark.parametrize("defn", [builtin("ssd", "bidirectional"), build_gla(0.5),
                                  custom("gated", "forward")],
                         ids=["bidirectional", "per-key", "dy-reads-y"])
def test_rows_stay_with_the_row_kernel(defn):
    """Several directions sum dv and y first; per-key decays have no dv kernel of whole rows;
    a tanh epilogue's dy needs y before the dv kernel runs."""
    assert fused_rows(_plan(defn)) is None


@pytest.mark.parametrize("lowering", ["chunked", "quadratic"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_backward_with_rows_in_the_dv_kernel(no_row_kernel, lowering, direction):
    """ssd: x and z (t and p), dt (t), D (neither), over two p-blocks and several chunks."""
    check_backward(builtin("ssd", direction), lowering, dict(b=2, t=70, h=2, g=1, n=4, p=80),
                   seed=31)


def _weighted(direction):
    """Per-channel output weights `w` ("h p": p, not t); `a` in the value and the decay."""
    def body(v):
        gate = S.sigmoid(v["a"] + 1.0)
        y = S.recurrence(decay=gate, key=v["k"], value=v["x"] * (1 - gate), query=v["q"],
                         direction=direction)
        return y * v["w"] + v["x"] * S.sigmoid(v["z"])
    return definition(f"weighted_{direction}", dict(
        x="b t h p", a="b t h", k="b t g n", q="b t g n", w="h p", z="b t h p"), body)


def test_backward_rows_with_per_channel_weights(no_row_kernel):
    assert set(fused_rows(_plan(_weighted("reverse"))).terms) == {"x", "a", "w", "z"}
    check_backward(_weighted("reverse"), "chunked", dict(b=2, t=40, h=2, g=1, n=3, p=5),
                   seed=32)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_backward_rows_keep_dv_and_y_where_read(no_row_kernel, direction):
    check_backward(_scaled(direction), "chunked", dict(b=3, t=50, h=4, g=2, n=3, p=6), seed=33)


def test_backward_rows_packed_sequences(no_row_kernel):
    """Chunks of packed sequences (empty ones inside and at the end) are the t-blocks of b=1."""
    check_backward(_scaled(), "chunked", dict(b=1, t=sum(LENGTHS), h=2, g=1, n=3, p=4),
                   lengths=LENGTHS, seed=34)
    check_backward(builtin("ssd"), "chunked", dict(b=1, t=sum(LENGTHS), h=2, g=1, n=3, p=4),
                   lengths=LENGTHS, seed=35)


def test_backward_rows_bf16(no_row_kernel):
    """dx and dz stored straight in the inputs' bf16."""
    check_backward(builtin("ssd"), "chunked", dict(b=1, t=40, h=2, g=1, n=16, p=16),
                   dtype=torch.bfloat16, seed=36)


def test_backward_rows_empty_sequence(no_row_kernel):
    check_backward(builtin("ssd"), "chunked", dict(b=2, t=0, h=2, g=1, n=3, p=4), seed=37)
