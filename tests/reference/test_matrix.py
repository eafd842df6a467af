"""The two float64 references agree: the sequential scan and the materialised matrix.

They share operand evaluation (prologue/epilogue) but apply the recurrence independently
(running state vs pairwise decay products), so agreement to 1e-10 checks both cores, every
direction, initial and final states and packed sequences.
"""
import importlib

import pytest
import torch

from ssmc import reference
from ssmc.validate import bind
from tests.helpers import (DECAY_AXES, DIRECTIONS, SHAPES, compare, cu_seqlens, gla_inputs,
                           linear_attention_inputs, make_definition, random_inputs,
                           random_state, retention_inputs, selective_scan_inputs, ssd_inputs)

# the modules (ssmc.ops re-exports functions of the same names)
ssd, selective_scan, retention, gla, linear_attention = (
    importlib.import_module(f"ssmc.ops.{m}")
    for m in ("ssd", "selective_scan", "retention", "gla", "linear_attention"))

TOL = 1e-10  # relative RMS and relative max error, float64 against float64


def builtin(name, b, t, h, g, n, p, seed=0):
    """A built-in's definition (options all on) and float64 tensors for its inputs."""
    f64 = dict(dtype=torch.float64, seed=seed)
    if name == "ssd":
        d = ssd.build(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True)
        return d, ssd_inputs(b, t, h, g, n, p, **f64)
    if name == "ssd_d_per_channel_dt_limit":
        d = ssd.build(has_D=True, D_per_channel=True, dt_softplus=True, dt_min=0.05, dt_max=0.8)
        return d, ssd_inputs(b, t, h, g, n, p, D_per_channel=True, z=False, dt_bias=False, **f64)
    if name == "selective_scan":
        d = selective_scan.build(has_D=True, has_z=True, has_delta_bias=True, delta_softplus=True)
        x = selective_scan_inputs(b, t, h, n, g, **f64)
        x["u"], x["z"] = x["u"].unsqueeze(-1), x["z"].unsqueeze(-1)  # p = 1
        return d, x
    if name == "retention":
        return retention.build(scale=n ** -0.5), retention_inputs(b, t, h, n, p, **f64)
    if name == "gla":
        return gla.build(scale=n ** -0.5), gla_inputs(b, t, h, n, p, **f64)
    if name == "linear_attention":
        return (linear_attention.build(scale=n ** -0.5),
                linear_attention_inputs(b, t, h, n, p, **f64))
    raise KeyError(name)


BUILTINS = ("ssd", "ssd_d_per_channel_dt_limit", "selective_scan", "retention", "gla",
            "linear_attention")


def both(definition, tensors, **extra):
    """Run both references on the same bound call; returns (scan result, matrix result)."""
    bound = bind(definition.program, (), {**tensors, **extra})
    args = (definition.program, bound.tensors, bound.sizes, bound.initial_state,
            bound.cu_seqlens, bound.return_final_state)
    return reference.scan(*args), reference.matrix(*args)


def assert_agree(s, m):
    (ys, hs), (ym, hm) = s, m
    for name, a, e in (("y", ym, ys), ("final_state", hm, hs)):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype == torch.float64
        r = compare(name, a, e, TOL)
        assert r.ok, str(r)


