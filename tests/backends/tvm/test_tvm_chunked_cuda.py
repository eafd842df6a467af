"""The TVM backend's CUDA chunked lowering (lowerings/chunked_cuda.py), on a machine without a GPU:
its TVMScript parses and `tvm.tirx.build` lowers it for CUDA (tensor-core mma for bf16/fp16,
fp32 FMAs otherwise), nvcc compiles the result (when installed), the export records the
workspaces its loader allocates, and plans it cannot run fall back to the CUDA scan.
Running it against the reference is benchmarks/tvm_gpu_check.py's job on a GPU.
"""
from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("tvm")

import ssmc  # noqa: E402
from ssmc import dsl as S  # noqa: E402
from ssmc.backends.tvm import TVMKernel, cuda_lowering  # noqa: E402
from ssmc.backends.tvm.build import cuda_host_source  # noqa: E402
from ssmc.backends.tvm.lowerings import LOWERINGS, KernelSpec, func_name  # noqa: E402
from ssmc.backends.tvm.lowerings.chunked_cuda import (  # noqa: E402
    tiles,
    unsupported,
    workspace_shapes,
)
from ssmc.ops.ssd import build as ssd_build  # noqa: E402
from ssmc.plan import Plan  # noqa: E402

MAMBA2 = ssd_build(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True)


@ssmc.ssm
def ssd_bi(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"], B: S.In["b t g n"],
           C: S.In["b t g n"]):
    dt = S.softplus(dt)
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C,
                        direction="bidirectional")


@ssmc.ssm
def linear_rev(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
    return S.recurrence(key=k, value=v, query=q, direction="reverse")


@ssmc.ssm
def gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], g: S.In["b t h n"]):
    return S.recurrence(decay=S.exp(g), key=k, value=v, query=q)


def _spec(defn, dtype, sizes, **plan_kw):
    plan = Plan(program=defn.program, lowering="chunked", dtype=dtype, **plan_kw)
    return KernelSpec(plan=plan, H=sizes["h"], G=sizes["g"], N=sizes["n"], P=sizes["p"],
                      input_dtypes=(dtype,) * len(defn.program.inputs), target="cuda",
                      arch="sm_90", cu_dtype="int32" if plan.varlen else None,
                      h0_dtype="float32" if plan.has_initial_state else None)


BENCH = dict(h=80, g=1, n=128, p=64)
CASES = {
    # the benchmark's specialisation: tensor cores
    "mamba2-bf16-bench": (MAMBA2, "bfloat16", BENCH, {}),
    # fp32 FMAs, states and packed sequences
    "mamba2-fp32-states-varlen": (MAMBA2, "float32", dict(h=8, g=2, n=64, p=64),
                                  dict(has_initial_state=True, return_final_state=True,
                                       varlen=True)),
    # fp16, sizes that are no multiple of the tiles, both directions
    "bidirectional-fp16-odd": (ssd_bi, "float16", dict(h=6, g=3, n=40, p=20),
                               dict(has_initial_state=True, return_final_state=True)),
    # no decay, reverse direction, chunk of 32
    "linear-reverse-bf16-chunk32": (linear_rev, "bfloat16", dict(h=4, g=4, n=32, p=48),
                                    dict(chunk_size=32, return_final_state=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_chunked_builds(case):
    defn, dtype, sizes, kw = CASES[case]
    spec = _spec(defn, dtype, sizes, **kw)
    assert cuda_lowering(spec.plan, spec.N, spec.P) == "chunked"
    src = LOWERINGS[("chunked", "cuda")](spec)
    assert 'thread="blockIdx.x"' in src
    cu = cuda_host_source(src, func_name(spec.plan), "sm_90")
    t = tiles(spec.plan, spec.N, spec.P)
    if dtype in ("bfloat16", "float16"):
        kind = "bf16" if dtype == "bfloat16" else "f16"
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" in cu
        assert t.mma
    else:
        assert "mma.sync" not in cu and not t.mma
    # one state pass and one output pass per direction (+ the slot map for packed sequences)
    kernels = cu.count('extern "C" __global__') // 2
    assert kernels == 2 * len(defn.program.recurrence.directions) + bool(kw.get("varlen"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_chunked_export_compiles(tmp_path):
    """nvcc compiles the benchmark's bf16 specialisation; the manifest names the workspaces
    that load.py allocates after the outputs."""
    from ssmc.backends.tvm.export import export
    out = export(MAMBA2, target="cuda", arch="sm_90", shapes=BENCH, out_dir=tmp_path / "bf16",
                 dtype="bfloat16", lowering="chunked", return_final_state=True)
    m = json.loads((out / "manifest.json").read_text())
    assert (out / m["library"]).stat().st_size > 0
    assert m["lowering"] == "chunked" and m["chunk_size"] == 64
    assert m["argument_order"][-3:] == ["out", "final_state", "chunk_states"]
    assert m["workspaces"] == [{"name": "chunk_states", "dims": ["slots", "h", "p", "n"],
                                "dtype": "bfloat16"}]


def test_workspace_shapes():
    plan = Plan(program=MAMBA2.program, lowering="chunked", dtype="bfloat16")
    assert workspace_shapes(plan, 8, 4096, 8, 80, 128, 64) == [
        ("chunk_states", (8 * 64, 80, 64, 128), "bfloat16")]
    assert workspace_shapes(plan, 2, 65, 2, 4, 16, 8)[0][1][0] == 2 * 2
    varlen = Plan(program=MAMBA2.program, lowering="chunked", dtype="float32", varlen=True)
    # a sequence's chunks start at slot t0 // 64 + s: 100 // 64 + 3 slots cover 3 sequences
    assert workspace_shapes(varlen, 1, 100, 3, 4, 16, 8) == [
        ("chunk_states", (4, 4, 8, 16), "float32"), ("chunk_seq", (4,), "int32")]


def test_cuda_falls_back_to_the_scan():
    """Plans the CUDA chunked lowering cannot run take the CUDA scan, with a reason."""
    chunked = Plan(program=MAMBA2.program, lowering="chunked", dtype="bfloat16")
    assert cuda_lowering(chunked, 128, 64) == "chunked"
    per_key = Plan(program=gla.program, lowering="chunked", dtype="bfloat16")
    assert "per key" in unsupported(per_key)
    assert cuda_lowering(per_key, 64, 64) == "scan"
    f64 = Plan(program=MAMBA2.program, lowering="chunked", dtype="float64")
    assert "float64" in unsupported(f64) and cuda_lowering(f64, 64, 64) == "scan"
    big = Plan(program=MAMBA2.program, lowering="chunked", dtype="float32", chunk_size=128)
    assert "shared memory" in unsupported(big, 1024, 64)
    assert cuda_lowering(big, 1024, 64) == "scan"
    odd = Plan(program=MAMBA2.program, lowering="chunked", dtype="bfloat16", chunk_size=40)
    assert "multiple of 16" in unsupported(odd)
    quadratic = Plan(program=MAMBA2.program, lowering="quadratic", dtype="bfloat16")
    assert cuda_lowering(quadratic, 64, 64) == "scan"
    # the kernel builds the scan's source for a CUDA specialisation of a per-key plan
    kernel = TVMKernel(per_key, "unused")
    spec = KernelSpec(plan=per_key, H=2, G=2, N=64, P=64, input_dtypes=("bfloat16",) * 4,
                      target="cuda", arch="sm_90")
    assert kernel.lowering_for(spec) == "scan"
    assert kernel.source(spec) == LOWERINGS[("scan", "cuda")](spec)
