"""Ahead-of-time export: one specialised kernel as a shared library plus a JSON manifest.

    export(ssmc.ops.ssd.mamba2, target="cuda", arch="sm_90",
           shapes=dict(h=8, g=1, n=64, p=64), out_dir="ssd_export")

writes into `out_dir`
    kernel.tvmscript   the TIR that was compiled
    kernel.cu          (cuda) the CUDA C++ of kernel and host wrapper, as given to nvcc
    <function>.so      the library; for cuda it links only libtvm_ffi (+ static cudart)
    manifest.json      what `load.load(dir)` needs: argument order, axes, dtypes, sizes,
                       the program text (ssmc.ir.parse_program), versions, hashes
b and t stay symbolic; h, g, n, p and the dtypes are fixed by the export. `load.py` loads
the result with `tvm_ffi` alone (no `tvm`), e.g. on a GPU machine with only apache-tvm-ffi.
The CUDA target implements the scan lowering and the chunked one (lowerings/chunked_cuda.py;
its chunk-state workspaces are listed in the manifest's "workspaces" and allocated by load.py).
"""
from __future__ import annotations

import hashlib
import json
import numbers
import re
from pathlib import Path

from ..._version import __version__ as ssmc_version
from ...errors import (ArgumentError, BackendUnavailableError, ConfigError, ShapeError,
                       UnsupportedError)
from ...ir import Program, print_program
from ...plan import Plan
from . import SUPPORTED_DTYPES, TVMBackend, build
from .lowerings import LOWERINGS, KernelSpec, func_name
from .lowerings.chunked_cuda import operand_dtype, unsupported
from .lowerings.chunked_cuda.tiles import ChunkedCudaTile

TARGETS = ("llvm", "cuda")

FORMAT = "ssmc-tvm-export/1"


def _program(definition_or_program) -> Program:
    program = getattr(definition_or_program, "program", definition_or_program)
    if not isinstance(program, Program):
        raise ArgumentError(f"export(): expects an ssmc definition or Program, got "
                            f"{type(definition_or_program).__name__}")
    if program.backward is None:
        raise ArgumentError(f"export(): program {program.name!r} has not been analysed; pass "
                            "its definition (or the Program ssmc.passes.run_pipeline returns)")
    return program


def _check_request(target: str, arch: str, lowering: str, dtypes: dict, shapes: dict) -> dict:
    """The options and sizes of an export, checked before anything is rendered; returns the
    sizes with g defaulted to h (a program without a group axis comes with g = 1)."""
    options = (("target", target, TARGETS),
               ("lowering", lowering, sorted({name for name, _ in LOWERINGS})),
               *((what, d, SUPPORTED_DTYPES) for what, d in dtypes.items()))
    for what, value, valid in options:
        if value not in valid:
            raise ConfigError(f"export(): {what}={value!r} is not valid; valid values: "
                              f"{', '.join(valid)}")
    if target == "cuda" and not re.fullmatch(r"sm_\d+a?", str(arch)):
        raise ConfigError(f"export(): arch={arch!r} is not a CUDA architecture like sm_90")
    missing = [a for a in "hnp" if a not in shapes]
    if missing:
        raise ConfigError(f"export(): shapes needs sizes for {', '.join(missing)} "
                          f"(got {sorted(shapes)}); b and t stay symbolic")
    unknown = sorted(set(shapes) - set("btghnp"))
    if unknown:
        raise ConfigError(f"export(): shapes has unknown axes {', '.join(unknown)} "
                          "(expected h, g, n, p)")
    shapes = {a: shapes[a] for a in "hgnp" if a in shapes}
    shapes.setdefault("g", shapes["h"])
    for axis, size in shapes.items():
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size <= 0:
            raise ShapeError(f"export(): shapes[{axis!r}] must be a positive int, got {size!r}")
    if shapes["h"] % shapes["g"]:
        raise ShapeError(f"export(): heads h={shapes['h']} is not a multiple of groups "
                         f"g={shapes['g']}")
    if not TVMBackend().is_available():
        raise BackendUnavailableError(f"export(): the tvm package is needed to export "
                                      f"({TVMBackend().unavailable_reason()})")
    return shapes


