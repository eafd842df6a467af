"""GPU benchmark: a cross2d op (four scan orders over an image's grid in one op) against the
best composition of ssmc's own 1-D op with permuted copies, as VMamba computes SS2D.

    python benchmarks/cross2d.py [--cases vmamba mamba2] [--batch 32] [--dtype bf16]
    python benchmarks/cross2d.py --device cpu --tiny          # a smoke check of the script
    python benchmarks/cross2d.py --cases vmamba --profile     # and kernel times per training step

Cases (issue 18): VMamba's selective scan (`ssmc.nn_vision.build_ss2d_scan`, the op of
`ssmc.nn.SS2D`: per-channel decay, per-order dt, A, B, C, dt_bias) with d=192 channels, n=16
and n=1, on 56x56 and 28x28 grids; and a Mamba-2-style definition (scalar decay per head and
order, h=8 p=64 n=64) on a 64x64 grid; b=32, inputs in `--dtype` (A, D, dt_bias in fp32).

Rows per case:
- `fused`: the cross2d op on the inputs at their grid positions (per-order inputs (b, 4, t, ..)).
- `fused, orders unpaired` (Mamba-2-style case): the same with the chunked output pass one order
  a launch, not two opposite orders a program (chunked_pairs.py): what the pairs save.
  `fused, one stream`: with every order's walks on the caller's stream, not side by side on
  streams of their own (backends/triton/streams.py; the tiles unchanged): what those save.
- `1d heads, ...`: VMamba's composition: the four orderings (row-major, column-major, and both
  reversed) stacked as extra heads, (b, t, 4h, p), B and C as 4 groups; one call of the same
  definition with direction="forward" and no `k`; the outputs un-permuted and added.
- `1d batch, ...`: the orderings stacked on the batch, (b * 4, t, h, p); per-order parameters
  repeated over the batch.
- `..., all copied`: x and every per-order input gathered into each order's sequence inside the
  timed call. `..., x copied`: only x; the per-order inputs are taken as already in each
  order's sequence (VMamba projects dt, B and C from the permuted copies of x, so it gets them
  that way at no extra cost): the cheapest composition, the fair baseline.
The copies and the merge are gathers with a position table, each the other's backward (custom
autograd functions, as VMamba's CrossScan / CrossMerge).

Columns: median ms of a forward (no grad) and of a forward + backward (gradients of every
input; the median of ROUNDS rounds that time every row in turn), peak MiB allocated above the
inputs during each (torch.cuda.max_memory_allocated), and the fused op's speed-up over the
row (row time / fused time; above 1: fused is faster), with the best composition's on the
case's summary line. Every row's output is checked against the
fused op's before timing; that first call also builds (and, with SSMC_AUTOTUNE on, tunes)
the kernels, so no timed call does. On the CPU (`--device cpu`) times are wall-clock and no
memory is reported: only a check that the script runs.
"""
from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time

import torch

import ssmc
from ssmc import dsl as S
from ssmc.backends.base import resolve_backend
from ssmc.nn_vision import default_headdim, build_ss2d_scan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ORDERS = 4
PARAMS = ("x", "dt", "A", "B", "C", "D", "dt_bias")
#: the inputs that have one slice per order (axis k) in the fused definition
PER_ORDER = ("dt", "A", "B", "C", "dt_bias")

#: axes per input: the decay kind ("full": VMamba's per-channel decay, "scalar": Mamba-2's per
#: head) and the layout ("cross2d": the fused op; "heads" / "batch": the 1-D op on stacked
#: orderings)
AXES = {
    ("full", "cross2d"): dict(x="b t h p", dt="b k t h p", A="k h p n", B="b k t n",
                              C="b k t n", D="h p", dt_bias="k h p"),
    ("full", "heads"): dict(x="b t h p", dt="b t h p", A="h p n", B="b t g n", C="b t g n",
                            D="h p", dt_bias="h p"),
    ("full", "batch"): dict(x="b t h p", dt="b t h p", A="b h p n", B="b t n", C="b t n",
                            D="b h p", dt_bias="b h p"),
    ("scalar", "cross2d"): dict(x="b t h p", dt="b k t h", A="k h", B="b k t n", C="b k t n",
                                D="h", dt_bias="k h"),
    ("scalar", "heads"): dict(x="b t h p", dt="b t h", A="h", B="b t g n", C="b t g n", D="h",
                              dt_bias="h"),
    ("scalar", "batch"): dict(x="b t h p", dt="b t h", A="b h", B="b t n", C="b t n", D="b h",
                              dt_bias="b h"),
}


