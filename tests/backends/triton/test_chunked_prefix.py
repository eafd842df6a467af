"""The per-key running sums that `ssmc_chunked_prefix` stores (chunked_prefix.py), against the
same sums taken in float64 by torch: decays of every sign, zero and underflowing ones
(resets), a chunk cut short by the sequence's end, both directions."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.backends.base import RESET_BELOW
from ssmc.backends.triton.common import input_args
from ssmc.backends.triton.lowerings import chunked
from ssmc.backends.triton.lowerings.chunked_prefix import PrefixSums
from ssmc.plan import Plan

B, T, H, N, P = 2, 45, 2, 5, 3
CS, RB = 32, 8


@ssmc.ssm
def signed_per_key(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                   a: S.In["b t h n"]):
    return S.recurrence(decay=a, key=k, value=v, query=q)


def _module(plan: Plan, tmp_path):
    path = tmp_path / "prefix_module.py"
    path.write_text(chunked.render(plan))
    spec = importlib.util.spec_from_file_location("prefix_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _decays() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(B, T, H, N, generator=gen, dtype=torch.float64) * 2 - 1   # every sign
    a[:, ::7, :, 0] = 0.0            # resets
    a[:, 3::11, :, 1] = 1e-40        # underflows fp32's normal range: resets too
    a[:, 5::9, :, 2] = -1.0
    return a.float()


def _expected(a: torch.Tensor, reverse: bool) -> dict[str, torch.Tensor]:
    """Each chunk's sums in the direction's order, (chunks, H, CS, N), float64."""
    x = a.double().flip(1) if reverse else a.double()
    chunks = -(-T // CS)
    pad = torch.zeros(B, chunks * CS, H, N, dtype=torch.float64)
    pad[:, :T] = x
    ld = pad.abs().log()
    rz = (ld < RESET_BELOW).double()
    ld = torch.where(rz > 0, 0.0, ld)
    ld[:, T:] = 0.0
    rz[:, T:] = 0.0
    neg = (pad < 0).double()
    # (B, chunks, CS, H, N) -> (B * chunks, H, CS, N)
    def chunked_view(v):
        return v.reshape(B, chunks, CS, H, N).permute(0, 1, 3, 2, 4).reshape(-1, H, CS, N)
    ld, rz, neg = chunked_view(ld), chunked_view(rz), chunked_view(neg)
    blocks = ld.reshape(-1, H, CS // RB, RB, N)
    inclusive = blocks.cumsum(3)
    block_later = blocks.sum(3, keepdim=True) - inclusive
    return dict(L=inclusive.reshape(-1, H, CS, N),
                lsuf=block_later.reshape(-1, H, CS, N),
                lend=ld.sum(2, keepdim=True) - ld.cumsum(2),
                Z=rz.cumsum(2), NG=neg.cumsum(2) % 2)


@pytest.mark.parametrize("reverse", [False, True])
def test_prefix_sums_match_float64_sums(reverse, tmp_path):
    plan = Plan(program=signed_per_key.program, lowering="chunked", dtype="float32")
    module = _module(plan, tmp_path)
    gen = torch.Generator().manual_seed(1)
    tensors = dict(q=torch.randn(B, T, H, N, generator=gen),
                   k=torch.randn(B, T, H, N, generator=gen),
                   v=torch.randn(B, T, H, P, generator=gen), a=_decays())
    n_chunks = B * (-(-T // CS))
    sums = PrefixSums(plan, True, n_chunks, H, CS, RB, N, torch.device("cpu"),
                      block_suffix=True)
    dummy = torch.zeros(1)
    sums.fill(module, input_args(plan.program, tensors), n_chunks, H, (dummy, dummy, dummy),
              (T, 1, N, P, 1), N, dict(REVERSE=reverse, COLUMN=False), False)
    lcum, lend, lsuf, zcum, ngp, rb = sums.args
    assert rb == RB and zcum.dtype == torch.int8 and ngp.dtype == torch.int8
    want = _expected(tensors["a"], reverse)
    for name, got in (("L", lcum), ("lend", lend), ("lsuf", lsuf)):
        torch.testing.assert_close(got.double(), want[name], rtol=1e-5, atol=1e-4, msg=name)
    assert torch.equal(zcum.double(), want["Z"])
    assert torch.equal(ngp.double(), want["NG"])
