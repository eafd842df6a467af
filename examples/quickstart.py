"""ssmc quickstart: write Mamba-2 in the ssmc language, compile it, run it, check it.

Runs in a few seconds on a CPU (on CUDA when a GPU is present):

    python examples/quickstart.py
"""
import time

import torch

import ssmc
from ssmc import dsl as S
from ssmc.backends import resolve_backend


@ssmc.ssm
def mamba2(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"],
           B: S.In["b t g n"], C: S.In["b t g n"], D: S.In["h"], z: S.In["b t h p"]):
    dt = S.softplus(dt)
    y = S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C)
    return (y + D * x) * S.silu(z)


def random_inputs(b, t, h, g, n, p, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(
        x=randn(b, t, h, p),
        dt=randn(b, t, h) - 1.0,                         # softplus(dt) around 0.3
        A=-torch.exp(randn(h)),                          # negative: exp(dt * A) in (0, 1)
        B=randn(b, t, g, n),
        C=randn(b, t, g, n),
        D=randn(h),
        z=randn(b, t, h, p),
    )


def max_error(out, ref):
    return (out.double() - ref.double()).abs().max().item()


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(b=2, t=64, h=4, g=2, n=16, p=8)
    inputs = random_inputs(**sizes, device=device)

    op = ssmc.compile(mamba2)  # backend="auto", lowering="auto"
    start = time.perf_counter()
    y = op(**inputs)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    y = op(**inputs)
    again_s = time.perf_counter() - start

    plan = op.last_plan
    backend = resolve_backend(op.backend_name, device, plan).name
    # The float64 sequential reference, on the same inputs.
    ref, _ = ssmc.reference.scan(mamba2.program, {k: v.double() for k, v in inputs.items()},
                                 sizes)
    err = max_error(y, ref)

    print(f"ssmc {ssmc.__version__}: {mamba2.name} on {device}")
    print("inputs: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in inputs.items()))
    print(f"output y: {tuple(y.shape)} {y.dtype}")
    print(f"backend: {backend}   lowering: {plan.lowering}   plan: {plan.describe()}")
    print(f"max |y - reference| = {err:.2e}   first call {first_s * 1e3:.1f} ms "
          f"(loads the backend, builds or loads the kernel), second call {again_s * 1e3:.1f} ms")

    # Carry a state across two halves of the sequence: the result equals one long call.
    half = sizes["t"] // 2
    first = {k: v[:, :half] if v.dim() > 1 else v for k, v in inputs.items()}
    second = {k: v[:, half:] if v.dim() > 1 else v for k, v in inputs.items()}
    y1, h1 = op(**first, return_final_state=True)
    y2, h2 = op(**second, initial_state=h1, return_final_state=True)
    split_err = max_error(torch.cat([y1, y2], 1), ref)
    print(f"final state: {tuple(h2.shape)} {h2.dtype} = (b, h, n, p); two halves chained "
          f"through initial_state: max |y - reference| = {split_err:.2e}")

    # The hidden attention matrix M (y = M value, before the epilogue), in float64.
    M = ssmc.attention_matrix(op, **inputs)
    print(f"attention matrix: {tuple(M.shape)} = (b, h, t, t), lower-triangular: "
          f"{bool(torch.equal(M, M.tril()))}")

    print("why this lowering: ssmc explain examples/quickstart.py:mamba2 --shape "
          + ",".join(f"{k}={v}" for k, v in sizes.items())
          + f" --device {'cpu' if device.type == 'cpu' else 'h100'} --dtype fp32")

    tol = 1e-4 if y.dtype == torch.float32 else 5e-2
    if err > tol or split_err > tol:
        raise SystemExit(f"quickstart: error {max(err, split_err):.2e} exceeds {tol:.0e}")


if __name__ == "__main__":
    main()
