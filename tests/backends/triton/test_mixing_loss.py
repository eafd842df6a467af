"""ssmc/backends/triton/mixing_loss.py: the fused matrix-matching loss kernels (interpreted on
the CPU) against the loss of the materialised float64 matrices, values and the gradients of
every input, q and k: scalar, per-key, time-invariant and no decay, strong and infinite
log-decays, GQA, several row blocks with a partial last one, bf16 inputs."""
import importlib
import math

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.plan import Plan
from tests.test_mixing_loss import check, teacher

TOL32 = 5e-5


def fused_reason(defn, dtype="float32"):
    module = importlib.import_module("ssmc.backends.triton.mixing_loss")
    return module.fused(Plan(program=defn.program, lowering="quadratic", dtype=dtype))


@ssmc.ssm
def mamba2_like(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"], B: S.In["b t g n"],
                C: S.In["b t g n"]):
    dt = S.softplus(dt)
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C)


@ssmc.ssm
def retention(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], g: S.In["h"]):
    return S.recurrence(decay=S.sigmoid(g), key=k, value=v, query=q)


@ssmc.ssm
def linear(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
    return S.recurrence(key=k, value=v, query=q)


@ssmc.ssm
def exp_decay(x: S.In["b t h p"], u: S.In["b t h"], B: S.In["b t g n"], C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(u), key=B, value=x, query=C)


@ssmc.ssm
def exp_decay_keys(x: S.In["b t h p"], u: S.In["b t h n"], B: S.In["b t g n"],
                   C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(u), key=B, value=x, query=C)


def inputs(defn, b, t, h, g, n, p, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    sizes = dict(b=b, t=t, h=h, g=g, n=n, p=p)
    x = {i.name: 0.5 * torch.randn(*(sizes[a] for a in i.axes), generator=gen)
         for i in defn.program.inputs}
    if "A" in x:
        x["A"] = -torch.rand(h, generator=gen) - 0.5
    return {k: v.to(dtype) for k, v in x.items()}


def test_fused_loss_scalar_decay_gqa_several_blocks():
    """t = 37: three row blocks of 16 and a partial one; k shared by pairs of heads."""
    assert fused_reason(mamba2_like) is None
    x = inputs(mamba2_like, 2, 37, 4, 2, 5, 3, seed=1)
    q, k = teacher(2, 37, 4, 2, d=6, seed=1, dtype=torch.float32)
    check(mamba2_like, x, q, k, TOL32, op=ssmc.compile(mamba2_like, backend="triton"))


@pytest.mark.parametrize("defn", [retention, linear], ids=["time_invariant", "none"])
def test_fused_loss_time_invariant_and_no_decay(defn):
    assert fused_reason(defn) is None
    x = inputs(defn, 1, 20, 2, 2, 4, 3, seed=2)
    q, k = teacher(1, 20, 2, 1, d=4, seed=2, dtype=torch.float32)
    check(defn, x, q, k, TOL32, op=ssmc.compile(defn, backend="triton"), scale=0.7)


@pytest.mark.parametrize("defn", [exp_decay, exp_decay_keys], ids=["scalar", "per_key"])
def test_fused_loss_strong_and_infinite_log_decays(defn):
    """-1e4 and -inf log-decays are resets: exact zeros across them, no NaN, full accuracy
    elsewhere; d log-decay is exactly 0 at a reset. Per key: n = 20 is two chunks of n."""
    x = inputs(defn, 1, 24, 2, 1, 20, 2, seed=3)
    gen = torch.Generator().manual_seed(3)
    u = -0.05 * torch.rand(x["u"].shape, generator=gen)
    u[:, 5, 0] = -1e4
    u[:, 17, 1] = -float("inf")
    u[torch.rand(u.shape, generator=gen) < 0.05] = -1e4
    assert fused_reason(defn) is None
    q, k = teacher(1, 24, 2, 2, d=4, seed=3, dtype=torch.float32)
    check(defn, dict(x, u=u), q, k, TOL32, op=ssmc.compile(defn, backend="triton"))


@ssmc.ssm
def gla_like(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], a: S.In["b t h n"]):
    return S.recurrence(decay=S.sigmoid(a + 3), key=k, value=v, query=q)


def test_fused_loss_per_key_decay_gqa():
    """A decay over n (GLA, Mamba-1's per-channel heads): the exact broadcast, several row
    blocks, k shared by pairs of heads."""
    x = inputs(gla_like, 2, 37, 4, 4, 6, 2, seed=6)
    q, k = teacher(2, 37, 4, 2, d=5, seed=6, dtype=torch.float32)
    check(gla_like, x, q, k, TOL32, op=ssmc.compile(gla_like, backend="triton"))


def test_fused_loss_bf16():
    """bf16 inputs and teacher: the reference sees the same rounded values, the kernels
    compute in fp32 (the interpreter keeps fp32 matmul operands)."""
    x = inputs(mamba2_like, 1, 20, 2, 1, 4, 2, seed=4, dtype=torch.bfloat16)
    q, k = teacher(1, 20, 2, 2, d=4, seed=4, dtype=torch.bfloat16)
    op = ssmc.compile(mamba2_like, backend="triton")
    loss = ssmc.mixing_loss(op, *x.values(), q=q, k=k, reduction="none")
    ref = ssmc.mixing_loss(mamba2_like, *(v.double() for v in x.values()), q=q.double(),
                           k=k.double(), reduction="none")
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.double(), ref, rtol=1e-4)


def test_unfused_plans_take_the_row_block_path():
    """Per-channel, signed and bidirectional decays, float64: refused by the fused kernels
    with a reason, computed by the backend's row-block path instead."""
    helpers = importlib.import_module("tests.helpers")
    full = helpers.make_definition("full", "forward")
    assert "varies over p" in fused_reason(full)
    assert "one forward direction" in fused_reason(helpers.make_definition("scalar",
                                                                           "bidirectional"))
    assert "float32" in fused_reason(mamba2_like, "float64")
    x = inputs(full, 1, 6, 2, 1, 3, 2, seed=5)
    q, k = teacher(1, 6, 2, 2, d=4, seed=5, dtype=torch.float32)
    check(full, x, q, k, TOL32, op=ssmc.compile(full, backend="triton"), scale=1 / math.sqrt(4))
