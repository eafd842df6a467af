"""Triton's interpreter runs `tl.associative_scan` with a combine function of its own (the scan
lowering's affine pairs) one element at a time: a (16, 16, 8) tile costs ~1000 calls of the
combine, ~45 ms, and the scan lowering's kernels spent most of their CPU test time there (a
cross2d backward test at n=16: 112 s of 114). `scan_along_axis` is the same sequential inclusive
scan, each step's combine applied to a whole slice across the other axes: every element gets
the same operations in the same order, so the results are the same bits
(tests/test_interpreter_scan.py checks it against the interpreter's own). Installed for the
test suite only (tests/conftest.py), where kernels run under the interpreter.
"""
from __future__ import annotations

import math

import numpy as np


def scan_along_axis(self, input):
    """Drop-in for `interpreter.ScanOps.generic_scan` (the reverse flip is done by the caller)."""
    import triton.language as tl

    datas = [arg.handle.data for arg in input]
    dtypes = [arg.dtype for arg in input]
    shape = datas[0].shape
    axis = self.axis
    outs = [np.empty(shape, dtype=d.dtype) for d in datas]
    slice_shape = shape[:axis] + shape[axis + 1:]

    def at(i):
        return (slice(None),) * axis + (i,)

    def as_slice(value, dtype):
        data = value.handle.data if isinstance(value, tl.core.tensor) else np.asarray(value)
        if data.size == math.prod(slice_shape):
            data = data.reshape(slice_shape)
        return np.broadcast_to(data, slice_shape).astype(dtype)

    if shape[axis] == 0:
        return [self.to_tensor(o, t) for o, t in zip(outs, dtypes)]
    # to_tensor copies what it wraps: the slices go in as they are
    acc = [d[at(0)] for d in datas]
    for o, a in zip(outs, acc):
        o[at(0)] = a
    for i in range(1, shape[axis]):
        prev = tuple(self.to_tensor(a, t) for a, t in zip(acc, dtypes))
        cur = tuple(self.to_tensor(d[at(i)], t) for d, t in zip(datas, dtypes))
        ret = self.combine_fn.fn(*prev, *cur)
        ret = ret if isinstance(ret, tuple) else (ret,)
        acc = [as_slice(r, o.dtype) for r, o in zip(ret, outs)]
        for o, a in zip(outs, acc):
            o[at(i)] = a
    return [self.to_tensor(o, t) for o, t in zip(outs, dtypes)]


def install() -> None:
    """Use `scan_along_axis` in this process's Triton interpreter (the interpreter's own kept as
    `ScanOps.interpreters_generic_scan`, for the test that compares them)."""
    from triton.runtime import interpreter

    ops = getattr(interpreter, "ScanOps", None)
    if ops is None or not hasattr(ops, "generic_scan"):   # another Triton: left as it is
        return
    if ops.generic_scan is not scan_along_axis:
        ops.interpreters_generic_scan = ops.generic_scan
        ops.generic_scan = scan_along_axis