def state_dims(definition, tensors):
    s = bind(definition.program, (), tensors).sizes
    return s["h"], s["n"], s["p"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("name", BUILTINS)
def test_matrix_matches_scan_builtin(name, shape):
    torch.manual_seed(0)
    d, x = builtin(name, **shape)
    h, n, p = state_dims(d, x)
    h0 = random_state(shape["b"], h, n, p, dtype=torch.float64, seed=1)
    assert_agree(*both(d, x))
    assert_agree(*both(d, x, initial_state=h0, return_final_state=True))


@pytest.mark.parametrize("name", BUILTINS)
def test_matrix_matches_scan_builtin_varlen(name):
    """Packed sequences (b == 1) including a zero-length one, with states in and out."""
    torch.manual_seed(0)
    d, x = builtin(name, b=1, t=23, h=4, g=2, n=5, p=3)
    h, n, p = state_dims(d, x)
    cu = cu_seqlens([7, 0, 1, 15])
    h0 = random_state(4, h, n, p, dtype=torch.float64, seed=1)
    assert_agree(*both(d, x, cu_seqlens=cu))
    assert_agree(*both(d, x, cu_seqlens=cu, initial_state=h0, return_final_state=True))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("decay", list(DECAY_AXES))
@pytest.mark.parametrize("shape", [dict(b=2, t=1, h=4, g=2, n=3, p=2),
                                   dict(b=2, t=19, h=6, g=3, n=4, p=3)],
                         ids=["t1", "t19"])
def test_matrix_matches_scan_directions(decay, direction, shape):
    torch.manual_seed(0)
    d = make_definition(decay, direction, epilogue=True)
    x = random_inputs(d, shape, dtype=torch.float64, seed=2)
    dirs = 2 if direction == "bidirectional" else 1
    h0 = random_state(shape["b"], shape["h"], shape["n"], shape["p"], directions=dirs,
                      dtype=torch.float64, seed=3)
    assert_agree(*both(d, x))
    s, m = both(d, x, initial_state=h0, return_final_state=True)
    want = (shape["b"], shape["h"], shape["n"], shape["p"])
    assert s[1].shape == m[1].shape == ((2,) + want if dirs == 2 else want)
    assert_agree(s, m)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("decay", list(DECAY_AXES))
def test_matrix_matches_scan_directions_varlen(decay, direction):
    torch.manual_seed(0)
    shape = dict(b=1, t=17, h=4, g=2, n=3, p=2)
    d = make_definition(decay, direction, epilogue=True)
    x = random_inputs(d, shape, dtype=torch.float64, seed=4)
    cu = cu_seqlens([0, 5, 1, 11])
    dirs = 2 if direction == "bidirectional" else 1
    h0 = random_state(4, 4, 3, 2, directions=dirs, dtype=torch.float64, seed=5)
    assert_agree(*both(d, x, cu_seqlens=cu))
    assert_agree(*both(d, x, cu_seqlens=cu, initial_state=h0, return_final_state=True))


def test_matrix_agreement_is_not_vacuous():
    """The check above can fail: a perturbed input changes the matrix result beyond TOL."""
    torch.manual_seed(0)
    d = make_definition("diagonal", "forward")
    x = random_inputs(d, dict(b=1, t=9, h=2, g=1, n=3, p=2), dtype=torch.float64, seed=6)
    (ys, _), _ = both(d, x)
    x2 = dict(x)
    x2["a"] = x["a"].clone()
    x2["a"][0, 4, 1, 2] += 1e-6
    _, (ym, _) = both(d, x2)
    assert not compare("y", ym, ys, TOL).ok


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("decay", list(DECAY_AXES))
def test_matrix_gradients_match_scan(decay, direction):
    """Both references are differentiable by torch and give the same gradients (packed
    sequences, initial state in and final state out)."""
    torch.manual_seed(0)
    d = make_definition(decay, direction, epilogue=True)
    x = random_inputs(d, dict(b=1, t=12, h=4, g=2, n=3, p=2), dtype=torch.float64, seed=7)
    dirs = 2 if direction == "bidirectional" else 1
    x["initial_state"] = random_state(3, 4, 3, 2, directions=dirs, dtype=torch.float64, seed=8)
    grads = []
    for fn in (reference.scan, reference.matrix):
        leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        bound = bind(d.program, (), {**leaves, "cu_seqlens": cu_seqlens([5, 0, 7]),
                                     "return_final_state": True})
        y, hT = fn(d.program, bound.tensors, bound.sizes, bound.initial_state,
                   bound.cu_seqlens, True)
        gen = torch.Generator().manual_seed(9)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum() + (
            hT * torch.randn(hT.shape, generator=gen, dtype=torch.float64)).sum()
        grads.append(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))
    for name in x:
        r = compare(f"grad {name}", grads[1][name], grads[0][name], TOL)
        assert r.ok, str(r)
