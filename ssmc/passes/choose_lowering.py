"""Pick a lowering for concrete shapes on a device, and say why."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from ..ir import AXIS_SIZES, CHUNK, Program
from .classify_decay import legal_lowerings
from .cost import E, lowering_costs


@dataclass(frozen=True)
class DeviceModel:
    """The few numbers the cost model needs. Per-step latency prices the scan's serial loop."""

    name: str
    tensor_flops: float   # FLOP/s on matmuls (tensor cores)
    vector_flops: float   # FLOP/s on elementwise fp32 math
    bandwidth: float      # bytes/s of device memory
    launch_s: float       # seconds per kernel launch
    step_s: float         # seconds per dependent step of a sequential loop


# Effective rates of ssmc's own generated kernels, not the chips' peaks: fitted on the H100 to
# the built-in-tile times of all three lowerings of ssd, selective_scan and gla at t = 256 to
# 16384 (benchmarks/RESULTS.md, "Autotuning"): the chunked and quadratic matmuls reach about
# 60 TFLOP/s, the scan's elementwise work about 3 TFLOP/s, and a dependent step of the scan's
# loop costs about 1 us (its floor for short, narrow problems).
# The H200 differs in bandwidth; the A100 is scaled by its peaks.
DEVICES = {
    "h100": DeviceModel("h100", 60e12, 3e12, 3.0e12, 4e-6, 1e-6),
    "h200": DeviceModel("h200", 60e12, 3e12, 4.8e12, 4e-6, 1e-6),
    "a100": DeviceModel("a100", 25e12, 1.2e12, 1.8e12, 4e-6, 1.5e-6),
    "cpu": DeviceModel("cpu", 50e9, 50e9, 20e9, 5e-6, 2e-8),
}


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
    """Evaluate every lowering's cost at `sizes` (axis letter -> size) and take the cheapest legal one."""
    dev = DEVICES[device] if isinstance(device, str) else device
    legal = set(legal_lowerings(program))
    if allowed is not None:
        legal &= set(allowed)
    if not legal:
        raise UnsupportedError(f"{program.name}: no lowering among {sorted(allowed)} is legal for "
                               f"decay kind {program.decay_kind.value!r}")
    values = {AXIS_SIZES[a]: int(sizes[a]) for a in sizes}
    values[CHUNK] = min(chunk, max(int(sizes.get("t", chunk)), 16))
    values[E] = elem_bytes
    estimates = []
    for name, cost in lowering_costs(program).items():
        v = cost.subs(values)
        ok = name in legal
        reason = "" if ok else (
            f"not legal for decay kind {program.decay_kind.value!r}"
            if name not in legal_lowerings(program) else "excluded by the caller")
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
