"""The TVM chunked backward (ssmc/backends/tvm/lowerings/chunked_bwd.py) against the float64
reference: definitions with scalar decays (ssd with D, z, groups, whose epilogue needs y; a
sigmoid gate with an epilogue; linear attention without a decay) in every direction, with
initial states and grad_final or without, packed sequences with empty ones, float64 and bf16,
t = 0; decays from the edges of the domain (log-decays -1e4 and -inf, decays within 1e-7 of
1) through `check_against_reference`; and which plans it serves (the others keep the scan
backward).

Sizes are small and odd: t = 70 (two full chunks of 32 and a partial one), n = 5, p = 3.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import ssmc
from ssmc import dsl as S
from ssmc.backends import get_backend
from ssmc.backends.tvm import backward
from ssmc.backends.tvm.lowerings import chunked_bwd
from ssmc.plan import Plan
from tests.backends.tvm.test_tvm_backward import _plan, builtin, check_backward
from tests.backends.triton.test_scan import inputs_for, state_for
from tests.helpers import check_against_reference, make_definition

pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")

SIZES = dict(b=2, t=70, h=4, g=2, n=5, p=3)
#: packed lengths: empty sequences inside and at the end, one of several chunks
LENGTHS = (3, 0, 70, 1, 0)
_GATED: dict = {}


def definition(name: str, direction: str = "forward"):
    """A built-in (or its look-alike with a direction), or "gated": sigmoid(a + 2) decays
    over (b, t, h) with the epilogue (y + D v) * silu(z)."""
    if name != "gated":
        return builtin(name, direction)
    if direction not in _GATED:
        _GATED[direction] = make_definition("scalar", direction, epilogue=True)
    return _GATED[direction]


@pytest.fixture
def chunked_calls(monkeypatch):
    """Counts the calls that built or fetched the chunked backward's functions."""
    calls = []
    real = backward.chunked_functions

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backward, "chunked_functions", spy)
    return calls


@pytest.mark.parametrize("name,direction", [
    ("ssd", "forward"), ("ssd", "reverse"), ("ssd", "bidirectional"), ("gated", "reverse"),
    ("gated", "bidirectional"), ("linear_attention", "bidirectional")])
def test_chunked_bwd_definitions(name, direction, chunked_calls):
    check_backward(definition(name, direction), SIZES, lowering="chunked", seed=1)
    assert chunked_calls


@pytest.mark.parametrize("name,direction", [("ssd", "bidirectional"), ("gated", "reverse"),
                                            ("linear_attention", "forward")])
def test_chunked_bwd_varlen(name, direction, chunked_calls):
    sizes = dict(SIZES, b=1, t=sum(LENGTHS))
    check_backward(definition(name, direction), sizes, lowering="chunked", lengths=LENGTHS,
                   seed=2)
    assert chunked_calls


@pytest.mark.parametrize("lowering", ["scan", "quadratic"])
def test_chunked_bwd_serves_every_forward_lowering(lowering, chunked_calls):
    check_backward(builtin("ssd"), dict(SIZES, t=33), lowering=lowering, h0=False,
                   grad_final=False, seed=3)
    assert chunked_calls


def test_chunked_bwd_float64(chunked_calls):
    """n = 20: the dot products' 16-lane part and their remainder."""
    check_backward(builtin("ssd", "reverse"), dict(SIZES, n=20), lowering="chunked",
                   dtype=torch.float64, seed=4)
    assert chunked_calls


def test_chunked_bwd_bf16(chunked_calls):
    check_backward(builtin("ssd"), dict(SIZES, t=40), lowering="chunked",
                   dtype=torch.bfloat16, seed=5)
    assert chunked_calls


def test_chunked_bwd_initial_state_without_grad_final():
    check_backward(definition("gated", "bidirectional"), SIZES, lowering="chunked",
                   grad_final=False, seed=6)


