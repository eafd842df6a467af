"""GPU benchmark: one Mamba-2 decode step (h=80, p=64, n=128, one group, D, z, dt_bias, softplus)
by ssmc against mamba_ssm's `selective_state_update` and FLA's `fused_recurrent_simple_gla` (one
token), on the same inputs, eager and replayed from a CUDA graph.

    python benchmarks/decode.py [--batch 1 8 64 256] [--state fp32 bf16] [--dtype bf16]

Rows: `ssmc op.step` (the SSD definition's step, state (b, h, n, p)); `ssmc op.step nT` (the
same on a (b, h, n, p) view of (b, h, p, n) memory, `ssmc.nn.decode_state`); `ssmc shim` (ssmc.compat's
selective_state_update on mamba_ssm's (b, h, p, n) state and its tied per-head arguments, as
mamba_ssm's Mamba2.step passes them); `mamba_ssm` and `fla` where importable (FLA keeps its state
in fp32 and returns a new final state, so it runs in the fp32 rows only; its gate is the
log-decay dt * A, computed outside the timed call). Each time is the median over `--reps` runs
of `--iters` back-to-back calls, per call. GB/s counts the bytes a step must move: the state
read and written once, the inputs read and the output written once. `of copy` is that rate as a
fraction of the measured device copy bandwidth (a large tensor copy, read plus write), the floor
a memory-bound step can reach; `vs mamba_ssm` is mamba_ssm's time over the row's time in the
same mode (above 1: faster). Every row's output and new state are checked against mamba_ssm's
(or, without it, against ssmc's op.step) before timing.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics

import torch
import torch.nn.functional as F

from ssmc.api import compiled_variant
from ssmc.compat.mamba_ssm import selective_state_update as shim_update
from ssmc.ops.ssd import build as ssd_build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
H, P, N, G = 80, 64, 128, 1


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in GB/s (bytes read plus bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=5, reps=reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def time_ms(fn, iters: int, reps: int) -> float:
    """Median over `reps` of the time per call of `iters` back-to-back calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream), as a replay call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Case:
    """One batch size and state dtype: the inputs of a Mamba-2 decode step and each library's
    view of them (the same values)."""

    def __init__(self, b: int, state_dtype: torch.dtype, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator(device="cuda").manual_seed(seed)

        def r(*shape, scale=1.0, dt=dtype):
            return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dt)
        self.b, self.state_dtype, self.dtype = b, state_dtype, dtype
        self.x, self.z = r(b, H, P), r(b, H, P)
        self.dt = r(b, H, scale=0.5)
        self.B, self.C = r(b, G, N), r(b, G, N)
        self.A = -torch.rand(H, generator=gen, device="cuda") - 0.5
        self.D = r(H, dt=torch.float32)
        self.dt_bias = r(H, scale=0.3, dt=torch.float32)
        state = r(b, H, P, N, scale=0.1, dt=torch.float32)
        self.state_pn = state.to(state_dtype)                         # mamba_ssm's (b, h, p, n)
        self.state_np = state.transpose(-1, -2).contiguous().to(state_dtype)   # ssmc's

    def bytes_moved(self) -> int:
        es, ins = self.state_pn.element_size(), self.x.element_size()
        state = self.b * H * P * N * es * 2
        inputs = (3 * self.b * H * P + 2 * self.b * G * N + self.b * H) * ins  # x z out, B C, dt
        return state + inputs + 3 * H * 4                                     # A D dt_bias

    def tied(self):
        """mamba_ssm's Mamba2.step arguments: per-head values repeated by expand."""
        return dict(x=self.x, dt=self.dt[..., None].expand(self.b, H, P),
                    A=self.A[:, None, None].expand(H, P, N), B=self.B, C=self.C,
                    D=self.D[:, None].expand(H, P), z=self.z,
                    dt_bias=self.dt_bias[:, None].expand(H, P), dt_softplus=True)


