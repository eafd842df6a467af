"""The one table of lowerings: each one's name, the decay kinds it can compute, its cost
formula; and choosing the cheapest legal one for concrete shapes, with the reasons.

A lowering is a way to evaluate the recurrence (a sequential scan, chunks, the t x t matrix).
Backends implement lowerings (`ssmc.backends.base.BackendLowering`); this table is what the
planner, the tuner and the command line know about them. A new lowering is one
`register_lowering(...)` here (or from any module) plus one registration in each backend that
implements it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .devices import DEVICES, DeviceModel
from .errors import UnsupportedError
from .ir import AXIS_SIZES, CHUNK, DecayKind, Program
from .passes.classify_decay import decay_kind_of
from .passes.cost import E, Cost, chunked_cost, quadratic_cost, scan_cost

ALL_DECAY_KINDS = frozenset(DecayKind)
#: a decay that varies over p (S6 with p > 1) does not factor through the key dim
FACTORED_DECAY_KINDS = ALL_DECAY_KINDS - {DecayKind.FULL}


@dataclass(frozen=True)
class Lowering:
    """One row of the table."""

    name: str
    decay_kinds: frozenset      # the DecayKinds it computes
    cost: Callable[[Program], Cost]
    summary: str = ""


_TABLE: dict[str, Lowering] = {}


def register_lowering(lowering: Lowering) -> Lowering:
    _TABLE[lowering.name] = lowering
    return lowering


def unregister_lowering(name: str) -> None:
    _TABLE.pop(name, None)


def lowering_names() -> tuple[str, ...]:
    """Every registered lowering, in registration order."""
    return tuple(_TABLE)


def get_lowering(name: str) -> Lowering:
    return _TABLE[name]


def legal_lowerings(program: Program) -> tuple[str, ...]:
    """The lowerings that can compute this program's decay structure (DESIGN.md)."""
    kind = program.decay_kind or decay_kind_of(program)
    return tuple(name for name, row in _TABLE.items() if kind in row.decay_kinds)


def lowering_costs(program: Program) -> dict[str, Cost]:
    return {name: row.cost(program) for name, row in _TABLE.items()}


register_lowering(Lowering("scan", ALL_DECAY_KINDS, scan_cost,
                           "a sequential loop over t per state tile"))
register_lowering(Lowering("chunked", FACTORED_DECAY_KINDS, chunked_cost,
                           "matmuls inside chunks, a short scan over chunk states"))
register_lowering(Lowering("quadratic", FACTORED_DECAY_KINDS, quadratic_cost,
                           "the causal t x t decayed score matrix times the values"))


# --------------------------------------------------------------------------- choosing

@dataclass(frozen=True)
class LoweringEstimate:
    lowering: str
    legal: bool
    reason: str
    values: dict
    seconds: float


@dataclass(frozen=True)
class Choice:
    lowering: str
    estimates: tuple[LoweringEstimate, ...]
    explanation: str


def estimate_seconds(v: dict, dev: DeviceModel) -> float:
    compute = v["tensor_flops"] / dev.tensor_flops + v["vector_flops"] / dev.vector_flops
    memory = v["bytes"] / dev.bandwidth
    return v["launches"] * dev.launch_s + max(compute, memory, v["serial_steps"] * dev.step_s)


def choose_lowering(program: Program, sizes: dict[str, int], device: str | DeviceModel = "h100",
                    elem_bytes: int = 2, chunk: int = 64, allowed=None) -> Choice:
    """Evaluate every lowering's cost at `sizes` (axis letter -> size) and take the cheapest
    legal one among `allowed` (default: every legal one)."""
    dev = DEVICES[device] if isinstance(device, str) else device
    legal = set(legal_lowerings(program))
    if allowed is not None:
        legal &= set(allowed)
    if not legal:
        raise UnsupportedError(f"{program.name}: no lowering among {sorted(allowed)} is legal for "
                               f"decay kind {program.decay_kind.value!r}")
    values = {AXIS_SIZES[a]: int(sizes[a]) for a in sizes if a in AXIS_SIZES}
    values[CHUNK] = min(chunk, max(int(sizes.get("t", chunk)), 16))
    values[E] = elem_bytes
    estimates = []
    for name, cost in lowering_costs(program).items():
        v = cost.subs(values)
        ok = name in legal
        reason = "" if ok else (
            f"not legal for decay kind {program.decay_kind.value!r}"
            if name not in legal_lowerings(program) else "no backend for the device implements it")
        estimates.append(LoweringEstimate(name, ok, reason, v, estimate_seconds(v, dev)))
    best = min((e for e in estimates if e.legal), key=lambda e: e.seconds)
    others = [e for e in estimates if e.legal and e is not best]
    why = [f"{best.lowering}: estimated {best.seconds * 1e6:.1f} us on {dev.name}"]
    for e in others:
        why.append(f"{e.lowering}: {e.seconds * 1e6:.1f} us ({e.seconds / best.seconds:.2f}x)")
    for e in estimates:
        if not e.legal:
            why.append(f"{e.lowering}: {e.reason}")
    return Choice(best.lowering, tuple(estimates), "; ".join(why))
