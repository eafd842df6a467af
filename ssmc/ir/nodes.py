"""The IR: a small typed operator graph for one SSM recurrence.

A `Program` is inputs -> elementwise prologue (decay, key, value, query) -> exactly one
`Recurrence` -> elementwise epilogue -> output. Elementwise bodies are sympy expressions over
the input symbols (and `Y`, the recurrence output); axis sizes are sympy symbols. Nodes are
frozen, so programs hash and compare structurally; passes return new programs.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
from dataclasses import dataclass, field

import sympy as sp

AXES = ("b", "k", "t", "h", "g", "n", "p")
AXIS_ROLES = {
    "b": "batch", "k": "scan order (cross2d: one slice per order)", "t": "time",
    "h": "heads", "g": "groups of heads sharing key/query",
    "n": "state (key) dim", "p": "value (head) dim",
}
AXIS_SIZES = {a: sp.Symbol(a, integer=True, positive=True) for a in AXES}
CHUNK = sp.Symbol("Q", integer=True, positive=True)

#: the recurrence's output inside epilogue expressions
Y = sp.Symbol("y", real=True)
RESERVED_NAMES = ("y", "initial_state", "return_final_state", "cu_seqlens")

#: the axes each recurrence operand may carry (g is broadcast to h)
OPERAND_AXES = {
    "decay": frozenset("bkthgnp"),
    "key": frozenset("bkthgn"),
    "query": frozenset("bkthgn"),
    "value": frozenset("bkthgp"),
    "output": frozenset("bthgp"),
}
Y_AXES = ("b", "t", "h", "p")


class Direction(str, enum.Enum):
    """An order in which the recurrence visits the t axis. The column orders read `t` (of
    size H * W, row-major over a grid) column by column: step s is grid row s % H, column
    s // H."""

    FORWARD = "forward"
    REVERSE = "reverse"
    COLUMN = "column"
    COLUMN_REVERSE = "column_reverse"

    @property
    def reversed(self) -> bool:
        return self in (Direction.REVERSE, Direction.COLUMN_REVERSE)

    @property
    def column(self) -> bool:
        return self in (Direction.COLUMN, Direction.COLUMN_REVERSE)


DIRECTION_SETS = {
    "forward": (Direction.FORWARD,),
    "reverse": (Direction.REVERSE,),
    "bidirectional": (Direction.FORWARD, Direction.REVERSE),
    # VMamba's order: row-major, column-major, and both reversed; an input's axis `k` indexes it
    "cross2d": (Direction.FORWARD, Direction.COLUMN, Direction.REVERSE, Direction.COLUMN_REVERSE),
}


class DecayKind(str, enum.Enum):
    """How the decay varies; decides which lowerings are legal (DESIGN.md's table)."""

    NONE = "none"                      # no decay: plain cumulative sum
    TIME_INVARIANT = "time_invariant"  # no t axis (per head, maybe per key)
    SCALAR = "scalar"                  # one value per (b, t, h)
    DIAGONAL = "diagonal"              # varies over the key dim n
    FULL = "full"                      # varies over p as well (Mamba-1 S6 with p > 1)


def canonical_axes(axes) -> tuple[str, ...]:
    """Axes in the fixed order b t h g n p, with g absorbed into h when both occur."""
    s = set(axes)
    if "g" in s and "h" in s:
        s.discard("g")
    return tuple(a for a in AXES if a in s)


def symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


@dataclass(frozen=True)
class Input:
    name: str
    axes: tuple[str, ...]

    @property
    def symbol(self) -> sp.Symbol:
        return symbol(self.name)

    @property
    def shape(self) -> tuple[sp.Symbol, ...]:
        return tuple(AXIS_SIZES[a] for a in self.axes)


@dataclass(frozen=True)
class Elementwise:
    """`expr` evaluated pointwise over `axes` (broadcasting inputs by axis letter)."""

    expr: sp.Expr
    axes: tuple[str, ...]

    def inputs(self) -> tuple[str, ...]:
        return tuple(sorted(s.name for s in self.expr.free_symbols))


