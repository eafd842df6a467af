"""A compiled op's repeated calls redo none of the work that depends only on the definition,
the plan and the call's shapes (at small shapes the host's work is the step's time): the
generated kernel sources are read once per process and cache directory, sympy's cse and the
structural key are not recomputed, and a mixing loss's backward reuses the host-side operands
of its own forward. Results are the bits of a call that redoes everything, and a bad input
after cached calls is still reported before anything runs."""
import contextlib
import importlib
import os
import sys

import pytest
import sympy
import torch

import ssmc
from ssmc import dsl as S
from ssmc.backends import cache
from ssmc.errors import ShapeError
from ssmc.torch import matrix_ops
from ssmc.torch import ops as torch_ops
from tests.backends.triton.test_mixing_loss import inputs, mamba2_like
from tests.helpers import HOST_VALUE
from tests.test_mixing_loss import teacher

ML = importlib.import_module("ssmc.backends.triton.mixing_loss")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(t=9, seed=0):
    x = inputs(mamba2_like, 2, t, 4, 2, 4, 3, seed=seed)
    return [v.to(DEVICE).requires_grad_(True) for v in x.values()]


def _step(op, leaves):
    """Forward and backward; (output, gradients)."""
    for x in leaves:
        x.grad = None
    y = op(*leaves)
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    return y.detach(), [x.grad for x in leaves]


@pytest.fixture
def counting(monkeypatch):
    """start() -> {name: calls}: the cache's file reads, sympy.cse and sympy.srepr (the
    structural key's printer), counted from then on."""
    def start():
        counts = {"read_checked": 0, "cse": 0, "srepr": 0}
        for owner, name in ((cache, "read_checked"), (sympy, "cse"), (sympy, "srepr")):
            real = getattr(owner, name)

            def wrapped(*args, _real=real, _name=name, **kwargs):
                counts[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(owner, name, wrapped)
        return counts
    return start


@pytest.mark.parametrize("lowering", ["scan", "chunked"])
def test_repeated_calls_read_no_source_and_derive_nothing(lowering, monkeypatch, tmp_path,
                                                         counting):
    """The first call in a fresh cache directory writes the generated sources there; later
    forward and backward calls read none of them and run no cse and no srepr again."""
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    op = ssmc.compile(mamba2_like, backend="triton", lowering=lowering)
    leaves = _leaves()
    first = _step(op, leaves)
    assert sorted(p.name for p in (tmp_path / "triton").glob("*.py"))
    counts = counting()
    again = [_step(op, leaves) for _ in range(2)]
    assert counts == {"read_checked": 0, "cse": 0, "srepr": 0}
    for y, grads in again:
        assert torch.equal(y, first[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, first[1]))


@ssmc.ssm
def mamba2_a_log(x: S.In["b t h p"], dt: S.In["b t h"], A_log: S.In["h"], B: S.In["b t g n"],
                 C: S.In["b t g n"], D: S.In["h"], z: S.In["b t h p"], dt_bias: S.In["h"]):
    """Mamba-2 as model code writes it: constants (-1, the gate's) in the chain rule."""
    delta = S.softplus(dt + dt_bias)
    h = S.recurrence(decay=S.exp(-S.exp(A_log) * delta), key=B, value=x * delta, query=C)
    return (h + D * x) * (z * S.sigmoid(z))


@pytest.mark.gpu
@pytest.mark.parametrize("lowering", ["scan", "chunked"])
def test_training_step_never_waits_for_the_device(lowering):
    """After the first call, forward and backward queue work and return without waiting for
    the stream: a constant of the chain rule built on the host and copied over made the
    backward wait four times (the GPU idle ~2 ms of a 9 ms step)."""
    op = ssmc.compile(mamba2_a_log, backend="triton", lowering=lowering)
    shapes = dict(x=(2, 70, 4, 8), dt=(2, 70, 4), A_log=(4,), B=(2, 70, 1, 16),
                  C=(2, 70, 1, 16), D=(4,), z=(2, 70, 4, 8), dt_bias=(4,))
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s, generator=gen).to("cuda", torch.bfloat16 if len(s) > 1
                                                else torch.float32).requires_grad_(True)
              for s in shapes.values()]
    first = _step(op, leaves)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = _step(op, leaves)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again[0], first[0])


PACKAGE = os.path.dirname(os.path.abspath(ssmc.__file__)) + os.sep


