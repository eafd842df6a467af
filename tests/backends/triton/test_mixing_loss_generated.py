"""ssmc/backends/triton/mixing_loss.py, the kernels generated per definition (the prologue and
the chain rule, interpreted on the CPU) against the loss of the materialised float64 matrices:
inputs of every axis shape the loss reaches (in any axis order, without b or t, on groups,
strided), an input read by several operands, and a backward run twice on the operands its
forward kept."""
import importlib

import pytest
import torch

import ssmc
from ssmc import dsl as S
from tests.backends.triton.test_mixing_loss import TOL32, gla_like, inputs
from tests.test_mixing_loss import check, teacher

ML = importlib.import_module("ssmc.backends.triton.mixing_loss")


@ssmc.ssm
def odd_axes(q: S.In["b h t n"], k: S.In["g t n"], v: S.In["b t h p"], a: S.In["h n"],
             c: S.In["b h"]):
    """q and k in non-canonical orders, k without b on groups; a time-invariant decay over n
    (a lacks b and t); c read by the key and the decay."""
    return S.recurrence(decay=S.sigmoid(a + c + 2), key=k * c, value=v, query=q)


@ssmc.ssm
def shared_scalar(x: S.In["b t h p"], dt: S.In["b t h"], B: S.In["b t g n"],
                  C: S.In["b t g n"], D: S.In["n"]):
    """dt in the query and the decay (its terms add in the kernel); D (n) lacks b, t and h."""
    return S.recurrence(decay=S.exp(-S.softplus(dt)), key=B * D, value=x, query=C * dt)


def _inputs(defn, b, t, h, g, n, p, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = dict(b=b, t=t, h=h, g=g, n=n, p=p)
    return {i.name: 0.5 * torch.randn(*(sizes[a] for a in i.axes), generator=gen)
            for i in defn.program.inputs}


@pytest.mark.parametrize("defn", [odd_axes, shared_scalar], ids=["odd_axes", "shared_scalar"])
@pytest.mark.parametrize("b", [1, 2])
def test_generated_chain_rule_every_axis_shape(defn, b):
    """Gradients stored straight into an input's gradient (b = 1 for inputs without b) and
    through per-(b, h) partials summed on the host (b = 2; groups of heads)."""
    assert ML.fused(ML.Plan(program=defn.program, lowering="quadratic",
                            dtype="float32")) is None
    x = _inputs(defn, b, 21, 4, 2, 5, 3, seed=b)
    q, k = teacher(b, 21, 4, 2, d=4, seed=b, dtype=torch.float32)
    check(defn, x, q, k, TOL32, op=ssmc.compile(defn, backend="triton"))


def test_generated_kernels_read_strided_inputs():
    """Inputs that are views with any strides (the kernels read them in place) give the
    gradients of contiguous ones, contiguous."""
    x = _inputs(shared_scalar, 2, 19, 4, 2, 5, 3, seed=3)
    q, k = teacher(2, 19, 4, 2, d=4, seed=3, dtype=torch.float32)
    op = ssmc.compile(shared_scalar, backend="triton")

    def grads(tensors):
        leaves = {n: v.detach().requires_grad_(True) for n, v in tensors.items()}
        views = {n: (v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() > 1 else v)
                 for n, v in leaves.items()}
        ssmc.mixing_loss(op, *views.values(), q=q, k=k).backward()
        return [leaves[n].grad for n in tensors]

    strided = grads(x)
    plain = grads({n: v.contiguous() for n, v in x.items()})
    for a, b in zip(strided, plain):
        assert a.is_contiguous() and torch.equal(a, b)


def test_backward_twice_on_kept_operands():
    """retain_graph: a second backward on the workspace its forward kept (a decay over n,
    whose gradient kernels accumulate tile by tile in the workspace) gives the same
    gradients again."""
    x = inputs(gla_like, 1, 37, 2, 2, 6, 2, seed=8)
    q, k = (v.requires_grad_(True) for v in teacher(1, 37, 2, 1, d=4, seed=8,
                                                    dtype=torch.float32))
    leaves = [v.requires_grad_(True) for v in x.values()]
    loss = ssmc.mixing_loss(ssmc.compile(gla_like, backend="triton"), *leaves, q=q, k=k)
    loss.backward(retain_graph=True)
    first = [v.grad.clone() for v in (*leaves, q, k)]
    loss.backward()
    for g, v in zip(first, (*leaves, q, k)):
        assert torch.equal(v.grad, 2 * g)
