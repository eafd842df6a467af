"""The device model: the few numbers the cost model needs per device, and which one a torch
device is."""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceModel:
    """Per-step latency prices the scan's serial loop."""

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

#: the model an unknown GPU is planned for
FALLBACK_GPU = "h100"


def gpu_model(device) -> str | None:
    """The known GPU model (`h100`, `h200`, ...) a CUDA device is, or None (unknown, or not a
    GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((key for key in DEVICES if key != "cpu" and key in name), None)


def device_model(device) -> str:
    """The model to plan for on `device`: its GPU model, an H100 for an unknown GPU, or cpu."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return gpu_model(device) or FALLBACK_GPU


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
        device = torch.device(device)
        if device.type != "cuda":
            return DeviceLimits.unlimited(f"cpu-{platform.machine() or 'unknown'}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        smem = (getattr(props, "shared_memory_per_block_optin", 0)
                or getattr(props, "shared_memory_per_block", 0))
        regs_sm = getattr(props, "regs_per_multiprocessor", 0)
        max_regs = 0
        try:  # triton (optional) asks the driver directly (CU_DEVICE_ATTRIBUTE_*)
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
