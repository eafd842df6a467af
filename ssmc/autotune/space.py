"""Search spaces: which configs are worth measuring for one definition, shape, dtype and device.

A `Config` is what tuning may change in a Plan: the lowering, the tile parameters a backend
reads from `plan.tile`, and the chunk size (TVM's chunked lowering reads `plan.chunk_size`).
`search_space` enumerates the candidates per backend and lowering, then prunes:

- by legality (a per-key decay overflows in chunks longer than 16 steps; `tl.dot` needs every
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

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

from ..ir import AXIS_SIZES, CHUNK, Program
from ..passes import DEVICES, DeviceModel, choose_lowering, lowering_costs
from ..passes.choose_lowering import estimate_seconds
from ..passes.cost import E
from ..plan import Plan

#: bytes of one matmul operand element per plan dtype (fp32 dots run in IEEE fp32)
OPERAND_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
ACC_BYTES = 4

#: a lowering whose estimate exceeds the best one by this factor is not measured
LOWERING_SLACK = 8.0
#: a chunk size whose chunked estimate exceeds the best chunk size's by this factor is dropped
CHUNK_SLACK = 3.0
#: fraction of a thread's registers that fp32 accumulators may take before we call it a spill
REG_FRACTION = 0.75


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


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

    def apply(self, plan: Plan) -> Plan:
        import dataclasses
        changes = dict(lowering=self.lowering, tile=self.tile)
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


# --------------------------------------------------------------------------- device limits

@dataclass(frozen=True)
class DeviceLimits:
    """What a block may use on the device. Read from the device, never assumed."""

    name: str
    capability: tuple[int, int] = (0, 0)
    sm_count: int = 1
    smem_per_block: int = 1 << 62        # bytes, the opt-in maximum
    regs_per_block: int = 1 << 62
    max_regs_per_thread: int = 1 << 30
    max_threads_per_block: int = 1 << 30
    l2_bytes: int = 0
    warp_size: int = 32

    @staticmethod
    def unlimited(name: str = "cpu", l2_bytes: int = 0) -> "DeviceLimits":
        return DeviceLimits(name=name, l2_bytes=l2_bytes)

    @staticmethod
    def from_device(device) -> "DeviceLimits":
        """The limits of a torch device. CUDA: torch's device properties, completed by Triton's
        driver query where torch lacks a field. Other devices: no limits."""
        import torch
        device = torch.device(device)
        if device.type != "cuda":
            import platform
            return DeviceLimits.unlimited(f"cpu-{platform.machine() or 'unknown'}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        smem = (getattr(props, "shared_memory_per_block_optin", 0)
                or getattr(props, "shared_memory_per_block", 0))
        regs_sm = getattr(props, "regs_per_multiprocessor", 0)
        max_regs = 0
        try:  # triton asks the driver directly (CU_DEVICE_ATTRIBUTE_*)
            import triton
            tprops = triton.runtime.driver.active.utils.get_device_properties(index)
            smem = smem or tprops.get("max_shared_mem", 0)
            max_regs = tprops.get("max_num_regs", 0)
        except Exception:  # noqa: BLE001 - a missing field only loosens the pruning
            pass
        return DeviceLimits(
            name=props.name,
            capability=(props.major, props.minor),
            sm_count=props.multi_processor_count,
            smem_per_block=smem or (1 << 62),
            regs_per_block=max_regs or regs_sm or (1 << 62),
            # 255 is the ISA's limit on every architecture ssmc targets (sm70 .. sm100)
            max_regs_per_thread=255,
            max_threads_per_block=getattr(props, "max_threads_per_block", 0) or 1024,
            l2_bytes=getattr(props, "L2_cache_size", 0),
            warp_size=getattr(props, "warp_size", 32) or 32,
        )


# --------------------------------------------------------------------------- the space

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


@dataclass
class Space:
    default: Config
    candidates: list[Config]                       # default first
    pruned: list[tuple[Config, str]] = field(default_factory=list)
    estimates: dict[str, float] = field(default_factory=dict)   # lowering -> seconds

    def __len__(self) -> int:
        return len(self.candidates)


#: (backend, lowering) -> generator(ctx) -> (default tile values, axis -> values, check)
#: check(values, ctx) -> None or the reason the point is pruned
TileSpace = tuple[dict[str, int], dict[str, tuple[int, ...]], Callable[[dict, SpaceContext], "str | None"]]
SPACES: dict[tuple[str, str], Callable[[SpaceContext], TileSpace]] = {}


def register_space(backend: str, lowering: str):
    def deco(fn):
        SPACES[(backend, lowering)] = fn
        return fn
    return deco


def _pow2_upto(lo: int, hi: int) -> tuple[int, ...]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return tuple(out)


def _per_key_decay(program: Program) -> bool:
    ld = program.log_decay
    return ld is not None and "n" in ld.axes


def chunk_estimate(ctx: SpaceContext, q: int) -> float:
    """The cost model's chunked estimate (seconds) at chunk size q."""
    cost = lowering_costs(ctx.program)["chunked"]
    values = {AXIS_SIZES[a]: int(v) for a, v in ctx.sizes.items()}
    values[CHUNK] = q
    values[E] = ctx.elem_bytes
    return estimate_seconds(cost.subs(values), ctx.device_model)


