"""The test suite's faster `tl.associative_scan` for Triton's interpreter
(tests/interpreter_scan.py) gives the interpreter's own results, bit for bit."""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernels run compiled, not under the interpreter")


@triton.jit
def _affine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan(a_ptr, b_ptr, ao_ptr, bo_ptr, R: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
          AXIS: tl.constexpr, REVERSE: tl.constexpr):
    offs = (tl.arange(0, R)[:, None, None] * C * D + tl.arange(0, C)[None, :, None] * D
            + tl.arange(0, D)[None, None, :])
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    a, b = tl.associative_scan((a, b), AXIS, _affine, reverse=REVERSE)
    tl.store(ao_ptr + offs, a)
    tl.store(bo_ptr + offs, b)


@pytest.mark.parametrize("shape", [(16, 4, 8), (1, 2, 4), (2, 1, 1)])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_along_axis_is_the_interpreters_scan(monkeypatch, shape, axis, reverse):
    from triton.runtime import interpreter

    from tests.interpreter_scan import scan_along_axis

    if not hasattr(getattr(interpreter, "ScanOps", None), "interpreters_generic_scan"):
        pytest.skip("this Triton's interpreter has no generic scan to replace")

    gen = torch.Generator().manual_seed(sum(shape) + 7 * axis + reverse)
    a = torch.rand(shape, generator=gen) * 2 - 0.5     # decays of both signs, some near 0
    a.view(-1)[::5] = 0.0
    b = torch.randn(shape, generator=gen) * 1e3

    def run(generic_scan):
        monkeypatch.setattr(interpreter.ScanOps, "generic_scan", generic_scan)
        outs = torch.empty_like(a), torch.empty_like(b)
        _scan[(1,)](a, b, *outs, *shape, AXIS=axis, REVERSE=reverse)
        return outs

    want = run(interpreter.ScanOps.interpreters_generic_scan)
    got = run(scan_along_axis)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