@contextlib.contextmanager
def host_reads():
    """Yields a list of the calls made from ssmc's own code that read a tensor's value on the
    host or build a tensor from host data: on a GPU each waits for the stream (the CPU stand-in
    for torch.cuda's sync debug mode)."""
    hits = []
    names = {torch.Tensor: HOST_VALUE, torch: ("tensor", "as_tensor")}
    saved = []
    for owner, attrs in names.items():
        for attr in attrs:
            real = getattr(owner, attr)

            def wrapped(*args, _real=real, _attr=attr, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if os.path.abspath(caller).startswith(PACKAGE):
                    hits.append(f"{_attr} from {caller}:{sys._getframe(1).f_lineno}")
                return _real(*args, **kwargs)
            saved.append((owner, attr, real))
            setattr(owner, attr, wrapped)
    try:
        yield hits
    finally:
        for owner, attr, real in saved:
            setattr(owner, attr, real)


def _host_calls():
    """(name, call) of every path a training or serving loop runs repeatedly."""
    leaves = [torch.randn(s, generator=torch.Generator().manual_seed(i)).requires_grad_(True)
              for i, s in enumerate(((2, 20, 4, 8), (2, 20, 4), (4,), (2, 20, 1, 16),
                                     (2, 20, 1, 16), (4,), (2, 20, 4, 8), (4,)))]
    x, dt, A_log, B, C, D, z, db = (v.detach() for v in leaves)
    state = torch.zeros(2, 4, 16, 8)

    def train(op):
        y = op(*leaves)
        return torch.autograd.grad(y, leaves, torch.ones_like(y))

    def builtin(*a):
        return ssmc.ops.ssd(*a[:2], -a[2].exp(), *a[3:5], D=a[5], z=a[6], dt_bias=a[7],
                            dt_softplus=True, lowering="chunked", backend="triton")

    op = {low: ssmc.compile(mamba2_a_log, backend="triton", lowering=low)
          for low in ("scan", "chunked")}
    return {
        "scan fwd+bwd": lambda: train(op["scan"]),
        "chunked fwd+bwd": lambda: train(op["chunked"]),
        "built-in chunked fwd+bwd": lambda: train(builtin),
        "step": lambda: op["chunked"].step(state, x[:, 0], dt[:, 0], A_log, B[:, 0], C[:, 0],
                                           D, z[:, 0], db),
        "decode": lambda: op["chunked"].decode(state, x[:, :3], dt[:, :3], A_log, B[:, :3],
                                               C[:, :3], D, z[:, :3], db),
        "final_state": lambda: op["chunked"].final_state(*leaves),
    }


def test_repeated_calls_never_read_the_device_from_the_host():
    """After the first call (which may compile and load), no path of a step reads a tensor on
    the host or builds one from host data. A chain-rule constant built with torch.tensor made
    a user's Mamba-2 training step wait for the GPU four times (0.72-0.85x of the built-in's
    speed with the same kernels); this catches that class on the CPU."""
    for name, call in _host_calls().items():
        call()
        with host_reads() as hits:
            call()
        assert hits == [], name


def test_bad_input_after_cached_calls_is_reported_before_the_op(monkeypatch):
    op = ssmc.compile(mamba2_like, backend="triton", lowering="chunked")
    leaves = _leaves()
    _step(op, leaves)

    def no_call(*args, **kwargs):
        raise AssertionError("the op ran on a bad input")

    monkeypatch.setattr(torch_ops, "call", no_call)
    bad = list(leaves)
    bad[4] = leaves[4][..., :3]          # C with n = 3, B with n = 4
    with pytest.raises(ShapeError, match="'C'"):
        op(*bad)


def _loss_step(op, leaves, q, k):
    for x in (*leaves, q, k):
        x.grad = None
    loss = ssmc.mixing_loss(op, *leaves, q=q, k=k)
    loss.backward()
    return loss.detach(), [x.grad for x in (*leaves, q, k)]


def _teacher(t=9, seed=0):
    return [v.to(DEVICE).requires_grad_(True)
            for v in teacher(2, t, 4, 2, 5, seed=seed, dtype=torch.float32)]


def test_mixing_loss_backward_reuses_its_forwards_operands(monkeypatch):
    """One `_launch` (the prologue's operands, the decay's sums) per forward and backward, and
    the bits of a backward that builds them again (KEEP_BYTES below their size)."""
    built = []
    real = ML._launch
    monkeypatch.setattr(ML, "_launch", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    op = ssmc.compile(mamba2_like, backend="triton")
    leaves, (q, k) = _leaves(t=21), _teacher(t=21)
    kept = _loss_step(op, leaves, q, k)
    assert len(built) == 1
    monkeypatch.setattr(ML, "KEEP_BYTES", 0)
    rebuilt = _loss_step(op, leaves, q, k)
    assert len(built) == 3
    assert torch.equal(kept[0], rebuilt[0])
    assert all(torch.equal(a, b) for a, b in zip(kept[1], rebuilt[1]))
    assert matrix_ops._KEPT.forward is None and matrix_ops._KEPT.backward is None


def test_mixing_loss_keeps_nothing_without_a_graph():
    op = ssmc.compile(mamba2_like, backend="triton")
    leaves, (q, k) = _leaves(), _teacher()
    with torch.no_grad():
        ssmc.mixing_loss(op, *leaves, q=q, k=k)
    assert matrix_ops._KEPT.forward is None and not matrix_ops._KEPT.want
    loss = ssmc.mixing_loss(op, *(x.detach() for x in leaves), q=q.detach(), k=k.detach())
    assert not loss.requires_grad and matrix_ops._KEPT.forward is None


def test_prepared_operands_match_only_their_tensors():
    """A changed tensor (in place: a new version), another tensor or another scale is not the
    call the operands were made for."""
    op = ssmc.compile(mamba2_like, backend="triton")
    x = {n: v.to(DEVICE) for n, v in inputs(mamba2_like, 1, 9, 2, 1, 4, 3, seed=3).items()}
    q, k = (v.to(DEVICE) for v in teacher(1, 9, 2, 1, 5, seed=3, dtype=torch.float32))
    bound = ssmc.validate.bind(op.program, tuple(x.values()), {})
    plan = matrix_ops._plan(op.program, list(x.values()))
    kept = []
    ML.loss(plan, bound.tensors, bound.sizes, q, k, 0.5, keep=kept)
    (prepared,) = kept
    assert prepared.matches(plan, bound.tensors, q, k, 0.5)
    assert not prepared.matches(plan, bound.tensors, q, k, 0.25)
    assert not prepared.matches(plan, dict(bound.tensors, x=x["x"].clone()), q, k, 0.5)
    x["dt"].add_(0.0)
    assert not prepared.matches(plan, bound.tensors, q, k, 0.5)
