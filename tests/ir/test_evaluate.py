"""`ssmc.ir.evaluate`: the torch meaning of every IR function, and its gradients."""
from __future__ import annotations

import math

import pytest
import sympy as sp
import torch

from ssmc.ir.evaluate import evaluate
from ssmc.ir.functions import Sigmoid
from tests.helpers import TorchOps


@pytest.mark.parametrize("fn, derivative", [
    (sp.tanh, lambda u: 4 * math.exp(-2 * abs(u)) / (1 + math.exp(-2 * abs(u))) ** 2),
    (Sigmoid, lambda u: math.exp(-abs(u)) / (1 + math.exp(-abs(u))) ** 2),
], ids=["tanh", "sigmoid"])
def test_gradients_keep_their_value_where_the_function_rounds_to_one(fn, derivative):
    """torch's own backward of tanh (1 - y^2) and sigmoid (s (1 - s)) is 0 once the value
    rounds to 1 in float64 (tanh at 19.5: 0 against 4.6e-17), which made the float64
    reference's gradients wrong where the kernels' were right."""
    a = sp.Symbol("a", real=True)
    x = torch.tensor([19.5, 40.0, -45.0, 0.3], dtype=torch.float64, requires_grad=True)
    evaluate(fn(a), {"a": x}, x).sum().backward()
    for u, g in zip(x.tolist(), x.grad.tolist()):
        assert g == pytest.approx(derivative(u), rel=1e-12), u


def test_constants_are_made_on_the_device_not_copied_from_the_host():
    """A number in an expression (-1 in -exp(A_log) * delta) was a tensor built on the host
    and copied to the device: on a GPU each such copy waits for the stream, and the chain
    rule's four of them left the GPU idle ~2 ms of a 9 ms training step. `lift_fresh` is the
    op through which such host-made tensors enter."""
    a, d = sp.symbols("a d", real=True)
    x = torch.randn(3, 4)
    with TorchOps() as ops:
        out = evaluate(-sp.exp(a) * d + 2 * sp.Max(a, sp.Rational(1, 2)), {"a": x, "d": x}, x)
    assert not [op for op in ops.ops if "lift_fresh" in op], ops.ops
    torch.testing.assert_close(out, -x.exp() * x + 2 * x.clamp_min(0.5))
