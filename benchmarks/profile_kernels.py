"""Per-kernel device times of one ssmc call (torch.profiler), for tuning.

    python3 benchmarks/profile_kernels.py [chunked|scan|quadratic] [--train] [--bwd-tile K=V,...]

`--train` profiles forward + backward (every leaf requires grad), host-side torch ops included.
`--bwd-tile BT_bwd=64,BP_bwd=32` overrides the chunked backward's tiles (as plan.tile would).
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ssmc.ops import ssd

b, t, h, n, p = 8, 4096, 80, 128, 64
args = [a for a in sys.argv[1:] if not a.startswith("-") and "=" not in a]
train = "--train" in sys.argv
if "--bwd-tile" in sys.argv:
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    pins = dict(kv.split("=") for kv in sys.argv[sys.argv.index("--bwd-tile") + 1].split(","))
    default_tiles = chunked_bwd_launch.tiles
    chunked_bwd_launch.tiles = lambda *a: dict(
        default_tiles(*a), **{k.removesuffix("_bwd"): int(v) for k, v in pins.items()})
low = args[0] if args else "chunked"
x = torch.randn(b, t, h, p, device="cuda", dtype=torch.bfloat16)
dt = (torch.randn(b, t, h, device="cuda") * 0.5 - 1).to(torch.bfloat16)
A = -torch.rand(h, device="cuda")
B = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
C = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
D = torch.randn(h, device="cuda")
z = torch.randn_like(x)
dt_bias = torch.randn(h, device="cuda") * 0.3
leaves = [v.requires_grad_(train) for v in (x, dt, A, B, C, D, z, dt_bias)]
grad = torch.randn_like(x)


def f():
    y = ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, lowering=low,
            backend="triton")
    return torch.autograd.grad(y, leaves, grad) if train else y


for _ in range(3):
    f()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
with profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if train else [])) \
        as prof:
    for _ in range(5):
        f()
    torch.cuda.synchronize()
# device time per call of every kernel, largest first
events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
for e in events[:24]:
    if e.self_device_time_total > 0:
        print(f"{e.self_device_time_total / 5e3:8.3f} ms {e.count / 5:5.1f}x  {e.key[:80]}")
print(f"all kernels {sum(e.self_device_time_total for e in events) / 5e3:.3f} ms per call")
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def kernel_resources():
    """Registers and spills of every compiled ssmc kernel in this process."""
    for name, mod in list(sys.modules.items()):
        if not name.startswith("ssmc_triton_"):
            continue
        for attr in dir(mod):
            jf = getattr(mod, attr)
            caches = getattr(jf, "device_caches", None)
            if not caches:
                continue
            for dev_cache in caches.values():
                kernels = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for k in kernels.values():
                    print(attr, "regs", getattr(k, "n_regs", "?"), "spills",
                          getattr(k, "n_spills", "?"), "shared", getattr(k, "shared", "?"),
                          "warps", getattr(getattr(k, "metadata", None), "num_warps", "?"))


kernel_resources()
