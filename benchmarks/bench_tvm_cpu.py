"""CPU benchmark of the TVM backend (LLVM target): Mamba-2 SSD forward, fp32.

    pytest benchmarks/bench_tvm_cpu.py --benchmark-only

Compares, at b=1 t=2048 h=8 p=64 n=64 (g=1):
  * ssmc + TVM, chunked lowering (chunk 64) and scan lowering,
  * a plain PyTorch eager chunked SSD written below (chunk 64; einsums, one short loop over
    chunks for the state passing),
  * the float64 sequential reference `ssmc.reference.scan` (a Python loop over t).
All run on the same random inputs; the fast ones are checked against each other first.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")
pytest.importorskip("pytest_benchmark")

import ssmc  # noqa: E402
import ssmc.ops  # noqa: E402
from ssmc import reference  # noqa: E402
from ssmc.ops.ssd import build  # noqa: E402
from ssmc.validate import bind  # noqa: E402

SHAPE = dict(b=1, t=2048, h=8, p=64, n=64)
REF_T = 2048  # the reference runs at full length; a few seconds per call on 2 cores
CHUNK = 64


def make_inputs(b, t, h, p, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, t, h, generator=g) - 1.0)
    A = -torch.rand(h, generator=g) * 2 - 0.5
    B = torch.randn(b, t, 1, n, generator=g)
    C = torch.randn(b, t, 1, n, generator=g)
    return tuple(v.to(dtype) for v in (x, dt, A, B, C))


def torch_chunked_ssd(x, dt, A, B, C, chunk=CHUNK):
    """SSD in eager PyTorch: y_t = C_t . state_t,
    state_t = exp(dt_t A) state_{t-1} + B_t (x) dt_t x_t.

    Within a chunk the (query . key) scores are masked and scaled by exp(cumsum differences);
    chunk-end states are passed on sequentially (t / chunk steps). B and C have one group.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    nc = t // chunk
    assert nc * chunk == t, "length must be a multiple of the chunk"
    la = (dt * A).view(b, nc, chunk, h)                     # log decay
    xv = (x * dt[..., None]).view(b, nc, chunk, h, p)       # value
    Bc = B.view(b, nc, chunk, n)                            # key (one group)
    Cc = C.view(b, nc, chunk, n)                            # query
    cs = la.cumsum(2)                                       # (b, nc, Q, h)
    diff = cs[:, :, :, None, :] - cs[:, :, None, :, :]      # (b, nc, Qi, Qj, h)
    mask = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    decay = torch.exp(diff.masked_fill(~mask[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bcin,bcjn->bcij", Cc, Bc)
    y = torch.einsum("bcij,bcijh,bcjhp->bcihp", scores, decay, xv)
    to_end = torch.exp(cs[:, :, -1:, :] - cs)               # decay from step j to chunk end
    chunk_states = torch.einsum("bcjn,bcjh,bcjhp->bchnp", Bc, to_end, xv)
    chunk_decay = torch.exp(cs[:, :, -1, :])                # (b, nc, h)
    carry = x.new_zeros(b, h, n, p)
    starts = []
    for c in range(nc):
        starts.append(carry)
        carry = chunk_decay[:, c, :, None, None] * carry + chunk_states[:, c]
    starts = torch.stack(starts, 1)                         # state entering each chunk
    y = y + torch.einsum("bcin,bchnp,bcih->bcihp", Cc, starts, torch.exp(cs))
    return y.reshape(b, t, h, p)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(**SHAPE)


@pytest.fixture(scope="module")
def ssd_def():
    return build()


def _tvm_op(defn, lowering, inputs):
    op = ssmc.compile(defn, backend="tvm", lowering=lowering)
    op(*inputs)  # build (or load from the disk cache) outside the timed region
    return op


def _flops_note(benchmark, lowering):
    b, t, h, p, n = (SHAPE[k] for k in "bthpn")
    benchmark.extra_info["shape"] = f"b={b} t={t} h={h} p={p} n={n}"
    benchmark.extra_info["lowering"] = lowering


# The PyTorch and reference benchmarks run first: once TVM's thread pool has started, its
# workers spin-wait between calls and, on a 2-core machine, slow torch's own threads down
# several-fold (measured: eager chunked SSD 10-40 ms before, 170-350 ms after).
def test_torch_eager_chunked(benchmark, inputs):
    _flops_note(benchmark, "torch eager chunked")
    with torch.inference_mode():
        benchmark(torch_chunked_ssd, *inputs)


def test_reference_float64(benchmark, ssd_def):
    shape = dict(SHAPE, t=REF_T)
    args = make_inputs(**shape)
    bound = bind(ssd_def.program, args, {})
    _flops_note(benchmark, f"reference scan float64 (t={REF_T})")
    with torch.inference_mode():
        benchmark.pedantic(reference.scan, args=(ssd_def.program, bound.tensors, bound.sizes),
                           rounds=3, iterations=1)


def test_agree(inputs, ssd_def):
    y_tvm = _tvm_op(ssd_def, "chunked", inputs)(*inputs)
    y_torch = torch_chunked_ssd(*inputs)
    scale = y_torch.abs().max()
    assert (y_tvm - y_torch).abs().max() / scale < 1e-4
    y_scan = _tvm_op(ssd_def, "scan", inputs)(*inputs)
    assert (y_scan - y_torch).abs().max() / scale < 1e-4


@pytest.mark.parametrize("lowering", ["chunked", "scan"])
def test_ssmc_tvm(benchmark, inputs, ssd_def, lowering):
    op = _tvm_op(ssd_def, lowering, inputs)
    _flops_note(benchmark, lowering)
    benchmark(op, *inputs)
