"""Ahead-of-time export of TVM kernels and loading them back with tvm_ffi.

No GPU here: the CUDA scan's per-thread algorithm is checked on the CPU by compiling its TIR
with the thread bindings turned into CPU loops; the CUDA export is built with nvcc (when
installed) and loaded without `tvm`; running it is benchmarks/tvm_gpu_check.py's job on a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

import ssmc  # noqa: E402
from ssmc import dsl as S  # noqa: E402
from ssmc import reference  # noqa: E402
from ssmc.backends.tvm import TVMKernel  # noqa: E402
from ssmc.backends.tvm.build import compile_source  # noqa: E402
from ssmc.backends.tvm.export import export  # noqa: E402
from ssmc.backends.tvm.load import load  # noqa: E402
from ssmc.backends.tvm.lowerings import LOWERINGS, func_name  # noqa: E402
from ssmc.ops.ssd import build as ssd_build  # noqa: E402
from ssmc.plan import Plan  # noqa: E402
from ssmc.validate import bind  # noqa: E402


@ssmc.ssm
def gla_bi(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], g: S.In["b t h n"]):
    return S.recurrence(decay=S.sigmoid(g + 2), key=k, value=v, query=q,
                        direction="bidirectional")


@ssmc.ssm
def s6(u: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h n p"], B: S.In["b t g n"],
       C: S.In["b t g n"]):
    dt = S.softplus(dt)
    return S.recurrence(decay=S.exp(dt * A), key=B, value=u * dt, query=C) * S.tanh(u)


MAMBA2 = ssd_build(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True)


def _inputs(program, sizes, gen, dtype=torch.float32):
    out = []
    for i in program.inputs:
        x = torch.randn(*(sizes[a] for a in i.axes), generator=gen, dtype=torch.float64)
        if i.name == "A":
            x = -x.abs() - 0.5
        out.append(x.to(dtype))
    return out


def _env_with_ssmc():
    root = str(Path(ssmc.__file__).parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def _errors(a, e):
    scale = float(e.abs().max())
    return float((a.double() - e).abs().max()) / max(scale, 1e-30)


class CudaScanOnCPU(TVMKernel):
    """The CUDA scan's TIR with blockIdx -> T.parallel and threadIdx -> a serial loop."""

    def function(self, spec):
        src = LOWERINGS[("scan", "cuda")](dataclasses.replace(spec, target="cuda"))
        assert 'thread="threadIdx.x"' in src
        src = src.replace('T.thread_binding(', 'T.parallel(', 1)
        src = src.replace(', thread="blockIdx.x")', ")")
        src = src.replace('T.thread_binding(', 'range(').replace(', thread="threadIdx.x")', ")")
        return compile_source(src)[func_name(self.plan)]


