"""Shared pieces of the Triton backend tests: a forward checker against the float64 sequential
reference (`ssmc.reference.scan`)."""
from __future__ import annotations

import math

import pytest
import torch

import ssmc
from ssmc import reference
from ssmc.ir import print_program
from ssmc.validate import bind
from tests.helpers import term_magnitude

#: relative L2 error bounds ||out - ref|| / ||ref|| by input dtype. fp32 and fp64 compute in
#: fp32/fp64 throughout; bf16/fp16 outputs carry one rounding to 8 or 11 mantissa bits (the
#: reference sees the same rounded inputs, so input rounding is not counted).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor,
           scale: torch.Tensor | None = None) -> tuple[float, float]:
    """(relative L2 error, max abs error) of `actual` against the float64 `expected`, relative
    to `scale`'s norm where given (default: `expected`'s)."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    diff = (a - e).abs()
    if diff.numel() == 0:
        return 0.0, 0.0
    norm = float((e if scale is None else scale).norm())
    err = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    return err, float(diff.max())


def gradient_problems(grads: dict, g_h0, ref_grads: dict, ref_h0, inputs: dict, state,
                      tol: float) -> tuple[list[str], dict[str, float]]:
    """Compare a kernel's backward with the reference's: every input's gradient (and the
    initial state's, when `state` is given) must have the input's shape and dtype, be finite,
    and be within `tol` relative L2 error (a missing reference gradient means zeros). Returns
    (problems, relative errors by gradient name)."""
    pairs = [(f"grad {k}", grads.get(k), ref_grads[k], inputs[k]) for k in inputs]
    if state is not None:
        pairs.append(("grad initial_state", g_h0, ref_h0, state))
    problems, errors = [], {}
    for name, got, want, like in pairs:
        if want is None:
            want = torch.zeros_like(like, dtype=torch.float64)
        if got is None or tuple(got.shape) != tuple(like.shape) or got.dtype != like.dtype:
            problems.append(f"{name}: got {None if got is None else (tuple(got.shape), got.dtype)}"
                            f", expected {(tuple(like.shape), like.dtype)}")
            continue
        if not torch.isfinite(got).all():
            problems.append(f"{name}: non-finite values")
            continue
        err, max_abs = rel_l2(got, want)
        errors[name] = err
        if not err <= tol:
            problems.append(f"{name}: relative L2 error {err:.3e} > tol {tol:.1e} "
                            f"(max abs error {max_abs:.3e})")
    return problems, errors


def check_triton(definition, inputs: dict, *, lowering: str = "scan", tol: float | None = None,
                 initial_state=None, return_final_state: bool = False, cu_seqlens=None,
                 grid=None, label: str = "", by_magnitude: bool = False) -> dict[str, float]:
    """Run `definition` on the Triton backend with `lowering` and compare the output (and the
    final state) with `ssmc.reference.scan` in float64 on the same (rounded) inputs.

    `tol` bounds the relative L2 error (default: `TOL` of the output dtype); with
    `by_magnitude` the output's error is relative to `tests.helpers.term_magnitude` (the size of
    its terms, which cancel in y: what a kernel rounding its operands is off by a fraction of).
    Fails with the tensor name, max abs error, relative error and the definition's IR. Returns
    the errors."""
    op = ssmc.compile(definition, backend="triton", lowering=lowering)
    program = op.program
    extra = dict(return_final_state=return_final_state)
    if initial_state is not None:
        extra["initial_state"] = initial_state
    if cu_seqlens is not None:
        extra["cu_seqlens"] = cu_seqlens
    if grid is not None:    # cross2d
        extra["grid"] = grid
    result = op(**inputs, **extra)
    out, final = result if return_final_state else (result, None)

    bound = bind(program, (), {**inputs, **extra})
    ref_tensors = {k: v.detach().cpu().double() for k, v in bound.tensors.items()}
    h0 = None if initial_state is None else initial_state.detach().cpu().double()
    cu = None if cu_seqlens is None else cu_seqlens.cpu()
    ref_out, ref_final = reference.scan(program, ref_tensors, bound.sizes, h0, cu,
                                        return_final_state)
    tol = TOL[bound.dtype] if tol is None else tol

    problems, errors = [], {}
    y_scale = (term_magnitude(program, ref_tensors, bound.sizes, h0, cu) if by_magnitude
               else None)
    checks = [("y", out, ref_out, bound.dtype, y_scale)]
    if return_final_state:
        want = torch.float64 if bound.dtype == torch.float64 else torch.float32
        checks.append(("final_state", final, ref_final, want, None))
    for name, actual, expected, dtype, scale in checks:
        if actual is None or tuple(actual.shape) != tuple(expected.shape):
            problems.append(f"{name}: shape {None if actual is None else tuple(actual.shape)}, "
                            f"reference {tuple(expected.shape)}")
            continue
        if actual.dtype != dtype:
            problems.append(f"{name}: dtype {actual.dtype}, expected {dtype}")
        bad = ~torch.isfinite(actual.detach().cpu()) & torch.isfinite(expected)
        if bad.any():
            problems.append(f"{name}: {int(bad.sum())} non-finite value(s) where the reference "
                            "is finite")
            continue
        err, max_abs = rel_l2(actual, expected, scale)
        errors[name] = err
        if not (err <= tol) or math.isnan(err):
            problems.append(f"{name}: relative L2 error {err:.3e} > tol {tol:.1e} "
                            f"(max abs error {max_abs:.3e})")
    if problems:
        sizes = ", ".join(f"{k}={v}" for k, v in bound.sizes.items())
        raise AssertionError(
            f"triton-{lowering} {label or program.name} ({bound.dtype}, {sizes}, "
            f"h0={initial_state is not None}, varlen={cu_seqlens is not None}) disagrees with "
            f"the float64 reference:\n  " + "\n  ".join(problems) +
            "\nIR:\n" + print_program(program))
    return errors


@pytest.fixture(scope="session")
def triton_check():
    """The checker `check_triton(definition, inputs, lowering=, tol=, initial_state=,
    return_final_state=, cu_seqlens=)`."""
    return check_triton


class _Proxy:
    """A module whose named attributes are replaced (the rest read from `module`)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


def count_launches(monkeypatch, lowering: str, kernel: str) -> list:
    """The grids of `kernel`'s launches by the Triton `lowering` from here on (its registered
    launch wrapped for the test)."""
    import dataclasses

    from ssmc.backends.triton.lowerings.registry import LOWERINGS

    grids = []
    registered = LOWERINGS[lowering]

    def counting(module, *args, **kwargs):
        real = getattr(module, kernel)

        class Count:
            def __getitem__(self, grid):
                grids.append(grid)
                return real[grid]
        return registered.launch(_Proxy(module, **{kernel: Count()}), *args, **kwargs)

    monkeypatch.setitem(LOWERINGS, lowering, dataclasses.replace(registered, launch=counting))
    return grids
