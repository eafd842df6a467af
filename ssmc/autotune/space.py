"""Search spaces: which configs are worth measuring for one definition, shape, dtype and device.

A `Config` is what tuning may change in a Plan: the lowering, the tile parameters a backend
reads from `plan.tile`, and the chunk size (TVM's chunked lowering reads `plan.chunk_size`).
`search_space` enumerates the candidates per backend and lowering, then prunes:

- by legality (a chunk must hold a whole number of row blocks; `tl.dot` needs every
  dimension >= 16; blocks wider than the padded axis only waste lanes);
- by the symbolic cost model (`passes.cost`): lowerings and chunk sizes whose estimate is far
  above the best one are not measured;
- by the device's limits, read from the device (`DeviceLimits.from_device`): shared memory per
  block, registers per thread, threads per block. The resource estimates are deliberately
  rough (operand tiles times pipeline stages, fp32 accumulators spread over the threads); a
  config that passes them but still fails to compile is recorded as failed by the tuner.

The first candidate is always the default config: the cost model's lowering with the backend's
built-in tiles. It is the baseline of every speedup and the reference of the correctness check.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from ..backends import registered
from ..devices import DEVICES, DeviceLimits, DeviceModel
from ..ir import AXIS_SIZES, CHUNK, Program
from ..lowerings import choose_lowering, estimate_seconds, lowering_costs
from ..passes.cost import E
from ..plan import Plan
from ..errors import ConfigError
from ..tiles import OPERAND_BYTES, SpaceContext, TileSpace

#: a lowering whose estimate exceeds the best one by this factor is not measured
LOWERING_SLACK = 8.0
#: a chunk size whose chunked estimate exceeds the best chunk size's by this factor is dropped
CHUNK_SLACK = 3.0
# --------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class Config:
    """One point of a search space. `tile == ()` means the backend's built-in defaults."""

    lowering: str
    tile: tuple[tuple[str, int], ...] = ()
    chunk_size: int | None = None

    @staticmethod
    def make(lowering: str, tile: dict | None = None, chunk_size: int | None = None) -> "Config":
        return Config(lowering, tuple(sorted((tile or {}).items())), chunk_size)

    def tile_dict(self) -> dict[str, int]:
        return dict(self.tile)

    def label(self) -> str:
        parts = [self.lowering]
        parts += [f"{k}={v}" for k, v in self.tile]
        if self.chunk_size is not None:
            parts.append(f"chunk={self.chunk_size}")
        if len(parts) == 1:
            parts.append("(defaults)")
        return " ".join(parts)

    def apply(self, plan: Plan, backend: str) -> Plan:
        """The plan with this config, its tile typed by `backend`'s lowering (a tile parameter
        that lowering does not have is a ConfigError)."""
        changes = dict(lowering=self.lowering, tile=tile_for(backend, self.lowering, self.tile))
        if self.chunk_size is not None:
            changes["chunk_size"] = self.chunk_size
        return dataclasses.replace(plan, **changes)

    def to_json(self) -> dict:
        out = {"lowering": self.lowering, "tile": dict(self.tile)}
        if self.chunk_size is not None:
            out["chunk_size"] = self.chunk_size
        return out

    @staticmethod
    def from_json(data: dict) -> "Config":
        """Inverse of to_json; raises ValueError on anything malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("lowering"), str):
            raise ValueError(f"not a config: {data!r}")
        tile = data.get("tile", {})
        if not isinstance(tile, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in tile.items()):
            raise ValueError(f"config tile must map names to integers: {tile!r}")
        chunk = data.get("chunk_size")
        if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
            raise ValueError(f"config chunk_size must be a positive integer: {chunk!r}")
        return Config.make(data["lowering"], tile, chunk)


# --------------------------------------------------------------------------- the space

@dataclass
class Space:
    default: Config
    candidates: list[Config]                       # default first
    pruned: list[tuple[Config, str]] = field(default_factory=list)
    estimates: dict[str, float] = field(default_factory=dict)   # lowering -> seconds

    def __len__(self) -> int:
        return len(self.candidates)


def backend_lowering(backend: str, lowering: str):
    """The backend's object for a lowering (its tile type and space), or None."""
    get = getattr(registered().get(backend), "lowering", None)
    return None if get is None else get(lowering)


def tile_for(backend: str, lowering: str, tile: tuple[tuple[str, int], ...]):
    """A config's tile pairs as the typed tile of `backend`'s lowering; None for none."""
    if not tile:
        return None
    impl = backend_lowering(backend, lowering)
    tile_type = getattr(impl, "tile_type", None)
    if tile_type is None:
        raise ConfigError(f"backend {backend!r} reads no tile parameters for the {lowering!r} "
                          f"lowering; got {dict(tile)}")
    return tile_type.from_dict(dict(tile))


def tile_space(backend: str, lowering: str, ctx: SpaceContext) -> TileSpace | None:
    impl = backend_lowering(backend, lowering)
    space = getattr(impl, "tile_space", None)
    return None if space is None else space(ctx)