def definition(kind: str, layout: str):
    """softplus(dt + dt_bias), decay exp(d A), key B, value x d, query C, plus D x; cross2d for
    the fused layout, forward for the 1-D ones. The fused full case is the SS2D layer's own."""
    if (kind, layout) == ("full", "cross2d"):
        return build_ss2d_scan()
    axes = AXES[kind, layout]
    direction = "cross2d" if layout == "cross2d" else "forward"

    def scan(x, dt, A, B, C, D, dt_bias):
        d = S.softplus(dt + dt_bias)
        y = S.recurrence(decay=S.exp(d * A), key=B, value=x * d, query=C, direction=direction)
        return y + D * x

    scan.__signature__ = inspect.Signature([
        inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[axes[p]])
        for p in PARAMS])
    return ssmc.ssm(scan, name=f"{kind}_{layout}")


# ------------------------------------------------------------------------ orders and copies

def positions(H: int, W: int, device) -> torch.Tensor:
    """(4, t): the row-major position that step s of order k visits (VMamba's order: rows,
    columns, rows reversed, columns reversed)."""
    t = torch.arange(H * W, device=device)
    cols = (t % H) * W + t // H
    return torch.stack([t, cols, t.flip(0), cols.flip(0)])


class Gather(torch.autograd.Function):
    """y = forward(x) for a permutation-like gather whose gradient is `backward(dy)`."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward = backward
        return forward(x)

    @staticmethod
    def backward(ctx, dy):
        return ctx.backward(dy.contiguous()), None, None


class Orders:
    """The copies into each order's sequence and the merge back, for an H x W grid. `stack`
    is where the order axis goes: "batch" -> (b, 4, t, ...), "heads" -> (b, t, 4, ...)."""

    def __init__(self, H: int, W: int, device):
        self.pos = positions(H, W, device)                       # (4, t)
        self.inv = self.pos.argsort(dim=1)                       # step of each position
        self.k = torch.arange(ORDERS, device=device)

    def shared(self, x, stack):
        """(b, t, ...) -> each order's sequence of it; its gradient sums the orders'."""
        pos, inv, k = self.pos, self.inv, self.k
        if stack == "batch":
            return Gather.apply(x, lambda v: v[:, pos],
                                lambda g: g[:, k[:, None], inv].sum(1))
        return Gather.apply(x, lambda v: v[:, pos.T], lambda g: g[:, inv.T, k].sum(2))

    def per_order(self, x, stack):
        """(b, 4, t, ...) -> order k's sequence of slice k."""
        pos, inv, k = self.pos, self.inv, self.k
        if stack == "batch":
            return Gather.apply(x, lambda v: v[:, k[:, None], pos],
                                lambda g: g[:, k[:, None], inv])
        return Gather.apply(x, lambda v: v[:, k, pos.T], lambda g: g[:, inv, k[:, None]])

    def merge(self, y, stack):
        """each order's output in its sequence -> their sum at the grid positions, (b, t, ...)"""
        pos, inv, k = self.pos, self.inv, self.k
        if stack == "batch":
            return Gather.apply(y, lambda v: v[:, k[:, None], inv].sum(1),
                                lambda g: g[:, pos])
        return Gather.apply(y, lambda v: v[:, inv.T, k].sum(2), lambda g: g[:, pos.T])


def one_d_inputs(v: dict, orders: Orders, stack: str, copy_per_order: bool) -> tuple:
    """The 1-D op's inputs from the fused op's (`v`). Per-order inputs with `t` are gathered
    when `copy_per_order`, else they are taken as already in each order's sequence (v holds
    them so, see `Case.pre_ordered`)."""
    b = v["x"].shape[0]
    out = {"x": orders.shared(v["x"], stack)}
    for name in ("dt", "B", "C"):
        out[name] = orders.per_order(v[name], stack) if copy_per_order else v[name]
    params = {"A": v["A"], "dt_bias": v["dt_bias"], "D": v["Ds"]}   # (4, ...) each
    if stack == "batch":   # (b, 4, t, ...) -> (4b, t, ...); parameters repeated over b
        out = {n: x.flatten(0, 1) for n, x in out.items()}
        out.update({n: p.expand(b, *p.shape).flatten(0, 1) for n, p in params.items()})
    else:                  # (b, t, 4, h, ...) -> (b, t, 4h, ...); B, C: 4 groups
        out.update({n: x.flatten(2, 3) for n, x in out.items() if n in ("x", "dt")})
        out.update({n: p.flatten(0, 1) for n, p in params.items()})
    return tuple(out[n] for n in PARAMS)


