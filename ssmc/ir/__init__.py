"""The typed IR of one SSM recurrence: nodes, verifier, printer."""
from .functions import Sigmoid, Silu, Softplus
from .nodes import (AXES, AXIS_SIZES, CHUNK, DIRECTION_SETS, Y, Y_AXES, DecayKind, Direction,
                    Elementwise, Input, Program, Recurrence, Transition, canonical_axes, symbol)
from .printer import parse_program, print_program
from .verify import expr_axes, verify

__all__ = [
    "AXES", "AXIS_SIZES", "CHUNK", "DIRECTION_SETS", "Y", "Y_AXES", "DecayKind", "Direction",
    "Elementwise", "Input", "Program", "Recurrence", "Transition", "canonical_axes", "symbol",
    "parse_program", "print_program", "expr_axes", "verify", "Sigmoid", "Silu", "Softplus",
]