def chunk_estimate(ctx: SpaceContext, q: int) -> float:
    """The cost model's chunked estimate (seconds) at chunk size q."""
    cost = lowering_costs(ctx.program)["chunked"]
    values = {AXIS_SIZES[a]: int(v) for a, v in ctx.sizes.items() if a in AXIS_SIZES}
    values[CHUNK] = q
    values[E] = ctx.elem_bytes
    return estimate_seconds(cost.subs(values), ctx.device_model)


def search_space(program: Program, *, backend: str, lowerings, default_lowering: str,
                 sizes: dict[str, int], dtype: str, limits: DeviceLimits,
                 device_model: str | DeviceModel = "h100", elem_bytes: int | None = None,
                 has_initial_state: bool = False, return_final_state: bool = False,
                 varlen: bool = False, max_configs: int | None = 64) -> Space:
    """The configs to measure, default first. `lowerings` are the candidate lowerings (legal
    and implemented by `backend`); `default_lowering` is the cost model's choice."""
    dev = DEVICES[device_model] if isinstance(device_model, str) else device_model
    if elem_bytes is None:
        elem_bytes = OPERAND_BYTES.get(dtype, 4)
    ctx = SpaceContext(program, backend, dict(sizes), dtype, limits, dev, elem_bytes,
                       has_initial_state, return_final_state, varlen)
    lowerings = list(dict.fromkeys(lowerings))
    if default_lowering not in lowerings:
        lowerings.insert(0, default_lowering)
    default = Config(default_lowering)
    pruned: list[tuple[Config, str]] = []

    # the cost model ranks the lowerings; far-off ones are not worth a compile
    choice = choose_lowering(program, sizes, dev, elem_bytes, allowed=lowerings)
    est = {e.lowering: e.seconds for e in choice.estimates if e.legal}
    best = min(est.values())
    kept = []
    for lw in lowerings:
        if lw != default_lowering and est.get(lw, math.inf) > LOWERING_SLACK * best:
            pruned.append((Config(lw), f"cost model: {est[lw] / best:.1f}x the best lowering's "
                                       f"estimate (limit {LOWERING_SLACK:g}x)"))
        else:
            kept.append(lw)

    ranked: list[tuple[tuple, Config]] = []
    for lw in kept:
        space = tile_space(backend, lw, ctx)
        if space is None:  # the backend reads no tile parameters for this lowering
            if lw != default_lowering:
                ranked.append(((-1.0, 0.0, est.get(lw, 0.0) / best), Config(lw)))
            continue
        tile_default, axes, check = space
        names = list(axes)
        chunk_axis = "BT" if lw == "chunked" and "BT" in axes else (
            "chunk_size" if "chunk_size" in axes else None)
        chunk_cost = {}
        if chunk_axis is not None:
            chunk_cost = {q: chunk_estimate(ctx, q) for q in axes[chunk_axis]}
            best_q = min(chunk_cost.values())
        for point in itertools.product(*(axes[k] for k in names)):
            values = dict(zip(names, point))
            if values == {k: tile_default.get(k) for k in names}:
                continue  # the built-in tiles: that is Config(lw) itself
            cfg = _config(lw, values)
            if chunk_axis is not None and chunk_cost[values[chunk_axis]] > CHUNK_SLACK * best_q:
                pruned.append((cfg, f"cost model: chunk {values[chunk_axis]} is "
                                    f"{chunk_cost[values[chunk_axis]] / best_q:.1f}x the best "
                                    f"chunk's estimate (limit {CHUNK_SLACK:g}x)"))
                continue
            why = check(values, ctx)
            if why:
                pruned.append((cfg, why))
                continue
            distance = sum(abs(math.log2(values[k]) - math.log2(tile_default[k]))
                           for k in names if tile_default.get(k))
            ratio = chunk_cost[values[chunk_axis]] / best_q if chunk_axis else 1.0
            ranked.append(((distance, ratio, est.get(lw, 0.0) / best), cfg))
        if lw != default_lowering:  # every kept lowering is measured with its built-in tiles
            ranked.append(((-1.0, 0.0, est.get(lw, 0.0) / best), Config(lw)))
    # breadth-first around the built-in tiles, every lowering alike; then the cost model
    ranked.sort(key=lambda item: item[0])
    candidates = [default] + [cfg for _, cfg in ranked]
    if max_configs is not None and len(candidates) > max_configs:
        for cfg in candidates[max_configs:]:
            pruned.append((cfg, f"beyond max_configs={max_configs} (ranked by the cost model, "
                                "then by distance from the built-in tiles)"))
        candidates = candidates[:max_configs]
    return Space(default, candidates, pruned, est)


def _config(lowering: str, values: dict) -> Config:
    values = dict(values)
    chunk = values.pop("chunk_size", None)
    return Config.make(lowering, values, chunk)