def export(definition_or_program, target: str = "cuda", arch: str = "sm_90", shapes=None,
           out_dir=None, *, lowering: str = "scan", dtype: str = "float32",
           input_dtypes: dict | None = None, initial_state: bool = False,
           return_final_state: bool = False, varlen: bool = False, cu_dtype: str = "int32",
           state_dtype: str | None = None, nvcc: str = "nvcc", chunk_size: int = 64,
           tile: dict | None = None) -> Path:
    """Compile one specialisation and write it to `out_dir`; returns the directory.

    shapes: axis sizes; h, n and p are required (g defaults to h; b and t are ignored: they
    stay symbolic). dtype: the inputs' dtype (and the output's); input_dtypes overrides it per
    input name. initial_state / return_final_state / varlen: the call features compiled in.
    chunk_size / tile: the plan's chunk length and tile pins (chunked lowering).
    """
    program = _program(definition_or_program)
    unknown = sorted(set(input_dtypes or ()) - set(program.input_names))
    if unknown:
        raise ConfigError(f"export(): input_dtypes names {', '.join(map(repr, unknown))}, "
                          f"which {program.name} does not take (inputs: "
                          f"{', '.join(program.input_names)})")
    dtypes = {"dtype": dtype, **{f"input_dtypes[{k!r}]": d
                                 for k, d in (input_dtypes or {}).items()}}
    shapes = dict(shapes or {})
    if not any("g" in i.axes for i in program.inputs):
        shapes.setdefault("g", 1)   # implied, as at call time (`validate.complete_sizes`)
    shapes = _check_request(target, arch, lowering, dtypes, shapes)
    if (lowering, target) not in LOWERINGS:
        raise UnsupportedError(f"export(): the TVM backend has no {lowering!r} lowering for "
                               f"target {target!r}")
    plan = Plan(program=program, lowering=lowering, dtype=dtype,
                has_initial_state=initial_state, return_final_state=return_final_state,
                varlen=varlen, chunk_size=chunk_size,
                tile=ChunkedCudaTile.from_dict(tile) if tile else None)
    why = TVMBackend().supports(plan)
    if why is not None:
        raise UnsupportedError(f"export(): {why}")
    if program.on_grid:
        raise UnsupportedError("export(): direction='cross2d' is not exported (its functions "
                               "take the grid's height, which the manifest and load() do not "
                               "pass)")
    if lowering == "chunked" and target == "cuda":
        why = unsupported(plan, int(shapes["n"]), int(shapes["p"]))
        if why is not None:
            raise UnsupportedError(f"export(): the CUDA chunked lowering cannot run this: {why} "
                                   "(lowering='scan' can)")
    in_dtypes = tuple((input_dtypes or {}).get(i.name, dtype) for i in program.inputs)
    spec = KernelSpec(plan=plan, H=int(shapes["h"]), G=int(shapes["g"]), N=int(shapes["n"]),
                      P=int(shapes["p"]), input_dtypes=in_dtypes,
                      cu_dtype=cu_dtype if varlen else None,
                      h0_dtype=(state_dtype or spec_state(dtype)) if initial_state else None,
                      target=target)
    source = LOWERINGS[(lowering, target)](spec)
    name = func_name(plan)
    out = Path(out_dir or f"{program.name}_{lowering}_{target}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.tvmscript").write_text(source)
    lib = out / f"{name}.so"
    if target == "cuda":
        cu = build.cuda_host_source(source, name, arch)
        (out / "kernel.cu").write_text(cu)
        try:
            build.nvcc_compile(out / "kernel.cu", lib, arch, nvcc)
        except FileNotFoundError as exc:  # nvcc is not installed
            raise BackendUnavailableError(f"export(): {exc}") from None
    else:
        # generic x86-64 code: an export is meant to run on other machines
        build.compile_source(source, build.llvm_target("generic")).export_library(str(lib))
        arch = None
    manifest = {
        "format": FORMAT,
        "function": name,
        "library": lib.name,
        "library_sha256": hashlib.sha256(lib.read_bytes()).hexdigest(),
        "target": target,
        "arch": arch,
        "lowering": lowering,
        "program_name": program.name,
        "program": print_program(program),
        "inputs": [{"name": i.name, "axes": list(i.axes), "dtype": d}
                   for i, d in zip(program.inputs, in_dtypes)],
        "sizes": {a: spec_size(spec, a) for a in "hgnp"},
        "symbolic": ["b", "t"],
        "dtype": dtype,
        "state_dtype": spec.state_dtype,
        "directions": [d.value for d in program.recurrence.directions],
        "has_initial_state": initial_state,
        "initial_state_dtype": spec.h0_dtype,
        "return_final_state": return_final_state,
        "varlen": varlen,
        "cu_seqlens_dtype": spec.cu_dtype,
        "argument_order": _argument_order(program, plan, target),
        "chunk_size": plan.chunk_size,
        "workspaces": _workspaces(plan, target),
        "ssmc_version": ssmc_version,
        "tvm_version": build.tvm_version(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def spec_state(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def spec_size(spec: KernelSpec, axis: str) -> int:
    return {"h": spec.H, "g": spec.G, "n": spec.N, "p": spec.P}[axis]


def _workspaces(plan: Plan, target: str) -> list[dict]:
    """Scratch arguments the caller allocates (after the outputs): the CUDA chunked lowering's
    chunk states, chunk log-decays and, for packed sequences, its chunk -> sequence map.
    `dims` name sizes; "slots" is B * max(ceil(T / chunk_size), 1), or T // chunk_size + S for
    packed sequences (lowerings/chunked_cuda.py: workspace_shapes)."""
    if plan.lowering != "chunked" or target != "cuda":
        return []
    out = [{"name": "chunk_states", "dims": ["slots", "h", "p", "n"],
            "dtype": operand_dtype(plan)},
           {"name": "chunk_decay", "dims": ["slots", "h"], "dtype": "float32"}]
    if plan.varlen:
        out.append({"name": "chunk_seq", "dims": ["slots"], "dtype": "int32"})
    return out


def _argument_order(program: Program, plan: Plan, target: str = "llvm") -> list[str]:
    args = [i.name for i in program.inputs]
    if plan.varlen:
        args.append("cu_seqlens")
    if plan.has_initial_state:
        args.append("initial_state")
    args.append("out")
    if plan.return_final_state:
        args.append("final_state")
    if len(program.recurrence.directions) > 1:
        args.append("y_work")
    args += [w["name"] for w in _workspaces(plan, target)]
    return args
