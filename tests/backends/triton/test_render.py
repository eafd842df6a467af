"""Generated Triton source: names taken from a user's definition never meet a kernel's own."""
from __future__ import annotations

import pytest
import torch

import ssmc
from ssmc import dsl as S
from tests.helpers import check_against_reference


@ssmc.ssm
def named_like_internals(states: S.In["b t h p"], out: S.In["b t h"], state_in: S.In["b t g n"],
                         query: S.In["b t g n"], mid: S.In["h"]):
    """Inputs named as the kernels' own pointers (`states_ptr`, `out_ptr`) and locals
    (`state_in`, `query`, `mid`): once a duplicate parameter (SyntaxError while rendering)."""
    return S.recurrence(decay=S.exp(-S.softplus(out)), key=state_in, value=states * mid,
                        query=query)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(t: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = dict(states=torch.randn(1, t, 2, 4, generator=gen),
             out=torch.randn(1, t, 2, generator=gen),
             state_in=torch.randn(1, t, 1, 8, generator=gen),
             query=torch.randn(1, t, 1, 8, generator=gen), mid=torch.rand(2, generator=gen))
    return {k: v.to(DEVICE) for k, v in x.items()}


@pytest.mark.parametrize("lowering", ["scan", "chunked", "quadratic"])
def test_inputs_named_like_kernel_internals(lowering):
    check_against_reference(named_like_internals, _inputs(40, 0), tol=2e-5, backend="triton",
                            lowering=lowering)


def test_decode_step_with_inputs_named_like_kernel_internals():
    op = ssmc.compile(named_like_internals, backend="triton", lowering="scan")
    x = _inputs(1, 1)
    device = DEVICE
    state = torch.zeros(1, 2, 8, 4, device=device)
    y = op.step(state, **{k: v[:, 0] if v.dim() > 1 else v for k, v in x.items()})
    assert torch.allclose(y, op(**x)[:, 0], atol=1e-5)


def _function(source: str, name: str) -> str:
    start = source.index(f"def {name}(")
    end = source.find("@triton.jit", start)
    return source[start:end if end > 0 else len(source)]


def test_walks_load_their_step_rows_a_chunk_ahead():
    """The sequential walks (forward state pass, backward reverse pass) read Mamba-2's dt,
    a (t,) row Triton cannot pipeline (2-byte elements a head apart), from a load issued one
    chunk before; none of their chunk steps loads it where it is used."""
    from ssmc.backends.triton.lowerings import chunked, chunked_bwd_launch
    from ssmc.ops import ssd
    from ssmc.plan import Plan
    plan = Plan(program=ssd.definition.program, lowering="chunked", dtype="bfloat16")
    walks = [_function(chunked.render(plan), "ssmc_chunked_state_fwd"),
             _function(chunked_bwd_launch.render(plan), "ssmc_chunked_bwd_dstates")]
    for walk in walks:
        loop = walk[walk.index("    for c"):]
        assert "pf_u_dt = tl.load(" in loop and "u_dt_row = pf_u_dt" in loop
        assert "t_row * u_dt_s_t" not in walk