CASES = {
    "mamba2-bf16-varlen-states": (MAMBA2, torch.bfloat16, True, dict(b=1, t=80, h=4, g=2, n=6,
                                                                      p=5)),
    "gla-bidirectional-states": (gla_bi, torch.float32, False, dict(b=2, t=40, h=3, g=3, n=4,
                                                                     p=7)),
    "s6-full-decay": (s6, torch.float32, False, dict(b=2, t=33, h=4, g=1, n=5, p=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_scan_algorithm_on_cpu(case):
    defn, dtype, varlen, sizes = CASES[case]
    prog = defn.program
    gen = torch.Generator().manual_seed(1)
    args = _inputs(prog, sizes, gen, dtype)
    D = len(prog.recurrence.directions)
    kw = dict(return_final_state=True)
    nseq = sizes["b"]
    if varlen:
        kw["cu_seqlens"] = torch.tensor([0, 20, 20, 80], dtype=torch.int32)
        nseq = 3
    shape = ((D,) if D > 1 else ()) + (nseq, sizes["h"], sizes["n"], sizes["p"])
    kw["initial_state"] = torch.randn(*shape, generator=gen)
    b = bind(prog, args, kw)
    plan = Plan(program=prog, lowering="scan", dtype=str(b.dtype).split(".")[1],
                has_initial_state=True, return_final_state=True, varlen=varlen)
    out, final = CudaScanOnCPU(plan, "unused")(b.tensors, b.sizes, b.initial_state, b.cu_seqlens)
    ref_out, ref_final = reference.scan(prog, b.tensors, b.sizes, b.initial_state, b.cu_seqlens,
                                        True)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-5
    assert _errors(out, ref_out) <= tol
    assert _errors(final, ref_final) <= 2e-5


def test_llvm_export_roundtrip(tmp_path):
    out = export(MAMBA2, target="llvm", shapes=dict(h=4, g=2, n=6, p=5), out_dir=tmp_path / "e",
                 initial_state=True, return_final_state=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["argument_order"][-2:] == ["out", "final_state"]
    assert manifest["symbolic"] == ["b", "t"]
    kernel = load(out)
    gen = torch.Generator().manual_seed(2)
    sizes = dict(b=2, t=50, h=4, g=2, n=6, p=5)
    args = _inputs(MAMBA2.program, sizes, gen)
    h0 = torch.randn(2, 4, 6, 5, generator=gen)
    y, hT = kernel(*args, initial_state=h0)
    b = bind(MAMBA2.program, args, dict(initial_state=h0, return_final_state=True))
    ry, rh = reference.scan(MAMBA2.program, b.tensors, b.sizes, h0, None, True)
    assert _errors(y, ry) <= 2e-5 and _errors(hT, rh) <= 2e-5
    with pytest.raises(ssmc.errors.ShapeError, match="n=6"):
        kernel(*_inputs(MAMBA2.program, dict(sizes, n=7), gen), initial_state=h0)
    # a tampered library is refused, not loaded (tampered in a copy: rewriting the file of a
    # library this process has mapped corrupts its pages and crashes the process at exit)
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    lib = tampered / manifest["library"]
    lib.write_bytes(lib.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="does not match"):
        load(tampered)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_export_links_only_tvm_ffi(tmp_path):
    out = export(MAMBA2, target="cuda", arch="sm_90", shapes=dict(h=8, g=1, n=64, p=64),
                 out_dir=tmp_path / "cuda", dtype="bfloat16", initial_state=True,
                 return_final_state=True, varlen=True)
    manifest = json.loads((out / "manifest.json").read_text())
    lib = out / manifest["library"]
    assert (out / "kernel.cu").exists() and lib.exists()
    needed = subprocess.run(["objdump", "-p", str(lib)], capture_output=True, text=True).stdout
    needed = [ln.split()[-1] for ln in needed.splitlines() if "NEEDED" in ln]
    assert any("tvm_ffi" in n for n in needed)
    assert not any("libtvm.so" in n or "tvm_runtime" in n for n in needed), needed
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True,
                               text=True).stdout
    assert "TVMBackend" not in undefined
    # loads in a process that has tvm_ffi and ssmc but never imports tvm
    code = ("import sys\nfrom ssmc.backends.tvm.load import load\n"
            f"k = load({str(out)!r})\n"
            "assert 'tvm' not in sys.modules, 'tvm was imported'\n"
            "print(type(k.function).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=_env_with_ssmc())
    assert done.returncode == 0, done.stderr
    assert "Function" in done.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_kernel_cache_builds_once(tmp_path, monkeypatch):
    """The backend's own CUDA path (tensors on a GPU): nvcc-built entries in the disk cache."""
    from ssmc.backends.tvm.build import cached_function
    from ssmc.backends.tvm.lowerings import KernelSpec
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    plan = Plan(program=gla_bi.program, lowering="scan", dtype="float32",
                return_final_state=True)
    spec = KernelSpec(plan=plan, H=4, G=4, N=16, P=32, input_dtypes=("float32",) * 4,
                      target="cuda", arch="sm_90")
    source = LOWERINGS[("scan", "cuda")](spec)
    fn = cached_function("k", spec.tag(), source, func_name(plan), spec.arch)
    assert fn is not None
    lib = next(tmp_path.rglob("kernel.so"))
    assert (lib.parent / "kernel.cu").exists()
    stamp = lib.stat().st_mtime_ns
    assert cached_function("k", spec.tag(), source, func_name(plan), spec.arch) is not None
    assert lib.stat().st_mtime_ns == stamp
