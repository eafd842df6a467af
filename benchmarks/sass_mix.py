"""The scan lowering's kernels compiled for a GPU without one: registers, spills and the
instruction mix of one iteration of each kernel's main loop, from the SASS.

    python benchmarks/sass_mix.py                 # sm_90a, the installed Triton
    python benchmarks/sass_mix.py --arch 90 --markdown

Where no GPU is at hand this is the profile to read before guessing: shuffles, spills and
instruction counts per step of a state are what the scan's kernels are bound by (issue 18's
VMamba shapes, Mamba-1). Each kernel is rendered for its definition, compiled with the launch's
own tile and the specialisations Triton's JIT makes at those shapes (unit strides as
constants, other integers divisible by 16), and disassembled with the nvdisasm Triton ships.
Compile with the Triton of the GPU machine for numbers that match it (put its install first on
PYTHONPATH): code generation differs between Triton versions.

Columns: loop = instructions of one iteration of the main loop (the longest backward branch),
shfl = its shuffles, per 32 = loop instructions x warps x 32 / the steps of a state that one
iteration advances (padding excluded): the work per 32 useful steps.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ssmc.nn_vision import build_ss2d_scan
from ssmc.ops.selective_scan import mamba1
from ssmc.plan import Plan
from ssmc.backends.triton.lowerings import scan, scan_bwd
from ssmc.backends.triton.lowerings.scan_launch import scan_blocks, scan_warps
from ssmc.backends.triton.lowerings.scan_bwd_launch import backward_blocks

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
#: integer-pointer parameters of the scan kernels (the others point at floats)
INT_PTRS = {"cu_ptr": "*i32", "ssmc_ck_off": "*i64"}
#: (label, definition, n, p): VMamba's cross2d op at n = 16 and 1 (d = 192 as p = 32 a head),
#: Mamba-1 (p = 1)
CASES = (("VMamba n=16", build_ss2d_scan, 16, 32), ("VMamba n=1", build_ss2d_scan, 1, 32),
         ("Mamba-1 n=16", lambda: mamba1, 16, 1))


def load(source: str, name: str):
    path = os.path.join(tempfile.mkdtemp(), name + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_kernel(fn, consts: dict, unit: set, warps: int, arch: int):
    """`fn` compiled as the JIT would at these shapes: `consts` and `unit` (integers equal to 1)
    as constants, pointers and the other integers divisible by 16, inputs in bf16."""
    consts = dict({k: v for k, v in consts.items() if k in fn.arg_names}, **{a: 1 for a in unit})
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
            continue
        if a in INT_PTRS:
            sig[a] = INT_PTRS[a]
        elif a.endswith("_ptr") and a.startswith("u_"):
            sig[a] = "*bf16"
        elif a.endswith("_ptr") or a.startswith("ssmc_") or a in ("out_ptr", "yacc_ptr",
                                                                   "h0_ptr", "hT_ptr"):
            sig[a] = "*fp32"
        else:
            sig[a] = "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps))


def sass_of(kernel) -> tuple[str, int | None, int | None]:
    """(disassembly, registers, stack bytes: the spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True,
                          text=True, check=True).stdout
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                         capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    return text, regs and int(regs.group(1)), stack and int(stack.group(1))


def loop_mix(sass: str) -> collections.Counter:
    """The opcodes of the longest span a backward branch closes: one main-loop iteration."""
    lines, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update((p, addr) for p in pending)
            pending = []
            lines.append((addr, m.group(3).split(".")[0], m.group(4)))
    spans = [(labels[t.group(1)], addr) for addr, op, rest in lines if op == "BRA"
             for t in [re.search(r"(\.L_x_\d+)", rest)]
             if t and labels.get(t.group(1), addr) < addr]
    lo, hi = max(spans, key=lambda s: s[1] - s[0]) if spans else (0, float("inf"))
    return collections.Counter(op for addr, op, _ in lines if lo <= addr <= hi)


def kernels(defn, N: int, P: int):
    """(name, renderer, constants, warps, steps an iteration advances) of the scan's inference
    forward, checkpointing forward and backward at their launch tiles."""
    BN, BP, BT = scan_blocks(N, P)
    bBN, bBP, bBT, bwarps = backward_blocks(N, P)
    fBT = min(BT, bBT)
    ckpt = "ssmc_scan_ckpt_fwd_steps" if fBT == 1 else "ssmc_scan_ckpt_fwd"
    flags = dict(IS_VARLEN=False, HAS_H0=False, N=N)
    yield ("ssmc_scan_fwd", scan.render, dict(flags, BN=BN, BP=BP, BT=BT, STAGES=1,
           STORE_HT=False, ACCUM_IN=False, WRITE_OUT=False, ATOMIC=True, EVEN_P=P % BP == 0),
           scan_warps(BN, BP, BT), BT)
    yield (ckpt, scan_bwd.render, dict(flags, BN=BN, BP=BP, BT=fBT, CK=bBT, ACCUM_IN=False,
           WRITE_Y=True, ATOMIC=True, EVEN_P=P % BP == 0), scan_warps(BN, BP, fBT),
           scan.STEPS if fBT == 1 else fBT)
    yield ("ssmc_scan_bwd", scan_bwd.render, dict(flags, BN=bBN, BP=bBP, BT=bBT, CK=bBT,
           HAS_GT=False, EVEN_P=P % bBP == 0), bwarps, bBT)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--top", type=int, default=6, help="most frequent opcodes to list")
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch}a")
    print("| case | kernel | tile (n x p, steps, warps) | registers | spill bytes | loop | "
          "shfl | per 32 | most frequent in the loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, build, N, P in CASES:
        defn = build()
        plan = Plan(program=defn.program, lowering="scan", dtype="bfloat16")
        for name, render, consts, warps, steps in kernels(defn, N, P):
            fn = getattr(load(render(plan), f"sass_{name}_{N}_{P}"), name)
            unit = {a for a in fn.arg_names if a.startswith("u_") and a[-4:] in ("_s_p", "_s_n")}
            unit |= {a for a, v in (("P", P), ("N", N)) if v == 1 and a not in consts}
            sass, regs, spill = sass_of(compile_kernel(fn, consts, unit, warps, args.arch))
            mix = loop_mix(sass)
            body = sum(mix.values())
            per = body * warps * 32 / (steps * N * min(P, consts["BP"]))
            top = ", ".join(f"{op} {c}" for op, c in mix.most_common(args.top))
            print(f"| {label} | `{name}` | {consts['BN']} x {consts['BP']}, {steps}, {warps} | "
                  f"{regs} | {spill} | {body} | {mix['SHFL']} | {per:.0f} | {top} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