@dataclass(frozen=True)
class Transition:
    """The state transition's structure. Diagonal today; room for diagonal-plus-low-rank."""

    kind: str = "diagonal"


@dataclass(frozen=True)
class Recurrence:
    key: Elementwise
    value: Elementwise
    query: Elementwise
    decay: Elementwise | None
    directions: tuple[Direction, ...] = (Direction.FORWARD,)
    transition: Transition = Transition()

    @property
    def direction_name(self) -> str:
        for name, dirs in DIRECTION_SETS.items():
            if dirs == self.directions:
                return name
        return "+".join(d.value for d in self.directions)


@dataclass(frozen=True)
class Program:
    name: str
    inputs: tuple[Input, ...]
    recurrence: Recurrence
    output: Elementwise
    # filled by passes
    decay_kind: DecayKind | None = None
    log_decay: Elementwise | None = None
    analyses: tuple[str, ...] = field(default=())
    #: the derivatives of the elementwise parts (`ssmc.ir.backward.BackwardExprs`), set by the
    #: derive_backward pass; derived from the fields above, so not part of equality
    backward: object = field(default=None, compare=False, repr=False)

    def replace(self, **changes) -> "Program":
        return dataclasses.replace(self, **changes)

    def input(self, name: str) -> Input:
        for inp in self.inputs:
            if inp.name == name:
                return inp
        raise KeyError(name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def axes_present(self) -> set[str]:
        return {a for i in self.inputs for a in i.axes}

    @property
    def on_grid(self) -> bool:
        """Whether some order reads t as a 2-D grid (the call then passes `grid=(H, W)`)."""
        return any(d.column for d in self.recurrence.directions)

    @functools.cached_property
    def decay_signed(self) -> bool:
        """Whether the decay may be negative or zero for some input (not provably positive):
        kernels working in log space then carry its sign apart from log|decay|."""
        d = self.recurrence.decay
        return d is not None and d.expr.is_positive is not True

    @functools.cached_property
    def log_decay_exact(self) -> bool:
        """Whether log|decay| was found in closed form (exp(u) -> u, sigmoid(x) ->
        -softplus(-x)) with no `log` of a variable left: then it is finite wherever the decay
        is nonzero in exact arithmetic, and its derivatives are bounded, so a backward in log
        space is exact. Otherwise (a decay such as sigmoid(a) * w) the decay may reach 0, where
        d log|decay| = 1/decay is not finite: its gradient needs the direct form."""
        ld = self.log_decay
        return ld is None or all(lg.args[0].is_number for lg in ld.expr.atoms(sp.log))

    @functools.cached_property
    def decay_log_safe(self) -> bool:
        """Positive with an exact log: kernels may use exp(sum of log-decays) unsigned, and
        a backward in log space is exact."""
        return not self.decay_signed and self.log_decay_exact

    def structural_key(self) -> str:
        """A text that is equal for programs that compute the same thing.

        Input names are replaced by their positions, so renaming arguments keeps the key;
        sympy's `srepr` is deterministic across processes (no hash-ordered output). Made once
        per program (every field it reads is frozen): kernel cache keys ask for it per call.
        """
        return self._structural_key

    @functools.cached_property
    def _structural_key(self) -> str:
        rename = {inp.symbol: symbol(f"in{i}") for i, inp in enumerate(self.inputs)}

        def ew(e: Elementwise | None) -> str:
            if e is None:
                return "None"
            return f"{sp.srepr(e.expr.xreplace(rename))}@{''.join(e.axes)}"

        r = self.recurrence
        parts = [
            "inputs=" + ",".join("".join(i.axes) for i in self.inputs),
            "decay=" + ew(r.decay),
            "key=" + ew(r.key),
            "value=" + ew(r.value),
            "query=" + ew(r.query),
            "directions=" + ",".join(d.value for d in r.directions),
            "transition=" + r.transition.kind,
            "output=" + ew(self.output),
        ]
        return ";".join(parts)

    def structural_hash(self) -> str:
        return self._structural_hash

    @functools.cached_property
    def _structural_hash(self) -> str:
        return hashlib.sha256(self.structural_key().encode()).hexdigest()
