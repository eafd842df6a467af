"""Per-kernel device times of one ssmc call (torch.profiler), for tuning.

    python3 benchmarks/profile_kernels.py [chunked|scan|quadratic] [--train] [--user]
        [--mamba] [--shape BxT] [--bwd-tile K=V,...]

`--train` profiles forward + backward (every leaf requires grad), host-side torch ops included.
`--user` profiles a user's Mamba-2 definition (`gpu_table.user_mamba2`, A = -exp(A_log))
instead of the built-in, on the same inputs: the two must run the same kernels.
`--mamba` profiles `mamba_chunk_scan_combined` (chunk 256) on the same inputs, so a gap in a
table can be put on the kernels that make it. `--shape 2x16384` sets batch x length.
`--bwd-tile BT_bwd=64,BP_bwd=32` overrides the chunked backward's tiles (as plan.tile would).

For the chunked kernels it also prints each one's achieved GB/s and TFLOP/s and the fraction of
its roofline floor: the larger of its least bytes (every tensor it reads once, every one it
writes once; `least_work`) over the device's measured copy rate and its matmul FLOPs over the
measured rate of a large bf16 matmul, both timed in the same process.
"""
import sys

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from ssmc.ops import ssd

def option(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


b, t = map(int, option("--shape", "8x4096").split("x"))
h, n, p = 80, 128, 64
values = {option(o, None) for o in ("--shape", "--bwd-tile")}
args = [a for a in sys.argv[1:] if not a.startswith("-") and a not in values]
train = "--train" in sys.argv
if "--bwd-tile" in sys.argv:
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    pins = dict(kv.split("=") for kv in option("--bwd-tile", "").split(","))
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


if "--user" in sys.argv:
    import ssmc
    from gpu_table import user_mamba2
    user = ssmc.compile(user_mamba2, backend="triton", lowering=low)
    A_log = torch.log(-A).detach().requires_grad_(train)
    leaves[2] = A_log


def f():
    if "--mamba" in sys.argv:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=True)
    elif "--user" in sys.argv:
        y = user(x, dt, A_log, B, C, D, z, dt_bias)
    else:
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


def least_work(g=1, chunk=64):
    """{kernel: (bytes, matmul FLOPs)} per call of the chunked ssd kernels at this script's
    shape: bf16 tensors and chunk states (C * h * n * p, C = b*t / chunk), fp32 row partials."""
    tok = b * t
    X, QK, DT = tok * h * p * 2, tok * g * n * 2, tok * h * 2
    ST = tok // chunk * h * n * p * 2
    walk = (X + QK + DT + ST, 2 * tok * h * n * p)          # k^T v per chunk
    return {
        "ssmc_chunked_state_fwd": walk,   # the forward's, and the backward's recompute
        # q k^T, scores x, q S; reads x, z, B, C, dt, states; writes y
        "ssmc_chunked_out_fwd": (3 * X + 2 * QK + DT + ST,
                                 2 * tok * h * (chunk * n + chunk * p + n * p)),
        # reads dy, C, dt; writes G; (q exp(lc))^T dy
        "ssmc_chunked_bwd_dstates": (X + QK + DT + ST, 2 * tok * h * n * p),
        # q k^T, A^T dy, A x, dy x^T, q S, k G; reads x, dy, B, C, dt, S, G; writes dv, y, dl
        "ssmc_chunked_bwd_dv": (4 * X + 2 * QK + DT + 2 * ST + tok * h * 4,
                                2 * tok * h * (chunk * n + 3 * chunk * p + 2 * n * p)),
        # dy x^T, dy S^T, x G^T, dA k, dA^T q; reads dy, x, B, C, dt, S, G; writes fp32 dq, dk
        "ssmc_chunked_bwd_dqk": (2 * X + 2 * QK + DT + 2 * ST + 2 * tok * g * n * 4,
                                 2 * tok * h * (chunk * p + 2 * n * p + 2 * chunk * n)),
    }


def measured_rates():
    """(copy GB/s counting read plus write, bf16 matmul TFLOP/s) of this device."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    copy = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    mm = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return 2 * src.numel() / copy / 1e6, 2 * 8192 ** 3 / mm / 1e9


# device time per call of every kernel, largest first
events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
model = least_work() if low == "chunked" else {}
copy_gbs, mm_tflops = measured_rates()
print(f"measured: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s")
for e in events[:24]:
    if e.self_device_time_total > 0:
        ms = e.self_device_time_total / 5e3 / max(e.count / 5, 1)
        line = f"{e.self_device_time_total / 5e3:8.3f} ms {e.count / 5:5.1f}x  {e.key[:48]:48s}"
        if e.key in model:
            nbytes, flops = model[e.key]
            floor = max(nbytes / copy_gbs / 1e6, flops / mm_tflops / 1e9)
            line += (f" {nbytes / ms / 1e6:6.0f} GB/s {flops / ms / 1e9:5.1f} TFLOP/s"
                     f"  floor {floor:.3f} ms ({floor / ms:.0%})")
        print(line)
print(f"all kernels {sum(e.self_device_time_total for e in events) / 5e3:.3f} ms per call, "
      f"wall {triton.testing.do_bench(f, return_mode='median'):.3f} ms per call")
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
