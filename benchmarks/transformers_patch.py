"""GPU benchmark: a Hugging Face transformers Mamba2 (or Mamba) model, unpatched against patched
with `ssmc.integrations.transformers.patch`, on the same random weights.

    python benchmarks/transformers_patch.py [--kind mamba2|mamba|both] [--dtype bf16]

The model is randomly initialised from a config of the size of state-spaces/mamba2-130m
(hidden 768, 24 layers, state 128, head dim 64; Mamba: mamba-130m), so nothing is downloaded;
`--layers` and `--hidden` shrink or grow it. The header says which kernels the unpatched model
can use: transformers picks mamba_ssm / causal_conv1d (or their hub kernels) when they are
importable on CUDA, else its PyTorch path.

First, an error check on a smaller model of the same config (`--check-layers`, default 4;
b=1, t=`--check-seqlen`, default 512): the relative RMS error of the hidden states after some
layers and of the logits against the *unpatched model in fp32 on the CPU* (transformers'
PyTorch path: no mamba_ssm, no TF32), for the unpatched and the patched model in `--dtype`,
the patched model in fp32 (TF32 off), and patched against unpatched in `--dtype`. It tells
rounding from a mismatch. Rounding: the patched model's bf16 error is the unpatched one's
(~1e-2 for one layer), the patched fp32 error is ~1e-6 for one layer, and both grow with
depth alike, a random model amplifying them (~40-60x over 24 layers: logits ~0.35 off in bf16,
patched against unpatched bf16 ~0.15-0.25, patched fp32 ~4e-5). A mismatch: a patched fp32
error far above 1e-4 at a few layers, or a patched bf16 error well above the unpatched one.

Then one table, a row printed as soon as it is measured: medians of at most `--reps` calls
(in ms, and generation in tokens/s; speed-up = unpatched time / patched time), a measurement
starting no timed call after `--max-s` seconds of them. The first call (kernel builds, Triton
compiles and autotuning, of mamba_ssm and of ssmc) and one warm-up call are outside the timed
calls; the first call's seconds are the last column. ssmc runs with `SSMC_AUTOTUNE` from the
environment, else `cached` (configs `ssmc tune` stored, never measuring; `--autotune full`
tunes each new shape on its first call, up to 2 minutes each). Generation is greedy
(`--new-tokens`, default 32); its row says how many generated tokens agree (greedy decoding
in bf16 may part ways after a near-tie).

The defaults (`--kind mamba2`, the 4-layer check, 32 new tokens, `--max-s 3`) are sized for
about a minute on one GPU, most of it first calls. `--kind mamba` without mamba_ssm's CUDA
extension runs transformers' sequential PyTorch scan: `--max-s` bounds its timed calls, not
its first ones.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import ssmc
from ssmc.integrations.transformers import patch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: the packages transformers takes an unpatched model's fast path from
FAST_PATH = ("mamba_ssm", "causal_conv1d", "kernels")
HEAD = ["model", "what", "shape", "unpatched", "patched", "unit", "speed-up", "first call s"]
WIDTHS = [6, 34, 30, 9, 9, 5, 8, 12]


def build(kind: str, args, layers: int, device, dtype):
    import transformers
    if kind == "mamba2":
        config = transformers.Mamba2Config(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=layers,
            state_size=128, head_dim=64, num_heads=2 * args.hidden // 64, n_groups=1, expand=2,
            conv_kernel=4, chunk_size=256)
        model = transformers.Mamba2ForCausalLM(config)
    else:
        config = transformers.MambaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=layers,
            state_size=16, expand=2, conv_kernel=4, time_step_rank=args.hidden // 16)
        model = transformers.MambaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, reps: int, max_s: float) -> tuple[float, float]:
    """(seconds of the first call, median ms of the timed calls). After the first call and one
    warm-up, at most `reps` calls are timed, none started once `max_s` seconds are spent."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    fn()
    times = []
    begin = time.perf_counter()
    while len(times) < max(1, reps) and (not times or time.perf_counter() - begin < max_s):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return first, statistics.median(times)


