"""A new lowering is one module plus its registrations: this file alone adds `toy` (the scan,
computed by a trivial Triton kernel on operands evaluated by torch) to the table of lowerings
and to the Triton backend, and `lowering="toy"` then runs forward and backward."""
import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.backends.triton.lowerings import LOWERINGS, TritonLowering
from ssmc.ir import DecayKind, Direction, Y
from ssmc.ir.evaluate import evaluate, to_canonical
from ssmc.lowerings import Lowering, register_lowering, unregister_lowering
from ssmc.passes.cost import scan_cost
from ssmc.plan import Plan
from ssmc.planner import choose
from tests.helpers import check_against_reference, random_inputs

pytest.importorskip("triton")

TOY_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def toy_scan(a, k, v, q, y, T, H, N, P, BN: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_n = tl.arange(0, BN)
    offs_p = tl.arange(0, BP)
    state = tl.zeros((BN, BP), dtype=tl.float32)
    for t in range(T):
        row = (b * T + t) * H + h
        decay = tl.load(a + row)
        kt = tl.load(k + row * N + offs_n, mask=offs_n < N, other=0.0)
        vt = tl.load(v + row * P + offs_p, mask=offs_p < P, other=0.0)
        qt = tl.load(q + row * N + offs_n, mask=offs_n < N, other=0.0)
        state = state * decay + kt[:, None] * vt[None, :]
        yt = tl.sum(state * qt[:, None], axis=0)
        tl.store(y + row * P + offs_p, yt, mask=offs_p < P)
'''


def toy_supports(plan):
    prog = plan.program
    if prog.recurrence.directions != (Direction.FORWARD,):
        return "forward recurrences only"
    if plan.has_initial_state or plan.return_final_state or plan.varlen:
        return "no states and no packed sequences"
    if prog.output.expr != Y:
        return "no epilogue"
    return None


def toy_render(plan):
    return TOY_SOURCE


def toy_launch(module, plan, tensors, sizes, initial_state, cu_seqlens):
    prog = plan.program
    B, T, H, N, P = (sizes[a] for a in "bthnp")
    env = {i.name: to_canonical(tensors[i.name].float(), i.axes, sizes) for i in prog.inputs}
    like = next(iter(env.values()))
    r = prog.recurrence

    def operand(node, shape):
        value = evaluate(node.expr, env, like) if node is not None else like.new_ones(())
        return value.expand(B, T, H, *shape).reshape(B, T, H, -1).contiguous()

    a = operand(r.decay, (1, 1))
    k, q = operand(r.key, (N, 1)), operand(r.query, (N, 1))
    v = operand(r.value, (1, P))
    y = torch.empty(B, T, H, P, dtype=torch.float32, device=like.device)
    if y.numel():
        module.toy_scan[(B * H,)](a, k, v, q, y, T, H, N, P,
                                  BN=max(16, 1 << (N - 1).bit_length()),
                                  BP=max(16, 1 << (P - 1).bit_length()))
    return y.to(getattr(torch, plan.dtype)), None


@pytest.fixture
def toy():
    register_lowering(Lowering("toy", frozenset({DecayKind.NONE, DecayKind.SCALAR}), scan_cost,
                               "the scan, one program per (b, h)"))
    LOWERINGS["toy"] = TritonLowering("toy", toy_render, toy_launch, toy_supports,
                                      backward="scan")
    yield
    del LOWERINGS["toy"]
    unregister_lowering("toy")


@ssmc.ssm
def gated_linear_attention(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                           a: S.In["b t h"]):
    return S.recurrence(decay=S.sigmoid(a), key=k, value=v, query=q)


def test_toy_lowering_runs_forward_and_backward(toy):
    op = ssmc.compile(gated_linear_attention, backend="triton", lowering="toy")
    inputs = random_inputs(gated_linear_attention, dict(b=2, t=9, h=3, n=5, p=6), seed=0)
    check_against_reference(op, inputs, tol=1e-5, grad=True)
    assert op.last_plan.lowering == "toy"


def test_toy_lowering_refuses_what_it_does_not_support(toy):
    op = ssmc.compile(gated_linear_attention, backend="triton", lowering="toy")
    inputs = random_inputs(gated_linear_attention, dict(b=1, t=4, h=1, n=2, p=2), seed=0)
    with pytest.raises(ssmc.UnsupportedError, match=r"no states and no packed sequences"):
        op(**inputs, return_final_state=True)


def test_toy_lowering_is_only_legal_for_its_decay_kinds(toy):
    @ssmc.ssm
    def per_key(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                a: S.In["b t h n"]):
        return S.recurrence(decay=S.sigmoid(a), key=k, value=v, query=q)

    with pytest.raises(ssmc.UnsupportedError, match=r"lowering='toy' is not legal for decay "
                       r"kind 'diagonal'"):
        ssmc.compile(per_key, backend="triton", lowering="toy")


def test_unregistered_lowering_is_a_config_error():
    with pytest.raises(ssmc.ConfigError, match=r"lowering='toy' is not valid; valid values: "
                       r"auto, scan, chunked, quadratic"):
        ssmc.compile(gated_linear_attention, lowering="toy")


def test_a_lowering_no_backend_implements_is_never_chosen():
    """In the table but in no backend: the planner (and so `ssmc explain`) lists it with the
    reason and picks among the others, however cheap its cost model says it is."""
    def free(program):
        cost = scan_cost(program)
        return type(cost)(cost.tensor_flops * 0, cost.vector_flops * 0, cost.bytes * 0, 0,
                          cost.serial_steps * 0)

    register_lowering(Lowering("free", frozenset(DecayKind), free))
    try:
        base = Plan(program=gated_linear_attention.program, lowering="scan", dtype="float32")
        choice, allowed = choose(gated_linear_attention.program, "triton", "cpu",
                                 dict(b=1, t=64, h=2, g=2, n=16, p=16), base)
        assert "free" not in allowed and choice.lowering != "free"
        free_estimate = next(e for e in choice.estimates if e.lowering == "free")
        assert free_estimate.reason == "no backend for the device implements it"
    finally:
        unregister_lowering("free")
