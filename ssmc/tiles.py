"""Tile parameters: each backend lowering's typed tile, and the context its tile space is
enumerated in.

A Plan carries `tile`: None (the lowering's built-in tiles, which may depend on the call's
sizes) or an instance of the lowering's `Tile` subclass, whose fields are the parameters the
generated code reads, each None (built-in) or a positive integer. Subclasses document their
fields and may restrict them (`pow2`, `choices` in the field metadata); construction checks
them, so a bad tuned config or hand-written tile is an error at plan time, not a kernel fault.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .devices import DeviceLimits, DeviceModel
from .errors import ConfigError
from .ir import Program
from .plan import Plan

#: bytes of one matmul operand element per plan dtype (fp32 dots run in IEEE fp32)
OPERAND_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
#: fraction of a thread's registers that fp32 accumulators may take before we call it a spill
REG_FRACTION = 0.75


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def pow2_upto(lo: int, hi: int) -> tuple[int, ...]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return tuple(out)


def pow2(doc: str = ""):
    """A tile field that must be a power of two."""
    return dataclasses.field(default=None, metadata={"pow2": True, "doc": doc})


def flag(doc: str = ""):
    """A 0/1 tile field."""
    return dataclasses.field(default=None, metadata={"choices": (0, 1), "doc": doc})


def count(doc: str = ""):
    """A positive-integer tile field."""
    return dataclasses.field(default=None, metadata={"doc": doc})


@dataclass(frozen=True)
class Tile:
    """Base class of the typed tiles; subclasses declare fields with `pow2`, `flag`, `count`."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            where = f"{type(self).__name__}.{f.name}"
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer or None, got "
                                  f"{type(value).__name__} {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{where} must be one of {choices}, got {value}")
            if choices is None and value <= 0:
                raise ConfigError(f"{where} must be positive, got {value}")
            if f.metadata.get("pow2") and value & (value - 1):
                raise ConfigError(f"{where} must be a power of two, got {value}")

    @classmethod
    def from_dict(cls, values: dict) -> "Tile":
        """The tile with these fields set; an unknown name is a ConfigError that lists the
        known ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}; "
                              f"its fields: {', '.join(names)}")
        return cls(**values)

    def as_dict(self) -> dict[str, int]:
        """The fields that are set (the others take the lowering's built-in values)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


def tile_of(plan: Plan, tile_type: type[Tile]) -> Tile:
    """The plan's tile as `tile_type` (all built-in when the plan has none); a tile of another
    lowering's type is an error."""
    if plan.tile is None:
        return tile_type()
    if not isinstance(plan.tile, tile_type):
        raise ConfigError(f"{plan.describe()}: the plan's tile is a {type(plan.tile).__name__}; "
                          f"this lowering reads a {tile_type.__name__}")
    return plan.tile


@dataclass
class SpaceContext:
    program: Program
    backend: str
    sizes: dict[str, int]
    dtype: str                      # torch dtype name, e.g. "bfloat16"
    limits: DeviceLimits
    device_model: DeviceModel
    elem_bytes: int
    has_initial_state: bool = False
    return_final_state: bool = False
    varlen: bool = False

    @property
    def op_bytes(self) -> int:
        return OPERAND_BYTES.get(self.dtype, 4)

    def plan(self, lowering: str) -> Plan:
        return Plan(program=self.program, lowering=lowering, dtype=self.dtype,
                    has_initial_state=self.has_initial_state,
                    return_final_state=self.return_final_state, varlen=self.varlen)

    def fits(self, threads: int, smem: int, acc_elems_per_thread: float) -> str | None:
        """None, or why a block of this shape does not fit the device."""
        lim = self.limits
        if threads > lim.max_threads_per_block:
            return f"{threads} threads > {lim.max_threads_per_block} per block"
        if smem > lim.smem_per_block:
            return f"~{smem // 1024} KiB shared memory > {lim.smem_per_block // 1024} KiB"
        per_thread = min(lim.max_regs_per_thread, lim.regs_per_block // max(threads, 1))
        if acc_elems_per_thread > REG_FRACTION * per_thread:
            return (f"~{acc_elems_per_thread:.0f} accumulator registers per thread > "
                    f"{REG_FRACTION:.0%} of {per_thread}")
        return None


#: a backend lowering's tile space: generator(ctx) -> (default tile values, axis -> values,
#: check) where check(values, ctx) -> None or the reason the point is pruned
TileSpace = tuple[dict[str, int], dict[str, tuple[int, ...]],
                  Callable[[dict, SpaceContext], "str | None"]]
