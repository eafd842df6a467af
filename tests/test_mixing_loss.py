"""ssmc/matrix.py `mixing_loss`: sum ||M - causal softmax(q k^T scale)||^2 per head, checked
(values and the gradients of every input, q and k) against the loss of the materialised
float64 matrices (`ssmc.reference.attention_matrix` and torch's softmax), differentiated by
torch. The CPU path here; the fused Triton kernels in tests/backends/triton/."""
import math

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc import reference
from ssmc.ir import DecayKind
from ssmc.reference.evaluate import canonical_inputs, prologue
from ssmc.reference.matrix import semiseparable
from ssmc.torch.matrix_ops import mixing_loss_op, route_for
from ssmc.validate import bind
from tests.helpers import compare, make_definition, random_inputs

SIZES = dict(b=2, t=9, h=4, g=2, n=3, p=2)
TOL = 1e-10


def close(name, actual, expected, tol):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


def leaves(x: dict, dtype=None) -> dict:
    return {k: v.detach().to(dtype or v.dtype).clone().requires_grad_(True) for k, v in x.items()}


def teacher(b, t, h, hk, d=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, h, d, generator=gen).to(dtype),
            torch.randn(b, t, hk, d, generator=gen).to(dtype))


def materialised_loss(defn, x: dict, q, k, scale):
    """(b, h) losses from the float64 matrices, and the float64 leaves (x, q, k)."""
    xs, (ql, kl) = leaves(x, torch.float64), leaves({"q": q, "k": k}, torch.float64).values()
    b = bind(defn.program, (), xs)
    T, H = q.shape[1], q.shape[2]
    if defn.program.decay_kind is DecayKind.FULL:    # per channel (forward): (b, h, p, t, t)
        ops = prologue(defn.program, canonical_inputs(defn.program, b.tensors, b.sizes))
        M = semiseparable(ops["decay"], ops["key"], ops["query"], T)
    else:
        M = reference.attention_matrix(defn.program, b.tensors, b.sizes).unsqueeze(2)
    kh = kl.repeat_interleave(H // k.shape[2], 2)
    s = torch.einsum("bthd,bshd->bhts", ql, kh) * scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    P = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
    return (M - P[:, :, None]).square().sum((2, 3, 4)), xs, ql, kl


def check(defn, x, q, k, tol, op=None, scale=None):
    d = q.shape[-1]
    scale_ = 1 / math.sqrt(d) if scale is None else scale
    xs, ql, kl = leaves(x), *leaves({"q": q, "k": k}).values()
    loss = ssmc.mixing_loss(op or defn, *xs.values(), q=ql, k=kl, scale=scale, reduction="none")
    ref, rs, rq, rk = materialised_loss(defn, x, q, k, scale_)
    close("loss", loss, ref, tol)
    w = torch.arange(1.0, 1 + ref.numel(), dtype=torch.float64).view(ref.shape)
    (loss * w.to(loss.dtype)).sum().backward()
    (ref * w).sum().backward()
    for name in x:
        expected = rs[name].grad
        close(f"d{name}", xs[name].grad,
              torch.zeros_like(rs[name]) if expected is None else expected, tol)
    close("dq", ql.grad, rq.grad, tol)
    close("dk", kl.grad, rk.grad, tol)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("decay", ["none", "time_invariant", "scalar", "diagonal"])
def test_mixing_loss_every_decay(decay, direction):
    f = make_definition(decay, direction, epilogue=decay == "scalar")
    q, k = teacher(2, 9, 4, 2, seed=1)
    check(f, random_inputs(f, SIZES, dtype=torch.float64, seed=1), q, k, TOL)


@ssmc.ssm
def signed(v: S.In["b t h p"], a: S.In["b t h"], k: S.In["b t g n"], q: S.In["b t g n"]):
    return S.recurrence(decay=a, key=k, value=v, query=q)


def test_mixing_loss_zero_and_negative_decays_and_full_gqa():
    """Signed decays with exact resets; a teacher whose k is one head for all (MQA)."""
    x = random_inputs(signed, SIZES, dtype=torch.float64, seed=2)
    x["a"].view(-1)[::4] = 0.0
    q, k = teacher(2, 9, 4, 1, seed=2)
    check(signed, x, q, k, TOL, scale=0.3)


def test_mixing_loss_per_channel_decay_adds_channels():
    f = make_definition("full", "forward")
    q, k = teacher(2, 6, 4, 4, seed=3)
    check(f, random_inputs(f, dict(SIZES, t=6), dtype=torch.float64, seed=3), q, k, TOL)


def test_mixing_loss_reductions_and_fp32():
    f = make_definition("scalar")
    x = random_inputs(f, SIZES, seed=4)
    q, k = teacher(2, 9, 4, 2, seed=4, dtype=torch.float32)
    per_head = ssmc.mixing_loss(f, *x.values(), q=q, k=k, reduction="none")
    assert per_head.shape == (2, 4) and per_head.dtype == torch.float32
    close("sum", ssmc.mixing_loss(f, *x.values(), q=q, k=k), per_head.sum(), 1e-6)
    close("mean", ssmc.mixing_loss(f, *x.values(), q=q, k=k, reduction="mean"),
          per_head.mean(), 1e-6)
    check(f, x, q, k, 2e-5)


def test_mixing_loss_opcheck_and_compile():
    """opcheck; torch.compile(fullgraph=True) with gradients, on strided (non-contiguous)
    inputs, as the projections of a layer give them."""
    f = make_definition("scalar")
    x = random_inputs(f, dict(SIZES, t=5), seed=5)
    q, k = teacher(2, 5, 4, 2, seed=5, dtype=torch.float32)
    inputs = [v.requires_grad_(True) for v in x.values()]
    torch.library.opcheck(mixing_loss_op, (inputs, q.requires_grad_(True),
                                           k.requires_grad_(True), 0.5,
                                           route_for(f.program, "auto")))

    def grads(fn):
        xs = [v.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
              if v.dim() > 1 else v.detach().clone().requires_grad_(True) for v in x.values()]
        ql = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
        kl = k.detach().clone().requires_grad_(True)
        loss = fn(*xs, q=ql, k=kl)
        loss.backward()
        return [loss] + [a.grad for a in xs] + [ql.grad, kl.grad]

    def loss(*a, q, k):
        return ssmc.mixing_loss(f, *a, q=q, k=k) + ssmc.attention_matrix(f, *a).sum()

    for i, (c, e) in enumerate(zip(grads(torch.compile(loss, fullgraph=True)), grads(loss))):
        close(f"compiled {i}", c, e, 1e-6)


def test_mixing_loss_rejects_bad_teacher_and_options():
    f = make_definition("scalar")
    x = random_inputs(f, SIZES, seed=6)
    q, k = teacher(2, 9, 4, 2, dtype=torch.float32)
    args = list(x.values())
    with pytest.raises(ssmc.ShapeError, match=r"'q' must be \(b, t, h, d\) = \(2, 9, 4, d\)"):
        ssmc.mixing_loss(f, *args, q=q[:, :, :3], k=k)
    with pytest.raises(ssmc.ShapeError, match=r"'k' must be \(b, t, heads dividing h=4, d\)"):
        ssmc.mixing_loss(f, *args, q=q, k=torch.zeros(2, 9, 3, 5))
    with pytest.raises(ssmc.DTypeError, match="'k' must be a floating-point tensor"):
        ssmc.mixing_loss(f, *args, q=q, k=k.long())
    with pytest.raises(ssmc.ArgumentError, match="norm='nuc' is not valid"):
        ssmc.mixing_loss(f, *args, q=q, k=k, norm="nuc")
    with pytest.raises(ssmc.ArgumentError, match="reduction='max' is not valid"):
        ssmc.mixing_loss(f, *args, q=q, k=k, reduction="max")
