"""Decays from the whole domain the language accepts, on every lowering of every backend.

A decay is any real number: 0 is an exact reset, a negative one flips the state's sign, a
log-decay may be -1e4 or -inf, a gate may underflow (sigmoid(-200) is 0 in fp32) or sit within
1e-7 of 1. Each lowering either computes these (outputs and gradients against the float64
reference) or refuses the definition with `UnsupportedError` before launching, and `auto`
never picks a lowering that refuses.
"""
from __future__ import annotations

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc import reference
from ssmc.backends import get_backend
from ssmc.backends.triton.lowerings import chunked_keys, chunked_launch
from ssmc.plan import Plan
from ssmc.validate import bind
from tests.helpers import check_against_reference, compare

SIZES = dict(b=1, t=70, h=2, g=1, n=8, p=4)   # t: a full chunk of 64 and a partial one
TOL = 2e-5
CASES = [("triton", "scan"), ("triton", "chunked"), ("triton", "quadratic"),
         ("tvm", "scan"), ("tvm", "chunked"), ("tvm", "quadratic")]
IDS = [f"{b}-{lw}" for b, lw in CASES]


@ssmc.ssm
def gated(x: S.In["b t h p"], a: S.In["b t h"], w: S.In["h"], B: S.In["b t g n"],
          C: S.In["b t g n"]):
    return S.recurrence(decay=S.sigmoid(a) * w, key=B, value=x, query=C)


@ssmc.ssm
def gated_keys(x: S.In["b t h p"], a: S.In["b t h n"], w: S.In["h n"], B: S.In["b t g n"],
               C: S.In["b t g n"]):
    return S.recurrence(decay=S.sigmoid(a) * w, key=B, value=x, query=C)


@ssmc.ssm
def exp_decay(x: S.In["b t h p"], u: S.In["b t h"], B: S.In["b t g n"], C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(u), key=B, value=x, query=C)


@ssmc.ssm
def exp_decay_keys(x: S.In["b t h p"], u: S.In["b t h n"], B: S.In["b t g n"],
                   C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(u), key=B, value=x, query=C)


@ssmc.ssm
def sigmoid_gate(x: S.In["b t h p"], a: S.In["b t h"], B: S.In["b t g n"], C: S.In["b t g n"]):
    return S.recurrence(decay=S.sigmoid(a), key=B, value=x, query=C)


def _common(gen, s):
    b, t, h, g, n, p = (s[k] for k in "bthgnp")
    return dict(x=torch.randn(b, t, h, p, generator=gen), B=torch.randn(b, t, g, n, generator=gen),
                C=torch.randn(b, t, g, n, generator=gen))


def signed_inputs(per_key: bool, seed: int = 0) -> dict:
    """w holds an exact 0 (a reset at every step of that head/key) and negative values."""
    gen = torch.Generator().manual_seed(seed)
    s = SIZES
    lead = (s["b"], s["t"], s["h"]) + ((s["n"],) if per_key else ())
    w = torch.rand(lead[2:], generator=gen) * 1.8 - 0.9
    w.view(-1)[0] = 0.0
    w.view(-1)[-1] = -0.95
    return dict(_common(gen, s), a=torch.randn(lead, generator=gen), w=w)


def strong_inputs(per_key: bool, seed: int = 0) -> dict:
    """exp(u): u in [-0.05, 0) with -1e4 on about 5% of the steps and one -inf."""
    gen = torch.Generator().manual_seed(seed)
    s = SIZES
    lead = (s["b"], s["t"], s["h"]) + ((s["n"],) if per_key else ())
    u = -0.05 * torch.rand(lead, generator=gen)
    u[torch.rand(lead, generator=gen) < 0.05] = -1e4
    u.view(-1)[7] = float("-inf")
    return dict(_common(gen, s), u=u)