def implementations(case: Case):
    """name -> (step function on fresh state copies, (output, state in (b, h, p, n)) getter)."""
    impls = {}
    op = compiled_variant(ssd_build, tuple(sorted(dict(
        has_D=True, D_per_channel=False, has_z=True, has_dt_bias=True, dt_softplus=True,
        dt_min=0.0, dt_max=float("inf")).items())), "triton", "auto")
    s_np = case.state_np.clone()
    args = (case.x, case.dt, case.A, case.B, case.C, case.D, case.z, case.dt_bias)
    impls["ssmc op.step"] = (lambda: op.step(s_np, *args), lambda: s_np.transpose(-1, -2))
    # the same step on the state the layers allocate (ssmc.nn.decode_state: n contiguous)
    s_nt = case.state_pn.clone().transpose(-1, -2)
    impls["ssmc op.step nT"] = (lambda: op.step(s_nt, *args), lambda: s_nt.transpose(-1, -2))
    s_shim = case.state_pn.clone()
    tied = case.tied()
    impls["ssmc shim"] = (lambda: shim_update(s_shim, **tied, backend="triton"),
                          lambda: s_shim)
    if importlib.util.find_spec("mamba_ssm") is not None:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        s_ref = case.state_pn.clone()
        impls["mamba_ssm"] = (lambda: selective_state_update(s_ref, **tied), lambda: s_ref)
    if importlib.util.find_spec("fla") is not None and case.state_dtype == torch.float32:
        impls["fla"] = fla_step(case)
    return impls


def fla_step(case: Case):
    """FLA's one-token simple GLA on the same step: q=C, k=B, v=x*dt, g=dt*A (log-decay); the
    D skip and the z gate are outside FLA's kernel, so they are left out of its timed call."""
    from fla.ops.simple_gla import fused_recurrent_simple_gla
    dt = F.softplus(case.dt.float() + case.dt_bias)                   # (b, h)
    rep = H // G
    q = case.C.repeat_interleave(rep, 1)[:, None]                     # (b, 1, h, n)
    k = case.B.repeat_interleave(rep, 1)[:, None]
    v = (case.x * dt[..., None]).to(case.dtype)[:, None]              # (b, 1, h, p)
    g = (dt * case.A)[:, None]                                        # (b, 1, h)
    state = case.state_np.float().clone()
    holder = {}

    def call():
        try:
            o, final = fused_recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=state,
                                                  output_final_state=True, head_first=False)
        except TypeError:  # FLA versions without head_first are time-major already
            o, final = fused_recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=state,
                                                  output_final_state=True)
        holder["final"] = final
        return o
    return call, lambda: holder["final"].transpose(-1, -2)


def check(case: Case) -> None:
    """One step of every implementation from the same state; outputs and states compared with
    the first available reference (mamba_ssm, else ssmc's op.step). FLA's output leaves out D
    and z, so only its state is compared."""
    impls = implementations(case)
    ref_name = "mamba_ssm" if "mamba_ssm" in impls else "ssmc op.step"
    results = {name: (fn(), get().float().clone()) for name, (fn, get) in impls.items()}
    ref_y, ref_state = results[ref_name]
    for name, (y, state) in results.items():
        err = (state - ref_state).norm() / ref_state.norm()
        line = f"  check b={case.b} {name}: state rel err {err:.2e}"
        if name != "fla":
            yerr = (y.float().reshape(ref_y.shape) - ref_y.float()).norm() / ref_y.float().norm()
            line += f", output rel err {yerr:.2e}"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--state", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="input dtype")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  device copy "
          f"{copy_bw:.0f} GB/s  h={H} p={P} n={N} g={G} inputs {args.dtype}")
    header = (f"{'impl':15} {'state':5} {'b':>4} {'mode':6} {'us':>9} {'GB/s':>7} "
              f"{'of copy':>7} {'vs mamba_ssm':>12}")
    rows = []
    for state_name in args.state:
        for b in args.batch:
            case = Case(b, DTYPES[state_name], DTYPES[args.dtype])
            check(case)
            impls = implementations(case)
            times = {}
            for name, (fn, _) in impls.items():
                times[(name, "eager")] = time_ms(fn, args.iters, args.reps)
                times[(name, "graph")] = time_ms(graphed(fn), args.iters, args.reps)
            for (name, mode), ms in times.items():
                gbs = case.bytes_moved() / (ms * 1e-3) / 1e9
                base = times.get(("mamba_ssm", mode))
                ratio = f"{base / ms:.2f}x" if base is not None else "-"
                rows.append(f"{name:15} {state_name:5} {b:>4} {mode:6} {ms * 1e3:>9.1f} "
                            f"{gbs:>7.0f} {gbs / copy_bw:>7.0%} {ratio:>12}")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
