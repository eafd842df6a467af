"""A symbolic cost model: FLOPs and bytes of each lowering as sympy expressions.

The formulas are in the axis symbols (b t h g n p), the chunk size Q and the element size E;
`Cost.subs` substitutes concrete shapes, and `ssmc.lowerings` registers one formula per
lowering. They count what each lowering must do, not what a particular kernel does, so they
rank lowerings rather than predict microseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..ir import AXIS_SIZES, CHUNK, DecayKind, Program

b, t, h, g, n, p = (AXIS_SIZES[a] for a in "bthgnp")
Q = CHUNK
E = sp.Symbol("E", positive=True)  # bytes per input element
STATE_BYTES = 4                    # the state is always fp32


@dataclass(frozen=True)
class Cost:
    """Per-lowering work: tensor-core FLOPs, vector FLOPs, bytes moved, launches, serial steps."""

    tensor_flops: sp.Expr
    vector_flops: sp.Expr
    bytes: sp.Expr
    launches: int
    serial_steps: sp.Expr

    def subs(self, values: dict) -> dict[str, float]:
        return {
            "tensor_flops": float(self.tensor_flops.subs(values)),
            "vector_flops": float(self.vector_flops.subs(values)),
            "bytes": float(self.bytes.subs(values)),
            "launches": self.launches,
            "serial_steps": float(self.serial_steps.subs(values)),
        }


def io_bytes(program: Program) -> sp.Expr:
    """Every input read once and the output written once."""
    total = sp.Integer(0)
    for inp in program.inputs:
        total += sp.Mul(*inp.shape)
    return (total + b * t * h * p) * E


def _per_key_decay(program: Program) -> bool:
    return program.decay_kind in (DecayKind.DIAGONAL, DecayKind.FULL)


def scan_cost(program: Program) -> Cost:
    """State update (mul + fma) and the query contraction (fma), per (b t h n p)."""
    dirs = len(program.recurrence.directions)
    return Cost(
        tensor_flops=sp.Integer(0),
        vector_flops=dirs * 5 * b * t * h * n * p,
        bytes=io_bytes(program),
        launches=1,
        serial_steps=t,
    )


def chunked_cost(program: Program) -> Cost:
    """Intra-chunk: (C B^T) (Q x Q x n) and its product with V (Q x Q x p); chunk states and
    their contribution to the output (n x p per step); inter-chunk passing on vectors."""
    dirs = len(program.recurrence.directions)
    nchunks = t / Q
    return Cost(
        tensor_flops=dirs * (b * h * t * Q * (n + p) + 4 * b * h * t * n * p),
        # per-key decays form each 16-row block's own decays in log2(16) levels of factors
        # (an exponential per step, level and n) and small products; priced as measured (H100,
        # GLA at b=8 t=2048 h=16 n=p=128: the scores kernel 0.40 ms, 4 "FLOPs" per (step, key
        # step of its block, n) at the model's 3 TFLOP/s; 12 when it took 1.33 ms walking the
        # block's steps, when the chunked forward took 2.3-2.8 ms where the scan took 5.4 ms)
        vector_flops=dirs * (2 * b * h * nchunks * n * p
                             + (4 * 16 * b * h * t * n if _per_key_decay(program) else 0)),
        bytes=2 * io_bytes(program) + dirs * 3 * b * h * nchunks * n * p * STATE_BYTES,
        launches=3,
        serial_steps=nchunks,
    )


def quadratic_cost(program: Program) -> Cost:
    """The causal half of the t x t decayed score matrix, then its product with V."""
    dirs = len(program.recurrence.directions)
    per_key = _per_key_decay(program)
    return Cost(
        tensor_flops=dirs * b * h * t * t * (n + p),
        vector_flops=dirs * (12 * b * h * t * t * n if per_key else b * h * t * t),
        bytes=io_bytes(program),
        launches=1,
        serial_steps=sp.Integer(1),
    )
