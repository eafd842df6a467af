"""`ssmc.attention_matrix`: the hidden attention matrix M (b, h, t, t) with y = M value."""
import pytest
import torch
import torch.nn.functional as TF

import ssmc
from ssmc import dsl as S
from tests.helpers import (DECAY_AXES, compare, cu_seqlens, make_definition, random_inputs,
                           random_state)

TOL = 1e-12  # float64 against float64


def close(name, actual, expected, tol=TOL):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


def mamba2_like(direction):
    """A Mamba-2-style definition whose epilogue is y itself; its value is x * softplus(dt)."""
    @ssmc.ssm(name=f"mamba2_like_{direction}")
    def f(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"], B: S.In["b t g n"],
          C: S.In["b t g n"]):
        dt = S.softplus(dt)
        return S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C,
                            direction=direction)
    return f


def mamba2_inputs(b=2, t=9, h=4, g=2, n=5, p=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(x=r(b, t, h, p), dt=r(b, t, h) * 0.5, A=-torch.rand(h, generator=gen,
                dtype=torch.float64) - 0.5, B=r(b, t, g, n), C=r(b, t, g, n))


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("t", [1, 9])
def test_attention_matrix_times_value_is_y(direction, t):
    torch.manual_seed(0)
    f = mamba2_like(direction)
    x = mamba2_inputs(t=t)
    M = ssmc.attention_matrix(f, *x.values())
    assert M.shape == (2, 4, t, t) and M.dtype == torch.float64
    value = x["x"] * TF.softplus(x["dt"])[..., None]
    y = ssmc.compile(f, backend="reference")(**x)
    close("y", torch.einsum("bhts,bshp->bthp", M, value), y)


def test_attention_matrix_is_the_ssd_matrix():
    """Forward, scalar decay: M[t, s] = (C_t . B_s) exp(sum_{r=s+1..t} dt_r A) for s <= t."""
    torch.manual_seed(0)
    x = mamba2_inputs(b=1, t=8, h=4, g=2)
    M = ssmc.attention_matrix(mamba2_like("forward"), **x)
    dtA = TF.softplus(x["dt"]) * x["A"]                    # (b, t, h)
    cs = dtA.cumsum(1).permute(0, 2, 1)                     # (b, h, t)
    seg = cs[..., :, None] - cs[..., None, :]               # sum_{r=s+1..t}
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    decay = torch.where(causal, seg, -torch.inf).exp()
    heads = torch.arange(4) // 2
    CB = torch.einsum("btgn,bsgn->bgts", x["C"], x["B"])[:, heads]
    close("M", M, CB * decay)


def test_attention_matrix_triangles():
    torch.manual_seed(0)
    x = mamba2_inputs(b=1, t=7)
    fwd = ssmc.attention_matrix(mamba2_like("forward"), **x)
    rev = ssmc.attention_matrix(mamba2_like("reverse"), **x)
    both = ssmc.attention_matrix(mamba2_like("bidirectional"), **x)
    upper = torch.ones(7, 7, dtype=torch.bool).triu(1)
    assert fwd[..., upper].abs().max() == 0  # forward: lower-triangular
    assert rev[..., upper.T].abs().max() == 0  # reverse: upper-triangular
    assert rev[..., upper].abs().min() > 0 and fwd[..., upper.T].abs().min() > 0
    close("bidirectional", both, fwd + rev)
    # the diagonal is C_t . B_t in both directions (no decay applied)
    close("diagonal", torch.diagonal(rev, dim1=-2, dim2=-1), torch.diagonal(fwd, dim1=-2,
                                                                           dim2=-1))


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("decay", ["none", "time_invariant", "scalar", "diagonal"])
def test_attention_matrix_every_decay_kind(decay, direction):
    torch.manual_seed(0)
    f = make_definition(decay, direction)
    x = random_inputs(f, dict(b=2, t=6, h=4, g=2, n=3, p=5), dtype=torch.float64, seed=1)
    op = ssmc.compile(f, backend="reference")
    M = ssmc.attention_matrix(op, **x)  # a compiled op works as well as a definition
    close("y", torch.einsum("bhts,bshp->bthp", M, x["v"]), op(**x))


def test_attention_matrix_p_dependent_decay_is_per_channel():
    f = make_definition("full")
    assert "p" in DECAY_AXES["full"].split()
    x = random_inputs(f, dict(b=1, t=4, h=2, g=1, n=3, p=2), dtype=torch.float64, seed=2)
    M = ssmc.attention_matrix(f, **x)
    assert M.shape == (1, 2, 2, 4, 4)   # (b, h, p, t, t): one matrix per value channel
    close("y", torch.einsum("bhpts,bshp->bthp", M, x["v"]),
          ssmc.compile(f, backend="reference")(**x))


def test_attention_matrix_p_axis_of_size_one_is_fine():
    """Mamba-1 (S6) has a (d, n) decay with p = 1 per channel: one matrix per channel."""
    torch.manual_seed(0)
    f = make_definition("full")
    x = random_inputs(f, dict(b=1, t=5, h=2, g=1, n=3, p=1), dtype=torch.float64, seed=3)
    M = ssmc.attention_matrix(f, **x)
    close("y", torch.einsum("bhts,bshp->bthp", M, x["v"]),
          ssmc.compile(f, backend="reference")(**x))


def test_attention_matrix_rejects_packed_and_state_and_non_ops():
    f = make_definition("scalar")
    x = random_inputs(f, dict(b=1, t=4, h=2, g=1, n=3, p=2), dtype=torch.float64, seed=4)
    with pytest.raises(ssmc.UnsupportedError, match="cu_seqlens"):
        ssmc.attention_matrix(f, **x, cu_seqlens=cu_seqlens([1, 3]))
    with pytest.raises(ssmc.UnsupportedError, match="initial_state"):
        ssmc.attention_matrix(f, **x, initial_state=random_state(1, 2, 3, 2))
    with pytest.raises(TypeError, match="expects an ssmc definition"):
        ssmc.attention_matrix(lambda *a: a, **x)
    with pytest.raises(ssmc.ShapeError, match="'k' has n=2 but 'q' has n=3"):
        ssmc.attention_matrix(f, **{**x, "k": x["k"][..., :2]})