def guarded(fn):
    """fn's result, or the error's first line (an out-of-memory unpatched path, say)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


def fwd(model, ids):
    with torch.no_grad():
        return model(ids).logits


def fwd_bwd(model, ids):
    model.train()
    try:
        model(ids, labels=ids).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def generate(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def cell(x, fmt="{:.2f}"):
    return fmt.format(x) if isinstance(x, float) else str(x)


def ratio(ref, new):
    return f"{ref / new:.2f}x" if isinstance(ref, float) and isinstance(new, float) else "-"


def print_row(row: list[str]) -> None:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(row, WIDTHS)) + " |", flush=True)


@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls and convolutions in full fp32 (cuDNN's convolutions allow TF32 by
    default), so that an fp32 error is ssmc's, not TF32's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def outputs(model, ids) -> list[torch.Tensor]:
    """The hidden states after each layer, then the logits, of one forward (on the CPU)."""
    found = []

    def keep(module, inputs, output):
        found.append((output[0] if isinstance(output, tuple) else output).detach().float().cpu())

    hooks = [layer.register_forward_hook(keep) for layer in model.backbone.layers]
    try:
        with torch.no_grad():
            logits = model(ids.to(model.device)).logits
    finally:
        for hook in hooks:
            hook.remove()
    return found + [logits.detach().float().cpu()]


def reference_outputs(kind: str, args, model, ids) -> list[torch.Tensor]:
    """`outputs` of `model` (fp32, on the CPU) on transformers' PyTorch path: computed in a
    child process that cannot import the fast-path packages. Some transformers versions (5.17)
    call mamba_ssm's Triton kernels for CPU tensors whenever it is importable, and fail."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save({"state": model.state_dict(), "ids": ids}, path)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--reference-of", path,
                        "--kind", kind, "--hidden", str(args.hidden), "--vocab", str(args.vocab),
                        "--check-layers", str(args.check_layers)], check=True)
        return torch.load(path + ".out")


def reference_child(args) -> int:
    """The child of `reference_outputs`: the fast-path packages blocked before transformers
    is imported, then the model's outputs on its inputs, saved beside them."""
    for name in FAST_PATH:
        sys.modules[name] = None     # importing it raises; find_spec returns None
    saved = torch.load(args.reference_of)
    model = build(args.kind, args, args.check_layers, "cpu", torch.float32)
    model.load_state_dict(saved["state"])
    torch.save(outputs(model, saved["ids"]), args.reference_of + ".out")
    return 0


def check(kind: str, args) -> None:
    """Print the error table of the module docstring for `kind`."""
    layers = args.check_layers
    ref = build(kind, args, layers, "cpu", torch.float32)
    ids = torch.randint(0, args.vocab, (1, args.check_seqlen),
                        generator=torch.Generator().manual_seed(1))
    want = reference_outputs(kind, args, ref, ids)
    dtype = DTYPES[args.dtype]
    models = {f"unpatched {args.dtype}": lambda: copy.deepcopy(ref).to(args.device, dtype),
              f"patched {args.dtype}": lambda: patch(copy.deepcopy(ref).to(args.device, dtype),
                                                     backend=args.backend)}
    if dtype != torch.float32:
        models["patched fp32"] = lambda: patch(copy.deepcopy(ref).to(args.device),
                                               backend=args.backend)
    got = {}
    with no_tf32():
        for name, make in models.items():
            got[name] = guarded(lambda: outputs(make(), ids))
    # columns: after layers 1, 2, 4, 8, ... and the last, then the logits
    cols = sorted({2 ** i for i in range(layers.bit_length()) if 2 ** i < layers} | {layers})
    cols = [c - 1 for c in cols] + [layers]
    labels = [str(c + 1) for c in cols[:-1]] + ["logits"]
    print(f"# {kind}: relative RMS error against the unpatched model in fp32 on the CPU "
          f"({layers} random layers, b=1 t={args.check_seqlen})")
    print("#   " + "after layer".ljust(26) + "".join(s.rjust(10) for s in labels))
    plain, patched = (got[f"{p} {args.dtype}"] for p in ("unpatched", "patched"))
    rows = [(name, out, want) for name, out in got.items()]
    rows.append((f"patched vs unpatched {args.dtype}", patched, plain))
    for name, out, base in rows:
        if isinstance(out, str) or isinstance(base, str):
            line = "  " + (out if isinstance(out, str) else base)
        else:
            line = "".join(f"{rel_rms(out[c], base[c]):10.2e}" for c in cols)
        print("#   " + name.ljust(26) + line, flush=True)


