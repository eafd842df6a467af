"""GPU benchmark: a Hugging Face transformers Mamba2 (or Mamba) model, unpatched against patched
with `ssmc.integrations.transformers.patch`, on the same random weights.

    python benchmarks/transformers_patch.py [--kind mamba2|mamba|both] [--dtype bf16]

The model is randomly initialised from a config of the size of state-spaces/mamba2-130m
(hidden 768, 24 layers, state 128, head dim 64; Mamba: mamba-130m), so nothing is downloaded;
`--layers` and `--hidden` shrink or grow it. Prints one table (medians over `--reps` runs, in
ms, and generation in tokens/s; speed-up = unpatched time / patched time) and, above it, which
kernels the unpatched model can use: transformers picks mamba_ssm / causal_conv1d (or their
hub kernels) when they are importable on CUDA, else its PyTorch path. Also checked: the
patched logits against the unpatched ones (relative RMS error) and how many generated tokens
agree (greedy decoding in bf16 may part ways after a near-tie).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time

import torch

import ssmc
from ssmc.integrations.transformers import patch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(kind: str, args):
    import transformers
    if kind == "mamba2":
        config = transformers.Mamba2Config(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
            state_size=128, head_dim=64, num_heads=2 * args.hidden // 64, n_groups=1, expand=2,
            conv_kernel=4, chunk_size=256)
        model = transformers.Mamba2ForCausalLM(config)
    else:
        config = transformers.MambaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
            state_size=16, expand=2, conv_kernel=4, time_step_rank=args.hidden // 16)
        model = transformers.MambaForCausalLM(config)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, device-synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def cell(x, fmt="{:.2f}"):
    return fmt.format(x) if isinstance(x, float) else str(x)


def ratio(ref, new):
    return f"{ref / new:.2f}x" if isinstance(ref, float) and isinstance(new, float) else "-"


def run(kind: str, args) -> list[list[str]]:
    ref = build(kind, args)
    model = patch(copy.deepcopy(ref), backend=args.backend)
    gen = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device=args.device,
                        generator=gen)
    shape = f"b={args.batch} t={args.seqlen}"
    err = guarded(lambda: rel_rms(fwd(model, ids), fwd(ref, ids)))
    print(f"# {kind}: patched logits vs unpatched, relative RMS error: {cell(err, '{:.2e}')}")
    for what, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t_ref = guarded(lambda: time_ms(lambda: fn(ref, ids), args.reps))
        t_new = guarded(lambda: time_ms(lambda: fn(model, ids), args.reps))
        rows.append([kind, what, shape, cell(t_ref), cell(t_new), "ms", ratio(t_ref, t_new)])
    if args.compile:
        compiled = torch.compile(model)
        t_new = guarded(lambda: time_ms(lambda: fwd(compiled, ids), args.reps))
        rows.append([kind, "forward, patched + torch.compile", shape, "-", cell(t_new), "ms",
                     "-"])
    for b in args.gen_batch:
        prompt = torch.randint(0, args.vocab, (b, args.prompt), device=args.device,
                               generator=gen)
        outs = {}

        def tokens_per_s(m, key):
            ms = time_ms(lambda: outs.__setitem__(key, generate(m, prompt, args.new_tokens)),
                         max(1, args.reps // 3), warmup=1)
            return b * args.new_tokens / (ms / 1e3)

        r_ref = guarded(lambda: tokens_per_s(ref, "ref"))
        r_new = guarded(lambda: tokens_per_s(model, "new"))
        same = "-"
        if "ref" in outs and "new" in outs:
            new_ref = outs["ref"][:, args.prompt:]
            same = f"{(outs['new'][:, args.prompt:] == new_ref).float().mean().item():.0%}"
        shape_g = f"b={b} prompt={args.prompt} new={args.new_tokens}"
        rows.append([kind, f"generate (same tokens: {same})", shape_g, cell(r_ref, "{:.0f}"),
                     cell(r_new, "{:.0f}"), "tok/s", ratio(r_new, r_ref)])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("mamba2", "mamba", "both"), default="mamba2")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--backend", default="auto", help="ssmc backend of the patched model")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50288)
    ap.add_argument("--batch", type=int, default=4, help="batch of the forward timings")
    ap.add_argument("--seqlen", type=int, default=2048, help="length of the forward timings")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batch", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8], help="comma-separated batch sizes of generation")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true",
                    help="also time the patched forward under torch.compile")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("transformers_patch.py needs a CUDA GPU (or --device cpu for a smoke run)",
              file=sys.stderr)
        return 1
    import transformers
    have = {m: importlib.util.find_spec(m) is not None
            for m in ("mamba_ssm", "causal_conv1d", "kernels")}
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"# {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, ssmc {ssmc.__version__}; {args.dtype}")
    print("# importable for the unpatched model's fast path: "
          + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in have.items()))
    rows = []
    for kind in (("mamba2", "mamba") if args.kind == "both" else (args.kind,)):
        rows += run(kind, args)
    head = ["model", "what", "shape", "unpatched", "patched", "unit", "speed-up"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