def test_chunked_bwd_empty_input():
    """t = 0: no gradient flows into the inputs; the state's gradient is grad_final."""
    defn = builtin("ssd")
    sizes = dict(SIZES, t=0)
    kernel = get_backend("tvm").compile(_plan(defn, "chunked", torch.float32, True, True, False))
    inputs = inputs_for(defn, sizes)
    state = state_for(defn, sizes)
    gF = torch.randn_like(state)
    grads, g_h0 = kernel.backward(inputs, sizes, state, None, torch.zeros(2, 0, 4, 3), gF)
    assert all(g.shape == inputs[k].shape and not g.any() for k, g in grads.items())
    assert torch.equal(g_h0, gF)


# ------------------------------------------------------------- decays at the domain's edges

@ssmc.ssm
def exp_decay(x: S.In["b t h p"], u: S.In["b t h"], B: S.In["b t g n"], C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(u), key=B, value=x, query=C)


def _edge_inputs(u: torch.Tensor, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    b, t, h = u.shape
    return dict(x=torch.randn(b, t, h, 3, generator=gen), u=u,
                B=torch.randn(b, t, 1, 5, generator=gen),
                C=torch.randn(b, t, 1, 5, generator=gen))


def _edge_states(u: torch.Tensor) -> dict:
    h0 = torch.randn(u.shape[0], u.shape[2], 5, 3, generator=torch.Generator().manual_seed(9))
    return dict(initial_state=h0, return_final_state=True)


@pytest.mark.parametrize("lowering", ["scan", "chunked"])
def test_chunked_bwd_strong_and_infinite_log_decays(lowering, chunked_calls):
    """exp(u) with u = -1e4 on ~5% of the steps and one -inf: no NaN, the other steps'
    gradients keep their accuracy."""
    gen = torch.Generator().manual_seed(7)
    u = -0.05 * torch.rand(1, 70, 2, generator=gen)
    u[torch.rand(u.shape, generator=gen) < 0.05] = -1e4
    u.view(-1)[7] = float("-inf")
    check_against_reference(exp_decay, _edge_inputs(u, 8), tol=2e-5, backend="tvm",
                            lowering=lowering, **_edge_states(u))
    assert chunked_calls


def test_chunked_bwd_decays_near_one(chunked_calls):
    """Log-decays of -1e-8 .. -1e-7 (decays within 1e-7 of 1, which round to 1 in fp32): the
    state carries everything, and d log-decay sums over the whole sequence."""
    gen = torch.Generator().manual_seed(10)
    u = -1e-7 * torch.rand(1, 70, 2, generator=gen)
    check_against_reference(exp_decay, _edge_inputs(u, 11), tol=2e-5, backend="tvm",
                            lowering="chunked", **_edge_states(u))
    assert chunked_calls


# ------------------------------------------------------------------ which plans it serves

@ssmc.ssm
def signed(x: S.In["b t h p"], a: S.In["b t h"], w: S.In["h"], B: S.In["b t g n"],
           C: S.In["b t g n"]):
    return S.recurrence(decay=S.sigmoid(a) * w, key=B, value=x, query=C)


@pytest.mark.parametrize("defn,kind", [
    (builtin("ssd"), "chunked"), (definition("gated", "bidirectional"), "chunked"),
    (builtin("linear_attention"), "chunked"), (builtin("retention"), "scan"),
    (builtin("gla"), "scan"), (builtin("selective_scan"), "scan"), (signed, "scan")],
    ids=["ssd", "gated", "linear_attention", "retention", "gla", "selective_scan", "signed"])
def test_backward_kind(defn, kind):
    for lowering in ("scan", "chunked", "quadratic"):
        plan = Plan(program=defn.program, lowering=lowering, dtype="float32")
        assert backward.backward_kind(plan) == kind
    why = chunked_bwd.unsupported(Plan(program=defn.program, lowering="scan", dtype="float32"))
    assert (why is None) == (kind == "chunked")


def test_per_key_decay_keeps_the_scan_backward(chunked_calls):
    check_backward(builtin("gla", "reverse"), dict(SIZES, t=20), lowering="chunked", seed=12)
    assert not chunked_calls
