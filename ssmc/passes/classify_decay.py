"""Classify how the decay varies; the class decides which lowerings are legal
(`ssmc.lowerings`)."""
from __future__ import annotations

from ..ir import DecayKind, Program
from .base import PassContext, register_pass


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