def run(defn, inputs, backend, lowering, states: bool):
    """Triton runs on the GPU where there is one (the interpreter otherwise), TVM on LLVM."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) for k, v in inputs.items()}
    kw = {}
    if states:
        s = SIZES
        kw = dict(initial_state=torch.randn(s["b"], s["h"], s["n"], s["p"],
                                            generator=torch.Generator().manual_seed(5)
                                            ).to(device),
                  return_final_state=True)
    check_against_reference(defn, inputs, tol=TOL, backend=backend, lowering=lowering, **kw)


def refuses(backend: str, lowering: str) -> bool:
    """The lowerings that sum log-decays without their sign (the decay may be 0 or < 0)."""
    return (backend, lowering) in (("triton", "quadratic"), ("tvm", "chunked"))


@pytest.mark.parametrize("states", [False, True], ids=["nostate", "states"])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("backend, lowering", CASES, ids=IDS)
def test_zero_and_negative_decays(backend, lowering, per_key, states):
    defn = gated_keys if per_key else gated
    inputs = signed_inputs(per_key)
    if refuses(backend, lowering):
        with pytest.raises(ssmc.UnsupportedError, match="may be zero or negative"):
            run(defn, inputs, backend, lowering, states)
        return
    run(defn, inputs, backend, lowering, states)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_auto_never_picks_a_refusing_lowering(backend, per_key):
    defn = gated_keys if per_key else gated
    run(defn, signed_inputs(per_key, seed=3), backend, "auto", states=True)


@pytest.mark.parametrize("states", [False, True], ids=["nostate", "states"])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("backend, lowering", CASES, ids=IDS)
def test_strong_and_infinite_log_decays(backend, lowering, per_key, states):
    """exp(u) is positive with an exact log, so every lowering takes it; -1e4 and -inf must
    neither give NaN nor round the other steps' log-decays away."""
    defn = exp_decay_keys if per_key else exp_decay
    run(defn, strong_inputs(per_key), backend, lowering, states)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
def test_attention_matrix_with_strong_and_infinite_log_decays(per_key):
    """The Triton attention-matrix kernel (the quadratic lowering's exponents) is 0 across a
    reset and keeps the other entries' accuracy."""
    defn = exp_decay_keys if per_key else exp_decay
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = {k: v.to(device) for k, v in strong_inputs(per_key, seed=4).items()}
    bound = bind(defn.program, (), x)
    plan = Plan(program=defn.program, lowering="quadratic", dtype="float32")
    M = get_backend("triton").attention_matrix(plan, bound.tensors, bound.sizes)
    ref = bind(defn.program, (), {k: v.double().cpu() for k, v in x.items()})
    r = compare("M", M, reference.attention_matrix(defn.program, ref.tensors, ref.sizes), TOL)
    assert r.ok, str(r)


@pytest.mark.parametrize("backend, lowering", CASES, ids=IDS)
def test_sigmoid_gate_underflow_and_near_one(backend, lowering):
    """sigmoid(-200) is 0 in fp32 and sigmoid(16) rounds to 1 - 6e-8; log sigmoid(a) =
    -softplus(-a) keeps both exact, so every lowering takes the gate."""
    gen = torch.Generator().manual_seed(2)
    s = SIZES
    a = torch.randn(s["b"], s["t"], s["h"], generator=gen)
    a[:, ::9] = -200.0
    a[:, :, 1] = 16.0
    run(sigmoid_gate, dict(_common(gen, s), a=a), backend, lowering, states=True)


def test_forced_refusal_names_the_reason():
    op = ssmc.compile(gated, backend="tvm", lowering="chunked")
    with pytest.raises(ssmc.UnsupportedError, match="chunked.*may be zero or negative"):
        op(**signed_inputs(False))


def growing_inputs(per_key: bool, seed: int = 0) -> dict:
    """exp(u) with u in [-0.3, 0.3]: decays larger than 1 on about half the steps."""
    gen = torch.Generator().manual_seed(seed)
    s = SIZES
    lead = (s["b"], s["t"], s["h"]) + ((s["n"],) if per_key else ())
    return dict(_common(gen, s), u=0.6 * torch.rand(lead, generator=gen) - 0.3)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("backend, lowering", CASES, ids=IDS)
def test_decays_larger_than_one(backend, lowering, per_key):
    """A decay above 1 grows the state: the per-key chunked forward factors a weight through a
    row block's start only where every log-decay is <= 0 (neither factor can overflow), and
    forms it whole elsewhere."""
    defn = exp_decay_keys if per_key else exp_decay
    run(defn, growing_inputs(per_key), backend, lowering, states=True)


@pytest.mark.parametrize("dtype, rate, scale, tol", [
    (torch.float32, 1.6, 1e-30, 1e-4),   # weights up to exp(75): factors far above 1
    (torch.float16, 0.25, 1e-3, 1e-2),   # a key factor of exp(12) is inf in fp16
], ids=["fp32", "fp16"])
def test_per_key_growth(dtype, rate, scale, tol):
    """A chunk that grows and shrinks back, on values small enough that every output is
    finite. In fp32 the factors through a row block's start stay in range wherever the
    weights do; fp16 operands would overflow (inf times an underflowed factor: NaN), so such
    chunks take the elementwise form there. (The interpreter keeps fp32 matmul operands: the
    fp16 case reaches that form on a GPU only.)"""
    inputs = growing_inputs(True, seed=1)
    inputs["u"][:, :40] += rate
    inputs["u"][:, 40:] -= rate
    inputs["x"] = inputs["x"] * scale
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    check_against_reference(exp_decay_keys, inputs, tol=tol, backend="triton",
                            lowering="chunked", grad=False)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("inputs", ["signed", "strong"])
