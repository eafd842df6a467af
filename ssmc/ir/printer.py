"""A readable text form of a Program, and its parser (the two round-trip)."""
from __future__ import annotations

import re

import sympy as sp
from sympy.printing.str import StrPrinter

from .functions import CUSTOM_FUNCTIONS
from .nodes import (DIRECTION_SETS, DecayKind, Elementwise, Input, Program, Recurrence,
                    Transition, Y, symbol)


class _ExactFloatPrinter(StrPrinter):
    """sympy's default prints 15 digits, which loses the last bits of a double (a scale of
    3 ** -0.5 would not round-trip); print the shortest text that reads back exactly."""

    def _print_Float(self, expr):
        return repr(float(expr))


def _sstr(expr) -> str:
    return _ExactFloatPrinter().doprint(expr)


# float literals in printed bodies; parsed through Python's float so they read back exactly
_FLOAT = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)")


_EXACT = "_ssmc_exact_float_"


def _sympify(body: str, local: dict) -> sp.Expr:
    text = _FLOAT.sub(lambda m: f'{_EXACT}("{m.group(1)}")', body)
    return sp.sympify(text, locals={**local, _EXACT: lambda s: sp.Float(float(s))})


def _ew(role: str, e: Elementwise) -> str:
    return f"  {role}[{' '.join(e.axes)}] = {_sstr(e.expr)}"


def print_program(program: Program) -> str:
    args = ", ".join(f"{i.name}: [{' '.join(i.axes)}]" for i in program.inputs)
    r = program.recurrence
    lines = [f"program {program.name}({args})"]
    if r.decay is not None:
        lines.append(_ew("decay", r.decay))
    lines += [_ew("key", r.key), _ew("value", r.value), _ew("query", r.query)]
    operands = ", ".join(x for x in ("decay", "key", "value", "query")
                         if x != "decay" or r.decay is not None)
    lines.append(f"  y[b t h p] = recurrence({operands}, direction={r.direction_name}, "
                 f"transition={r.transition.kind})")
    lines.append(_ew("out", program.output))
    if program.decay_kind is not None:
        lines.append(f"  # decay_kind = {program.decay_kind.value}")
    if program.log_decay is not None:
        lines.append("  #" + _ew("log_decay", program.log_decay)[1:])
    if program.analyses:
        lines.append(f"  # analyses = {', '.join(program.analyses)}")
    return "\n".join(lines)


_HEADER = re.compile(r"program (\w+)\((.*)\)$")
_EW = re.compile(r"\s*#?\s*(\w+)\[([a-z ]*)\] = (.*)$")
_REC = re.compile(r".*recurrence\((.*), direction=(\w+), transition=(\w+)\)$")


def parse_program(text: str) -> Program:
    """Parse `print_program`'s output back into an equal Program."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    m = _HEADER.match(lines[0].strip())
    if not m:
        raise ValueError(f"not a program header: {lines[0]!r}")
    name, args = m.groups()
    inputs = []
    for arg in filter(None, (a.strip() for a in re.split(r",(?![^\[]*\])", args))):
        an, ax = arg.split(":")
        inputs.append(Input(an.strip(), tuple(ax.strip()[1:-1].split())))
    local = {i.name: symbol(i.name) for i in inputs}
    local.update(CUSTOM_FUNCTIONS)
    local["y"] = Y
    parts: dict[str, Elementwise] = {}
    directions, transition, decay_kind, analyses = None, None, None, ()
    for ln in lines[1:]:
        if "recurrence(" in ln:
            rm = _REC.match(ln)
            directions, transition = DIRECTION_SETS[rm.group(2)], Transition(rm.group(3))
            continue
        if "analyses =" in ln:
            analyses = tuple(a.strip() for a in ln.split("=")[1].split(","))
            continue
        if "decay_kind =" in ln:
            decay_kind = DecayKind(ln.split("=")[1].strip())
            continue
        em = _EW.match(ln)
        if not em:
            raise ValueError(f"cannot parse line {ln!r}")
        role, axes, body = em.groups()
        parts[role] = Elementwise(_sympify(body, local), tuple(axes.split()))
    rec = Recurrence(key=parts["key"], value=parts["value"], query=parts["query"],
                     decay=parts.get("decay"), directions=directions, transition=transition)
    return Program(name=name, inputs=tuple(inputs), recurrence=rec, output=parts["out"],
                   decay_kind=decay_kind, log_decay=parts.get("log_decay"), analyses=analyses)
