"""Large per-step log-decays on the chunked and quadratic lowerings.

A decay that varies over the key dim (Mamba-1's selective scan, GLA) with per-step log-decays
of -5 to -20 sums past -88 within one 16-step chunk; a form that factors the decay between two
steps of a chunk as exp(L_u) * exp(-L_s) overflows there (inf * 0: NaN). Each definition mixes
such key channels with slowly decaying ones (so the result still depends on the long range),
over several chunks (t = 40, the last chunk partial), forward in fp32 and bf16 and backward in
fp32, against the float64 reference. And a scalar decay (ssd) of exp(-40) a step, backward.
"""
from __future__ import annotations

import pytest
import torch

from tests.backends.triton.conftest import check_triton
from tests.backends.triton.test_backward import check_backward
from tests.backends.triton.test_scan import builtin, inputs_for, state_for

LOWERINGS = ("chunked", "quadratic")
SIZES = {"selective_scan": dict(b=1, t=40, h=3, g=1, n=6, p=1),
         "gla": dict(b=1, t=40, h=2, g=2, n=5, p=3)}


def _mixed(gen, shape, big: tuple[float, float], small: tuple[float, float]):
    """Negative values, drawn from `big` on about half the key channels (last axis) and from
    `small` on the others."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    fast = torch.rand(shape[-1], generator=gen) < 0.5
    fast[0], fast[-1] = True, False
    return -torch.where(fast, big[0] + (big[1] - big[0]) * u, small[0] + (small[1] - small[0]) * u)


def large_decay_inputs(name: str, sizes: dict, seed: int = 0) -> dict:
    """Inputs of the built-in `name` whose per-step log-decays reach -5 to -20 per key."""
    defn = builtin(name)
    inputs = inputs_for(defn, sizes, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    if name == "selective_scan":
        # dt = softplus(delta + delta_bias) ~ 0.3..1; dt * A down to -20 per step
        inputs["delta"] = 0.5 * torch.randn(inputs["delta"].shape, generator=gen,
                                            dtype=torch.float64) - 1.0
        inputs["delta_bias"] = torch.zeros_like(inputs["delta_bias"])
        inputs["A"] = _mixed(gen, inputs["A"].shape, (5.0, 20.0), (0.02, 0.5))
    else:
        inputs["g"] = _mixed(gen, inputs["g"].shape, (5.0, 20.0), (0.01, 0.3))
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_large_per_key_decay_forward(lowering, name, dtype):
    sizes = SIZES[name]
    inputs = {k: v.to(dtype) for k, v in large_decay_inputs(name, sizes).items()}
    h0 = state_for(builtin(name), sizes)
    check_triton(builtin(name), inputs, lowering=lowering, initial_state=h0,
                 return_final_state=True)


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_large_per_key_decay_backward(lowering, name):
    sizes = SIZES[name]
    check_backward(builtin(name), lowering, sizes, inputs=large_decay_inputs(name, sizes, seed=1),
                   seed=1)


@pytest.mark.parametrize("name", list(SIZES))
def test_large_per_key_decay_bidirectional(name):
    """Both directions (the reverse one reads the chunk from its end), forward and backward."""
    sizes = SIZES[name]
    defn = builtin(name, "bidirectional")
    inputs = large_decay_inputs(name, sizes, seed=2)
    check_triton(defn, {k: v.float() for k, v in inputs.items()}, lowering="chunked",
                 initial_state=state_for(defn, sizes), return_final_state=True)
    check_backward(defn, "chunked", sizes, inputs=inputs, seed=2)


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_strong_scalar_decay_backward(lowering):
    """ssd with dt * A <= -40 a step (decays without n): the key's factor exp(l_last - lc) to
    the chunk's end must not come from the total minus the running sum (two reductions that
    disagree on the last row: gradients of x, B and dt were off by up to 2e-4 in fp32). A's own
    gradient underflows in fp32 (terms ~exp(-40)) and is left out."""
    sizes = dict(b=1, t=64, h=2, g=1, n=8, p=8)
    defn = builtin("ssd")
    inputs = inputs_for(defn, sizes, dtype=torch.float32, seed=3)
    inputs["A"] = torch.full_like(inputs["A"], -40.0)
    inputs["dt"] = inputs["dt"].abs() + 1.0
    errors = check_backward(defn, lowering, sizes, inputs=inputs, tol=1.0, h0=False)
    worst = {k: v for k, v in errors.items() if k != "grad A" and v > 1e-5}
    assert not worst, f"gradients off at strong decays: {worst}"