# --------------------------------------------------------------------------------- cases

class Case:
    """One shape: the fused op's inputs (per-order ones (b, 4, t, ...) at grid positions, Ds
    (4, ...) per order) and, for the `x copied` rows, the per-order inputs already in each
    order's sequence."""

    def __init__(self, name, kind, b, H, W, h, p, n, dtype, device, seed=0):
        self.name, self.kind, self.H, self.W = name, kind, H, W
        gen = torch.Generator(device=device).manual_seed(seed)
        t = H * W

        def randn(*shape, scale=1.0, dt=dtype):
            return (scale * torch.randn(*shape, generator=gen, device=device)).to(dt)
        f32 = torch.float32
        chan = (h, p) if kind == "full" else (h,)
        A_shape = (ORDERS, h, p, n) if kind == "full" else (ORDERS, h)
        # VMamba's init: A = -(1..n) per channel; softplus(dt_bias) in [0.001, 0.1]
        A = -torch.arange(1, n + 1, device=device, dtype=f32).expand(A_shape) \
            if kind == "full" else -torch.rand(A_shape, generator=gen, device=device) - 0.5
        dt0 = torch.exp(torch.rand(ORDERS, *chan, generator=gen, device=device)
                        * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        self.v = dict(x=randn(b, t, h, p), dt=randn(b, ORDERS, t, *chan, scale=0.5),
                      A=A.contiguous(), B=randn(b, ORDERS, t, n), C=randn(b, ORDERS, t, n),
                      Ds=torch.ones(ORDERS, *chan, device=device, dtype=f32),
                      dt_bias=dt0 + torch.log(-torch.expm1(-dt0)))
        self.orders = Orders(H, W, device)
        self.pre_ordered = {}
        for stack in ("batch", "heads"):
            v = dict(self.v)
            for name in ("dt", "B", "C"):
                v[name] = self.orders.per_order(self.v[name], stack).contiguous()
            self.pre_ordered[stack] = v

    def fused_args(self, v):
        return (v["x"], v["dt"], v["A"], v["B"], v["C"], v["Ds"].sum(0), v["dt_bias"])


def leaves(v: dict) -> dict:
    return {k: x.detach().requires_grad_(True) for k, x in v.items()}


def implementations(case: Case, backend: str, lowering: str) -> dict:
    """name -> fn(values) -> output (b, t, h, p), and the values it takes."""
    fused = ssmc.compile(definition(case.kind, "cross2d"), backend=backend, lowering=lowering)
    impls = {"fused": (lambda v: fused(*case.fused_args(v), grid=(case.H, case.W)), case.v,
                       fused)}
    if case.kind == "scalar":   # the chunked lowering without its pairs, without its streams
        impls[UNPAIRED] = (lambda v: unpaired(lambda: impls["fused"][0](v)), case.v, fused)
        impls[ONE_STREAM] = (lambda v: one_stream(lambda: impls["fused"][0](v)), case.v, fused)
    for stack in ("heads", "batch"):
        op = ssmc.compile(definition(case.kind, stack), backend=backend, lowering=lowering)
        for copy_all in (True, False):
            def run(v, op=op, stack=stack, copy_all=copy_all):
                y = op(*one_d_inputs(v, case.orders, stack, copy_all))
                if stack == "heads":
                    y = y.unflatten(2, (ORDERS, -1))               # (b, t, 4, h, p)
                else:
                    y = y.unflatten(0, (-1, ORDERS))               # (b, 4, t, h, p)
                return case.orders.merge(y, stack)
            label = f"1d {stack}, {'all' if copy_all else 'x'} copied"
            impls[label] = (run, case.v if copy_all else case.pre_ordered[stack], op)
    return impls


#: timing rounds, the rows interleaved in each
ROUNDS = 3

#: the fused op with its output pass one order a launch (what chunked_pairs.py saves), and
#: with every order's walks on the caller's stream (what backends/triton/streams.py saves)
UNPAIRED, ONE_STREAM = "fused, orders unpaired", "fused, one stream"


def unpaired(fn):
    """`fn()` with the chunked output pass taking one order a launch (chunked_pairs.py)."""
    from ssmc.backends.triton.lowerings import chunked_launch
    real = chunked_launch.order_groups
    chunked_launch.order_groups = lambda dirs, T, rows, pairable: real(dirs, T, rows, False)
    try:
        return fn()
    finally:
        chunked_launch.order_groups = real


def one_stream(fn):
    """`fn()` with the chunked lowering's orders' walks on the caller's stream (their tiles as
    they are: sized for the walks side by side)."""
    from ssmc.backends.triton.streams import one_stream as on_one_stream
    with on_one_stream():
        return fn()


# -------------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps: int) -> float:
    """Median over `reps` calls (CUDA events on a GPU, wall-clock on the CPU)."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device) -> float:
    """Peak memory allocated during one call, above what was allocated before it."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def measure(fn, values, device, reps: int) -> dict:
    with torch.no_grad():
        y = fn(values)
    grad = torch.randn_like(y)
    del y

    def forward():
        with torch.no_grad():
            fn(values)

    inputs = leaves(values)

    def clear_grads():
        for x in inputs.values():
            x.grad = None

    def train():
        clear_grads()
        fn(inputs).backward(grad)

    times = dict(fwd=time_ms(forward, device, reps), train=time_ms(train, device, reps))
    fwd_mib = peak_mib(forward, device)
    # the last timed step's gradients are freed before the baseline is read: freed inside the
    # measured call, they made the peak "above the baseline" negative
    clear_grads()
    return dict(times, fwd_mib=fwd_mib, train_mib=peak_mib(train, device))


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def forward_backward(fn, values, grad=None):
    """(output, gradient of each input) of one forward + backward."""
    inputs = leaves(values)
    y = fn(inputs)
    y.backward(torch.ones_like(y) if grad is None else grad)
    return y.detach(), {k: x.grad for k, x in inputs.items()}


def check(impls: dict) -> None:
    """Each row's output and gradients against the fused op's. The `x copied` rows take dt, B
    and C in each order's sequence, so only their other gradients are comparable."""
    fn, values, _ = impls["fused"]
    ref, ref_grads = forward_backward(fn, values)
    grad = torch.randn_like(ref)
    ref, ref_grads = forward_backward(fn, values, grad)
    for name, (fn, values, _) in impls.items():
        y, grads = forward_backward(fn, values, grad)
        worst = max((rel_err(g, ref_grads[k]), k) for k, g in grads.items()
                    if not (name.endswith("x copied") and k in ("dt", "B", "C")))
        print(f"  check {name}: output rel err vs fused {rel_err(y, ref):.1e}, gradients "
              f"{worst[0]:.1e} (worst: {worst[1]})", flush=True)


def run_case(case: Case, args, device) -> list[str]:
    impls = implementations(case, args.backend, args.lowering)
    fused_op = impls["fused"][2]
    with torch.no_grad():
        impls["fused"][0](case.v)
    fused_backend = resolve_backend(fused_op.backend_name, device, fused_op.last_plan).name
    print(f"\n### {case.name}  (fused: {fused_backend} {fused_op.last_plan.lowering})",
          flush=True)
    check(impls)
    # rows interleaved, ROUNDS rounds, each row's median over them: timed one row after
    # another, rows running the same kernels came out 10-20% apart in either direction
    rounds = [{name: measure(fn, values, device, args.reps)
               for name, (fn, values, _) in impls.items()} for _ in range(ROUNDS)]
    results = {name: {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]}
               for name in impls}
    fused = results["fused"]
    if args.profile and device.type == "cuda":
        best = min((k for k in results if k.startswith("1d")), key=lambda k: results[k]["train"])
        profile_training(impls, ["fused", *[k for k in (UNPAIRED, ONE_STREAM) if k in impls],
                                 best])
    rows = ["| impl | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | fused speed-up "
            "fwd | fused speed-up fwd+bwd |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        mib = ["-" if math.isnan(r[k]) else f"{r[k]:.0f}" for k in ("fwd_mib", "train_mib")]
        rows.append(f"| {name} | {r['fwd']:.3f} | {r['train']:.3f} | {mib[0]} | {mib[1]} | "
                    f"{r['fwd'] / fused['fwd']:.2f}x | {r['train'] / fused['train']:.2f}x |")
    comps = {k: r for k, r in results.items() if k.startswith("1d")}
    best_f = min(comps, key=lambda k: comps[k]["fwd"])
    best_t = min(comps, key=lambda k: comps[k]["train"])
    rows.append("")
    rows.append(f"best composition: fwd {best_f} ({comps[best_f]['fwd'] / fused['fwd']:.2f}x "
                f"of fused), fwd+bwd {best_t} "
                f"({comps[best_t]['train'] / fused['train']:.2f}x of fused)")
    return rows


def profile_training(impls: dict, names) -> None:
    """Device time per kernel of one training step of each named row: where the fused op's
    time goes against the composition's."""
    from profile_gla import kernel_launches
    steps = 3
    for name in names:
        fn, values, _ = impls[name]
        inputs = leaves(values)
        with torch.no_grad():
            grad = torch.randn_like(fn(values))

        def train(fn=fn):
            for x in inputs.values():
                x.grad = None
            fn(inputs).backward(grad)
        launches = kernel_launches(train, steps)
        per_kernel = {}
        for kname, ms in launches[:len(launches) // steps]:   # the first step's, in order
            per_kernel.setdefault(kname, []).append(ms)
        print(f"  profile {name}, one forward + backward: "
              f"{sum(ms for _, ms in launches) / steps:.3f} ms of kernels (each launch of the "
              "first step, in launch order: the orders' own times)", flush=True)
        for kname, times in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:16]:
            each = " ".join(f"{ms:.3f}" for ms in times) if len(times) > 1 else ""
            print(f"    {sum(times):8.3f} ms  x{len(times):<3d} {kname[:60]}  {each}",
                  flush=True)


def cases(args, device, dtype) -> list[Case]:
    b = args.batch
    out = []
    if args.tiny:
        grids, d, vm_n, m2 = [(3, 5), (4, 4)], 8, [4, 1], dict(h=2, p=4, n=4, H=4, W=3)
    else:
        grids, d, vm_n, m2 = [(56, 56), (28, 28)], 192, [16, 1], dict(h=8, p=64, n=64, H=64,
                                                                      W=64)
    p = args.headdim or default_headdim(d)
    if "vmamba" in args.cases:
        for H, W in grids:
            for n in vm_n:
                out.append(Case(f"VMamba selective scan d={d} (h={d // p} p={p}) n={n}, "
                                f"{H}x{W}, b={b}, {args.dtype}", "full", b, H, W, d // p, p,
                                n, dtype, device))
    if "mamba2" in args.cases:
        out.append(Case(f"Mamba-2-style h={m2['h']} p={m2['p']} n={m2['n']}, "
                        f"{m2['H']}x{m2['W']}, b={b}, {args.dtype}", "scalar", b, m2["H"],
                        m2["W"], m2["h"], m2["p"], m2["n"], dtype, device))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=("vmamba", "mamba2"),
                        default=["vmamba", "mamba2"])
    parser.add_argument("--batch", type=int, default=None, help="default 32 (2 with --tiny)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--headdim", type=int, default=None,
                        help="channels per head of the VMamba cases (default: SS2D's)")
    parser.add_argument("--backend", default=None,
                        help="ssmc backend of every op (default triton on a GPU, auto on the CPU)")
    parser.add_argument("--lowering", default="auto")
    parser.add_argument("--reps", type=int, default=None, help="default 20 (3 with --tiny)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--profile", action="store_true",
                        help="also print the device time per kernel of one training step of "
                             "the fused op and the best composition (torch.profiler)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes (b=2, grids of a few positions): a smoke check")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/cross2d.py needs a CUDA GPU (or --device cpu --tiny)")
    device = torch.device(args.device)
    args.batch = args.batch or (2 if args.tiny else 32)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.backend = args.backend or ("triton" if device.type == "cuda" else "auto")
    args.reps = args.reps or (3 if args.tiny else 20)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}  torch {torch.__version__}  ssmc {ssmc.__version__}  backend {args.backend} "
          f"lowering {args.lowering}")
    for case in cases(args, device, DTYPES[args.dtype]):
        print("\n".join(run_case(case, args, device)), flush=True)


if __name__ == "__main__":
    main()