@register_space("triton", "chunked")
def _triton_chunked(ctx: SpaceContext) -> TileSpace:
    from ..backends.triton.lowerings.chunked import tiles
    N, P, T = ctx.sizes["n"], ctx.sizes["p"], ctx.sizes["t"]
    n_programs = ctx.sizes.get("b", 1) * ctx.sizes["h"]
    default = tiles(ctx.plan("chunked"), ctx.sizes, n_programs)
    BN = default["BN"]
    BPmax = max(next_pow2(P), 16)
    per_key = _per_key_decay(ctx.program)
    axes = {
        # per-key decays factor exp(L_t - L_s) and overflow beyond 16-step chunks
        "BT": (16,) if per_key else _pow2_upto(16, min(128, max(next_pow2(T), 16))),
        "BP_state": _pow2_upto(16, min(64, BPmax)),
        "BP_out": _pow2_upto(16, min(128, BPmax)),
        "warps_state": (2, 4, 8),
        "warps_out": (4, 8),
        "stages_state": (1, 2, 3, 4),
    }
    # the output pass has no pipelined loop: its stages change nothing, so they stay default
    default = {k: v for k, v in default.items() if k in axes}
    ob = ctx.op_bytes

    def check(v, ctx):
        # the sequential state pass: an n x BP_state fp32 state, pipelined key/value chunk loads
        threads = 32 * v["warps_state"]
        smem = v["stages_state"] * (BN * v["BT"] + v["BT"] * v["BP_state"]) * ob
        why = ctx.fits(threads, smem, BN * v["BP_state"] / threads)
        if why:
            return f"state pass: {why}"
        # measured on an H200 (Triton 3.6; ssd bf16, n=128, BT=64): the output pass with 8 warps
        # over a 32-channel p-block faulted with an illegal memory access, which loses the
        # process's device context; 16 channels were not tried
        if v["warps_out"] == 8 and v["BP_out"] < 64:
            return "output pass: 8 warps over fewer than 64 value channels (faulted on an H200)"
        # the output pass: q, k^T, v and the entering state as operands; scores and y in fp32
        threads = 32 * v["warps_out"]
        smem = (2 * v["BT"] * BN + v["BT"] * v["BP_out"] + BN * v["BP_out"]) * ob
        why = ctx.fits(threads, smem, (v["BT"] * v["BT"] + v["BT"] * v["BP_out"]) / threads)
        return f"output pass: {why}" if why else None

    return default, axes, check


@register_space("triton", "scan")
def _triton_scan(ctx: SpaceContext) -> TileSpace:
    from ..backends.triton.lowerings.scan import block_sizes
    N, P = ctx.sizes["n"], ctx.sizes["p"]
    BN, BP = block_sizes(N, P)
    axes = {"BP": _pow2_upto(2, min(64, max(next_pow2(P), 2))), "num_warps": (1, 2, 4, 8)}
    default = {"BP": BP, "num_warps": 4}

    def check(v, ctx):
        threads = 32 * v["num_warps"]
        # the n x BP state and the per-step operand tiles live in registers
        return ctx.fits(threads, 0, 3 * BN * v["BP"] / threads)

    return default, axes, check


@register_space("triton", "quadratic")
def _triton_quadratic(ctx: SpaceContext) -> TileSpace:
    from ..backends.triton.lowerings.quadratic import block_sizes
    N, P, T = ctx.sizes["n"], ctx.sizes["p"], ctx.sizes["t"]
    default = block_sizes(ctx.plan("quadratic"), N, P)
    BN = max(next_pow2(N), 16)
    wide = {"float32": 128, "float64": 64}.get(ctx.dtype, 256)
    diagonal = _per_key_decay(ctx.program)
    axes = {
        "BT": _pow2_upto(16, min(128, max(next_pow2(T), 16))),
        "BNC": _pow2_upto(16, min(BN, wide)),
        "BP": _pow2_upto(16, min(128, max(next_pow2(P), 16))),
        "num_warps": (4, 8),
    }
    default = {k: v for k, v in default.items() if k in axes}
    ob = ctx.op_bytes

    def check(v, ctx):
        threads = 32 * v["num_warps"]
        bcast = v["BT"] * v["BT"] * v["BNC"] if diagonal else 0
        if bcast > 16384:  # the exact per-key decay broadcast lives in registers
            return f"(BT, BT, BNC) broadcast of {bcast} elements > 16384"
        smem = 3 * (2 * v["BT"] * v["BNC"] + v["BT"] * v["BP"]) * ob
        acc = (v["BT"] * v["BT"] + v["BT"] * v["BP"] + bcast) / threads
        return ctx.fits(threads, smem, acc)

    return default, axes, check


@register_space("tvm", "chunked")
def _tvm_chunked(ctx: SpaceContext) -> TileSpace:
    T = ctx.sizes["t"]
    axes = {"chunk_size": _pow2_upto(16, min(128, max(next_pow2(T), 16)))}
    return {"chunk_size": ctx.plan("chunked").chunk_size}, axes, lambda v, ctx: None


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
        gen = SPACES.get((backend, lw))
        if gen is None:  # the backend reads no tile parameters for this lowering
            if lw != default_lowering:
                ranked.append(((-1.0, 0.0, est.get(lw, 0.0) / best), Config(lw)))
            continue
        tile_default, axes, check = gen(ctx)
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

