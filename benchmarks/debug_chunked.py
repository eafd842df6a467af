"""Triage: chunked vs scan on the GPU across dtypes, shapes and tile sizes."""
import torch
import ssmc
from ssmc.ops import ssd, linear_attention

def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()

torch.manual_seed(0)
for (b, t, h, n, p) in [(2, 1024, 8, 128, 64)]:
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
        print((b, t, h, n, p), dtype, "ssd", rel(yc, ys), "nan" if yc.isnan().any() else "",
              "linattn", rel(lc, ls), "nan" if lc.isnan().any() else "")

# tile sweep at the benchmark shape: correctness vs scan and time
import triton.testing
from ssmc.backends.triton.lowerings import chunked
orig = chunked.tiles
b, t, h, n, p = 8, 4096, 80, 128, 64
x = torch.randn(b, t, h, p, device="cuda", dtype=torch.bfloat16)
dt = (torch.randn(b, t, h, device="cuda") * 0.5 - 1).to(torch.bfloat16)
A = -torch.rand(h, device="cuda")
B = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
C = torch.randn(b, t, 1, n, device="cuda", dtype=torch.bfloat16)
ys = ssd(x, dt, A, B, C, dt_softplus=True, lowering="scan", backend="triton")
base = dict(BT=64, BN=128, BP_state=64, BP_out=64, warps_state=4, warps_out=4,
            stages_state=2, stages_out=2)
variants = [{}, dict(BP_state=32), dict(warps_out=8), dict(stages_out=3), dict(stages_state=3),
            dict(BP_out=32), dict(BT=128, warps_out=8), dict(warps_state=8),
            dict(BT=128, warps_out=8, BP_out=32)]
for v in variants:
    cfg = dict(base, **v)
    chunked.tiles = lambda plan, sizes, n_programs, _c=cfg: dict(_c)
    try:
        f = lambda: ssd(x, dt, A, B, C, dt_softplus=True, lowering="chunked", backend="triton")
        yc = f()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
        print(f"{v}: {ms:.3f} ms err {rel(yc, ys):.2e}", flush=True)
    except Exception as e:
        print(f"{v}: failed {e!r}"[:200], flush=True)
        break
chunked.tiles = orig
