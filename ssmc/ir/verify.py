"""The IR verifier: the invariants every pass may rely on and must preserve."""
from __future__ import annotations

from ..errors import SpecError
from .nodes import AXES, OPERAND_AXES, RESERVED_NAMES, Y, Y_AXES, Elementwise, Program, canonical_axes
from .orders import has_order_axis


def expr_axes(expr, input_axes: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The axes an elementwise expression ranges over: the union of its operands' axes."""
    axes: set[str] = set()
    for s in expr.free_symbols:
        if s == Y:
            axes.update(Y_AXES)
        else:
            axes.update(input_axes[s.name])
    return canonical_axes(axes)


def verify(program: Program) -> Program:
    """Raise SpecError naming the broken invariant; return the program unchanged."""
    where = f"{program.name}"
    seen = set()
    input_axes = {}
    for inp in program.inputs:
        if inp.name in seen:
            raise SpecError(f"{where}: input {inp.name!r} is declared twice")
        if inp.name in RESERVED_NAMES:
            raise SpecError(f"{where}: input name {inp.name!r} is reserved")
        seen.add(inp.name)
        for a in inp.axes:
            if a not in AXES:
                raise SpecError(f"{where}: {inp.name!r} has unknown axis {a!r}")
        if len(set(inp.axes)) != len(inp.axes):
            raise SpecError(f"{where}: {inp.name!r} repeats an axis in {' '.join(inp.axes)!r}")
        if "h" in inp.axes and "g" in inp.axes:
            raise SpecError(f"{where}: {inp.name!r} has both 'h' and 'g' axes")
        input_axes[inp.name] = inp.axes

    r = program.recurrence
    operands = {"key": r.key, "value": r.value, "query": r.query, "decay": r.decay,
                "output": program.output, "log_decay": program.log_decay}
    for role, node in operands.items():
        if node is None:
            continue
        _check_elementwise(where, role, node, input_axes, allow_y=(role == "output"))
        allowed = OPERAND_AXES.get(role if role != "log_decay" else "decay")
        bad = [a for a in node.axes if a not in allowed]
        if bad:
            raise SpecError(f"{where}: {role} has axis {bad[0]!r}, which it cannot carry "
                            f"(allowed: {' '.join(a for a in AXES if a in allowed)})")
    if "n" not in r.key.axes:
        raise SpecError(f"{where}: key has no 'n' axis (axes: {' '.join(r.key.axes) or 'none'})")
    if "n" not in r.query.axes:
        raise SpecError(f"{where}: query has no 'n' axis (axes: {' '.join(r.query.axes) or 'none'})")
    if "p" not in r.value.axes:
        raise SpecError(f"{where}: value has no 'p' axis (axes: {' '.join(r.value.axes) or 'none'})")
    if Y not in program.output.expr.free_symbols:
        raise SpecError(f"{where}: the output does not use the recurrence's result")
    if not r.directions:
        raise SpecError(f"{where}: the recurrence has no direction")
    if has_order_axis(program) and not program.on_grid:
        raise SpecError(f"{where}: an input has the order axis 'k', but the recurrence has no "
                        "grid orders (direction='cross2d')")
    if program.log_decay is not None and r.decay is not None:
        if program.log_decay.axes != r.decay.axes:
            raise SpecError(f"{where}: log_decay axes {program.log_decay.axes} differ from "
                            f"decay axes {r.decay.axes}")
    return program


def _check_elementwise(where, role, node: Elementwise, input_axes, allow_y: bool) -> None:
    for s in node.expr.free_symbols:
        if s == Y:
            if not allow_y:
                raise SpecError(f"{where}: {role} uses the recurrence's own output")
            continue
        if s.name not in input_axes:
            raise SpecError(f"{where}: {role} uses {s.name!r}, which is not an input")
    actual = expr_axes(node.expr, input_axes)
    if actual != node.axes:
        raise SpecError(f"{where}: {role} is recorded over axes {node.axes} "
                        f"but its operands range over {actual}")
