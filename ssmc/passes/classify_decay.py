"""Classify how the decay varies; the class decides which lowerings are legal."""
from __future__ import annotations

from ..ir import DecayKind, Program
from .base import PassContext, register_pass

#: lowerings each decay structure permits (DESIGN.md). Chunked/quadratic need the decay to
#: factor through the key dim, so a decay that varies over p (S6 with p > 1) is scan-only.
LEGAL_LOWERINGS = {
    DecayKind.NONE: ("scan", "chunked", "quadratic"),
    DecayKind.TIME_INVARIANT: ("scan", "chunked", "quadratic"),
    DecayKind.SCALAR: ("scan", "chunked", "quadratic"),
    DecayKind.DIAGONAL: ("scan", "chunked", "quadratic"),
    DecayKind.FULL: ("scan",),
}


def decay_kind_of(program: Program) -> DecayKind:
    decay = program.recurrence.decay
    if decay is None:
        return DecayKind.NONE
    axes = set(decay.axes)
    if "p" in axes:
        return DecayKind.FULL
    if "t" not in axes:
        return DecayKind.TIME_INVARIANT
    if "n" in axes:
        return DecayKind.DIAGONAL
    return DecayKind.SCALAR


@register_pass("classify_decay")
def classify_decay(program: Program, ctx: PassContext) -> Program:
    return program.replace(decay_kind=decay_kind_of(program))


def legal_lowerings(program: Program) -> tuple[str, ...]:
    return LEGAL_LOWERINGS[program.decay_kind or decay_kind_of(program)]
