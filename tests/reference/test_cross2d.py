"""The float64 reference of cross2d against four 1-D reference calls on permuted copies: the
composition VMamba-style code runs, written with transposes and flips of the image."""
import pytest
import torch

import ssmc
from ssmc import dsl as S

REF = dict(backend="reference")


def _defs(direction):
    @ssmc.ssm(name="grid_scan")
    def grid_scan(x: S.In["b t h p"], dt: S.In["b k t h p"], A: S.In["k h p n"],
                  B: S.In["b k t n"], C: S.In["b k t n"], D: S.In["h p"]):
        d = S.softplus(dt)
        y = S.recurrence(decay=S.exp(d * A), key=B, value=x * d, query=C, direction=direction)
        return y + D * x
    return grid_scan


CROSS = _defs("cross2d")


@ssmc.ssm
def line_scan(x: S.In["b t h p"], dt: S.In["b t h p"], A: S.In["h p n"], B: S.In["b t n"],
              C: S.In["b t n"]):
    d = S.softplus(dt)
    return S.recurrence(decay=S.exp(d * A), key=B, value=x * d, query=C)


def _to_order(z, order, H, W):
    """(b, t, ...) -> the sequence of order `order` (0 rows, 1 columns, 2/3 reversed)."""
    b, rest = z.shape[0], z.shape[2:]
    g = z.reshape(b, H, W, *rest)
    if order in (1, 3):
        g = g.transpose(1, 2)
    s = g.reshape(b, H * W, *rest)
    return s.flip(1) if order >= 2 else s


def _from_order(s, order, H, W):
    b, rest = s.shape[0], s.shape[2:]
    if order >= 2:
        s = s.flip(1)
    if order in (1, 3):
        return s.reshape(b, W, H, *rest).transpose(1, 2).reshape(b, H * W, *rest)
    return s


def _inputs(b, H, W, h, p, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = H * W

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)
    return dict(x=r(b, t, h, p), dt=r(b, 4, t, h, p), A=-torch.rand(4, h, p, n, generator=g,
                dtype=torch.float64), B=r(b, 4, t, n), C=r(b, 4, t, n), D=r(h, p))


@pytest.mark.parametrize("H, W", [(3, 5), (1, 7), (6, 1), (1, 1)])
def test_cross2d_is_four_line_scans_over_permuted_copies(H, W):
    xs = {k: v.requires_grad_(True) for k, v in _inputs(2, H, W, 2, 3, 4).items()}
    y = ssmc.compile(CROSS, **REF)(**xs, grid=(H, W))
    line = ssmc.compile(line_scan, **REF)
    want = xs["D"] * xs["x"]
    for k in range(4):
        seq = line(_to_order(xs["x"], k, H, W), _to_order(xs["dt"][:, k], k, H, W), xs["A"][k],
                   _to_order(xs["B"][:, k], k, H, W), _to_order(xs["C"][:, k], k, H, W))
        want = want + _from_order(seq, k, H, W)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, list(xs.values()), g)
    exp = torch.autograd.grad(want, list(xs.values()), g)
    for name, a, e in zip(xs, got, exp):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@ssmc.ssm
def signed_cross(x: S.In["b t h p"], a: S.In["b k t h"], B: S.In["b t n"], C: S.In["b t n"]):
    return S.recurrence(decay=a, key=B, value=x, query=C, direction="cross2d")


@ssmc.ssm
def signed_line(x: S.In["b t h p"], a: S.In["b t h"], B: S.In["b t n"], C: S.In["b t n"]):
    return S.recurrence(decay=a, key=B, value=x, query=C)


def test_zero_and_negative_decays_on_a_grid():
    """A decay of exactly 0 resets the state; a negative one flips it; no NaN."""
    H, W = 2, 3
    g = torch.Generator().manual_seed(1)
    a = torch.tensor([0.0, -0.5, 1.0, -1.0, 0.0, 0.25], dtype=torch.float64)
    a = torch.stack([a.roll(k) for k in range(4)]).view(1, 4, 6, 1)
    x, B, C = (torch.randn(*s, generator=g, dtype=torch.float64)
               for s in ((1, 6, 1, 2), (1, 6, 2), (1, 6, 2)))
    y = ssmc.compile(signed_cross, **REF)(x, a, B, C, grid=(H, W))
    line = ssmc.compile(signed_line, **REF)
    want = sum(_from_order(line(_to_order(x, k, H, W), _to_order(a[:, k], k, H, W),
                                _to_order(B, k, H, W), _to_order(C, k, H, W)), k, H, W)
               for k in range(4))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
