"""Triage: chunked vs scan on the GPU, and a tile sweep of the chunked lowering at the
benchmark shapes (b*t = 32k, h=80, n=128, p=64, bf16, plain ssd with softplus)."""

import torch
import triton.testing

from ssmc.backends.triton.lowerings import chunked_launch as chunked
from ssmc.ops import linear_attention, ssd


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


torch.manual_seed(0)
for (b, t, h, n, p) in [(1, 333, 3, 32, 48)]:
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(b, t, h, p, device="cuda", dtype=dtype)
        dt = torch.randn(b, t, h, device="cuda", dtype=dtype)
        A = -torch.rand(h, device="cuda")
        B = torch.randn(b, t, 1, n, device="cuda", dtype=dtype)
        C = torch.randn(b, t, 1, n, device="cuda", dtype=dtype)
        ys = ssd(x, dt, A, B, C, dt_softplus=True, lowering="scan", backend="triton")
        yc = ssd(x, dt, A, B, C, dt_softplus=True, lowering="chunked", backend="triton")
        q = torch.randn(b, t, h, n, device="cuda", dtype=dtype)
        ls = linear_attention(q, q, x, lowering="scan", backend="triton")
        lc = linear_attention(q, q, x, lowering="chunked", backend="triton")
        print((b, t, h, n, p), dtype, "ssd", f"{rel(yc, ys):.2e}", "linattn",
              f"{rel(lc, ls):.2e}", flush=True)

orig = chunked.tiles
variants = [{}, dict(CS=128), dict(BN_state=128, BP_state=64), dict(BN_state=64, BP_state=64)]
shapes = [(8, 4096), (2, 16384), (16, 2048)]
for b, t in shapes:
    h, n, p = 80, 128, 64
    x = torch.randn(b, t, h, p, device="cuda", dtype=torch.bfloat16)
    dt = (torch.randn(b, t, h, device="cuda") * 0.5 - 1).to(torch.bfloat16)
    A = -torch.rand(h, device="cuda")
    B = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
    C = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
    ys = ssd(x, dt, A, B, C, dt_softplus=True, lowering="scan", backend="triton")
    for v in variants:
        chunked.tiles = lambda *a, _v=v: {**orig(*a), **_v}
        try:
            f = lambda: ssd(x, dt, A, B, C, dt_softplus=True, lowering="chunked", backend="triton")  # noqa: E731
            yc = f()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            print(f"b={b} t={t} {v}: {ms:.3f} ms err {rel(yc, ys):.2e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"b={b} t={t} {v}: failed {e!r}"[:300], flush=True)
            break
    chunked.tiles = orig