def test_segmented_state_pass(inputs, per_key, monkeypatch):
    """The chunked state pass in segments of one 16-step chunk, joined by the products of
    their decays: a reset must zero what crosses it, a negative decay flip it."""
    real = chunked_launch.tiles
    monkeypatch.setattr(chunked_launch, "tiles", lambda *a: dict(
        real(*a), CS=16, BT=16, SEG_state=1))
    if inputs == "signed":
        defn, values = (gated_keys if per_key else gated), signed_inputs(per_key, seed=9)
    else:
        defn, values = (exp_decay_keys if per_key else exp_decay), strong_inputs(per_key, seed=9)
    run(defn, values, "triton", "chunked", states=True)


@pytest.mark.parametrize("inputs", ["growing", "signed"])
def test_per_key_factored_products_in_fp32_for_narrow_operands(inputs, tmp_path, monkeypatch):
    """fp16 operands (65504) take the factored products between row blocks in fp32, whose
    range holds every factor a needed weight does. Run here with that form forced on, on
    decays that grow and on every sign. A fresh cache directory: the plan's kernels are
    rendered again."""
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(chunked_keys, "narrow_operands", lambda dt: True)
    if inputs == "growing":
        run(exp_decay_keys, growing_inputs(True, seed=2), "triton", "chunked", states=True)
    else:   # |w| up to 1.6: some decays above 1 in size
        signed = signed_inputs(True, seed=2)
        run(gated_keys, dict(signed, w=signed["w"] * 1.6), "triton", "chunked", states=True)
    monkeypatch.undo()
    plan = Plan(program=exp_decay_keys.program, lowering="chunked", dtype="float16")
    lines = get_backend("triton").source(plan).splitlines()
    factored = [ln.strip() for ln in lines if ln.strip().startswith(("q_op =", "kT_op ="))]
    assert factored and all(ln.endswith(".to(tl.float32)") for ln in factored), factored


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
def test_signed_decays_with_several_row_blocks_per_chunk(per_key, monkeypatch):
    """Chunks of 64 steps in row blocks of 16: a row's sign adds the negative count of the
    chunk's earlier blocks and of the blocks between it and a key block, so an odd count
    there must flip it (a precedence slip once took only the last term's parity)."""
    real = chunked_launch.tiles
    used = []

    def tiles(*a):
        used.append(dict(real(*a), CS=64, BT=16))
        return used[-1]

    monkeypatch.setattr(chunked_launch, "tiles", tiles)
    inputs = signed_inputs(per_key, seed=7)
    inputs["w"] = -inputs["w"].abs() - 0.05     # every decay negative: every parity matters
    run(gated_keys if per_key else gated, inputs, "triton", "chunked", states=True)
    assert used and all(m["CS"] == 64 and m["BT"] == 16 for m in used)


@pytest.mark.parametrize("programs", [1, 1024], ids=["head-blocks", "one-head"])
def test_backward_variants_share_chunks_and_head_blocks(monkeypatch, programs):
    """The per-chunk backward kernels of scalar decays come in two variants, one for the chunks
    the forward recompute flags as holding a reset and one for the rest
    (`chunked_bwd.chunk_variants`). Resets in some heads of some chunks only, so that a block of
    heads (dq, dk summed over a group's heads: PROGRAMS lowered to force it) has heads of both
    kinds and the counting variant adds onto the other's sums; two directions, states."""
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    monkeypatch.setattr(chunked_bwd_launch, "PROGRAMS", programs)
    gen = torch.Generator().manual_seed(11)
    s = dict(b=1, t=150, h=4, g=1, n=8, p=4)      # chunks of 64: two full, one partial
    u = -0.05 * torch.rand(s["b"], s["t"], s["h"], generator=gen)
    u[0, 10, 1] = -1e4       # chunk 0: heads 1 and 3 reset, 0 and 2 do not
    u[0, 40, 3] = float("-inf")
    u[0, 140, 0] = -1e4      # chunk 2: head 0
    inputs = dict(_common(gen, s), u=u)
    defn = bidirectional_exp_decay
    kw = dict(initial_state=torch.randn(2, s["b"], s["h"], s["n"], s["p"], generator=gen),
              return_final_state=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) for k, v in inputs.items()}
    kw["initial_state"] = kw["initial_state"].to(device)
    check_against_reference(defn, inputs, tol=TOL, backend="triton", lowering="chunked", **kw)


@ssmc.ssm
def bidirectional_exp_decay(x: S.In["b t h p"], u: S.In["b t h"], B: S.In["b t g n"],
                            C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(u), key=B, value=x, query=C, direction="bidirectional")
