"""GPU check of `ssmc.nn.Mamba2` against mamba_ssm's `Mamba2` with the same weights.

    PYTHONPATH=$PWD:.carry/mamba_src python3 benchmarks/mamba2_gpu_check.py

Builds mamba_ssm's Mamba2 (bf16 and fp32 parameters), loads its `state_dict()` into
`ssmc.nn.Mamba2` with `strict=True`, then on the same input compares:

* the full-sequence forward (relative L2 error of the outputs),
* the gradients of a random linear loss w.r.t. the input and every parameter (worst one named),
* ssmc decoding: a 16-token prompt then 64 tokens one at a time through `inference_params`,
  against ssmc's own full forward, and against mamba_ssm's decode of the same tokens.

mamba_ssm runs with `use_mem_eff_path=False` and without causal_conv1d when that package is
absent (its plain-PyTorch conv path); the SSD itself is its Triton `mamba_chunk_scan_combined`.
Prints one line per check with PASS/FAIL; exit status 1 when any fails.
"""
from __future__ import annotations

import argparse
import sys

import torch

from compat_gpu_check import limit_autotuning
from ssmc.nn import InferenceParams as SsmcInferenceParams
from ssmc.nn import Mamba2 as SsmcMamba2

TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}   # outputs; gradients get 2x


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def decode(model, u, prompt, ip_cls):
    ip = ip_cls(max_seqlen=u.shape[1], max_batch_size=u.shape[0])
    outs = [model(u[:, :prompt], inference_params=ip)]
    ip.seqlen_offset = prompt
    for i in range(prompt, u.shape[1]):
        outs.append(model(u[:, i:i + 1], inference_params=ip))
        ip.seqlen_offset += 1
    return torch.cat(outs, 1)


def check(dtype, config, b, t, failures):
    from mamba_ssm.modules.mamba2 import Mamba2 as MambaMamba2
    from mamba_ssm.utils.generation import InferenceParams as MambaInferenceParams

    torch.manual_seed(0)
    kw = dict(config, layer_idx=0, device="cuda", dtype=dtype)
    theirs = MambaMamba2(**kw, use_mem_eff_path=False)
    ours = SsmcMamba2(**kw)
    missing = ours.load_state_dict(theirs.state_dict(), strict=True)
    label = f"{str(dtype)[6:]:8s} {config}"
    tol = TOL[dtype]

    def report(what, err, limit):
        ok = err <= limit
        if not ok:
            failures.append(f"{label} {what}")
        print(f"{label:70s} {what:34s} {err:9.2e} (tol {limit:.0e}) {'PASS' if ok else 'FAIL'}",
              flush=True)

    print(f"{label:70s} load_state_dict strict: {missing}", flush=True)
    u = torch.randn(b, t, config["d_model"], device="cuda", dtype=dtype)
    y_t = theirs(u)
    y_o = ours(u)
    report("forward vs mamba_ssm", rel(y_o, y_t), tol)

    w = torch.randn_like(y_t)
    u_t = u.clone().requires_grad_(True)
    u_o = u.clone().requires_grad_(True)
    g_t = torch.autograd.grad((theirs(u_t).float() * w).sum(), [u_t, *theirs.parameters()])
    g_o = torch.autograd.grad((ours(u_o).float() * w).sum(), [u_o, *ours.parameters()])
    names = ["u"] + [k for k, _ in theirs.named_parameters()]
    errs = {n: rel(a, r) for n, a, r in zip(names, g_o, g_t)}
    worst = max(errs, key=errs.get)
    report(f"grads vs mamba_ssm (worst {worst})", errs[worst], 2 * tol)

    n_dec = 64
    u_dec = u[:, :16 + n_dec]
    with torch.no_grad():
        full = ours(u_dec)
        dec_o = decode(ours, u_dec, 16, SsmcInferenceParams)
        report("decode 16+64 vs own full forward", rel(dec_o[:, 16:], full[:, 16:]), tol)
        try:
            dec_t = decode(theirs, u_dec, 16, MambaInferenceParams)
            report("decode 16+64 vs mamba_ssm decode", rel(dec_o[:, 16:], dec_t[:, 16:]), tol)
        except Exception as e:  # noqa: BLE001 - their decode path may need causal_conv1d
            print(f"{label:70s} mamba_ssm decode: skip ({type(e).__name__}: {e})"[:160],
                  flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--b", type=int, default=2)
    ap.add_argument("--t", type=int, default=512)
    ap.add_argument("--original-configs", type=int, default=0, metavar="K",
                    help="mamba_ssm's Triton autotuners try K configs each (0: all)")
    args = ap.parse_args(argv)
    if args.original_configs:
        limit_autotuning(args.original_configs)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    configs = [dict(d_model=768, d_state=128, headdim=64),
               dict(d_model=512, d_state=64, headdim=32, ngroups=2, D_has_hdim=True,
                    norm_before_gate=True, chunk_size=128)]
    failures: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        for config in configs:
            try:
                check(dtype, config, args.b, args.t, failures)
            except Exception as e:  # noqa: BLE001 - one broken config must not hide the rest
                failures.append(f"{dtype} {config}: {type(e).__name__}: {e}")
                print(f"ERROR {dtype} {config}: {type(e).__name__}: {e}", flush=True)
    print("FAILED: " + "; ".join(failures) if failures else "all PASS", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
