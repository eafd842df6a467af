"""Per-kernel device times of one ssmc call (torch.profiler), for tuning."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ssmc.ops import ssd

b, t, h, n, p = 8, 4096, 80, 128, 64
low = sys.argv[1] if len(sys.argv) > 1 else "chunked"
x = torch.randn(b, t, h, p, device="cuda", dtype=torch.bfloat16)
dt = (torch.randn(b, t, h, device="cuda") * 0.5 - 1).to(torch.bfloat16)
A = -torch.rand(h, device="cuda")
B = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
C = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
D = torch.randn(h, device="cuda")
z = torch.randn_like(x)
f = lambda: ssd(x, dt, A, B, C, D=D, z=z, dt_softplus=True, lowering=low, backend="triton")  # noqa: E731
for _ in range(3):
    f()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        f()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


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