def run(kind: str, args) -> None:
    ref = build(kind, args, args.layers, args.device, DTYPES[args.dtype])
    model = patch(copy.deepcopy(ref), backend=args.backend)
    gen = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device=args.device,
                        generator=gen)
    shape = f"b={args.batch} t={args.seqlen}"

    def timed(fn):
        return guarded(lambda: time_ms(fn, args.reps, args.max_s))

    def row(what, shape, t_ref, t_new, unit, speedup, fmt="{:.2f}"):
        firsts = [cell(t[0], "{:.1f}") if isinstance(t, tuple) else "-" for t in (t_ref, t_new)]
        t_ref, t_new = (t[1] if isinstance(t, tuple) else t for t in (t_ref, t_new))
        print_row([kind, what, shape, cell(t_ref, fmt), cell(t_new, fmt), unit,
                   speedup(t_ref, t_new), " / ".join(firsts)])

    for what, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t_ref = timed(lambda: fn(ref, ids))
        t_new = timed(lambda: fn(model, ids))
        row(what, shape, t_ref, t_new, "ms", ratio)
    if args.compile:
        compiled = torch.compile(model)
        row("forward, patched + torch.compile", shape, "-", timed(lambda: fwd(compiled, ids)),
            "ms", lambda old, new: "-")
    for b in args.gen_batch:
        prompt = torch.randint(0, args.vocab, (b, args.prompt), device=args.device,
                               generator=gen)
        outs = {}

        def tokens_per_s(m, key):
            first, ms = time_ms(
                lambda: outs.__setitem__(key, generate(m, prompt, args.new_tokens)),
                max(1, args.reps // 3), args.max_s)
            return first, b * args.new_tokens / (ms / 1e3)

        r_ref = guarded(lambda: tokens_per_s(ref, "ref"))
        r_new = guarded(lambda: tokens_per_s(model, "new"))
        same = "-"
        if "ref" in outs and "new" in outs:
            new_ref = outs["ref"][:, args.prompt:]
            same = f"{(outs['new'][:, args.prompt:] == new_ref).float().mean().item():.0%}"
        row(f"generate (same tokens: {same})", f"b={b} prompt={args.prompt} "
            f"new={args.new_tokens}", r_ref, r_new, "tok/s", lambda old, new: ratio(new, old),
            "{:.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("mamba2", "mamba", "both"), default="mamba2")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--backend", default="auto", help="ssmc backend of the patched model")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50288)
    ap.add_argument("--check-layers", type=int, default=4,
                    help="layers of the error check's model (0: no check)")
    ap.add_argument("--check-seqlen", type=int, default=512, help="length of the error check")
    ap.add_argument("--batch", type=int, default=4, help="batch of the forward timings")
    ap.add_argument("--seqlen", type=int, default=2048, help="length of the forward timings")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gen-batch", type=lambda s: [int(x) for x in s.split(",") if x],
                    default=[1, 8], help="comma-separated batch sizes of generation ('': none)")
    ap.add_argument("--reps", type=int, default=10, help="most timed calls per measurement")
    ap.add_argument("--max-s", type=float, default=3.0,
                    help="seconds of timed calls per measurement (at least one call)")
    ap.add_argument("--autotune", choices=("off", "cached", "full"),
                    default=os.environ.get("SSMC_AUTOTUNE", "cached"),
                    help="SSMC_AUTOTUNE for the patched model (default: the environment's, "
                         "else cached)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the patched forward under torch.compile")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    ap.add_argument("--reference-of", help=argparse.SUPPRESS)   # see reference_outputs
    args = ap.parse_args(argv)
    if args.reference_of:
        return reference_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("transformers_patch.py needs a CUDA GPU (or --device cpu for a smoke run)",
              file=sys.stderr)
        return 1
    os.environ["SSMC_AUTOTUNE"] = args.autotune  # read on each new call shape
    start = time.perf_counter()
    import transformers
    have = {m: importlib.util.find_spec(m) is not None for m in FAST_PATH}
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"# {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, ssmc {ssmc.__version__}; {args.dtype}, "
          f"SSMC_AUTOTUNE={args.autotune}")
    print("# importable for the unpatched model's fast path: "
          + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in have.items()))
    kinds = ("mamba2", "mamba") if args.kind == "both" else (args.kind,)
    if args.check_layers > 0:
        for kind in kinds:
            check(kind, args)
    print_row(HEAD)
    print_row(["-" * w for w in WIDTHS])
    for kind in kinds:
        run(kind, args)
    print(f"# {time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
