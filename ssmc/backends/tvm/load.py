"""Load a kernel written by `export.export` with `tvm_ffi` alone (no `tvm` compiler package).

CUDA exports need only tvm_ffi. CPU (llvm) exports also import `tvm`, whose runtime provides
the thread pool that TVM's LLVM code calls.

    kernel = ssmc.load("ssd_export")
    y = kernel(x, dt, A, B, C, D, z)                     # as a compiled op: by position or name
    y, h = kernel(x, dt, A, B, C, D, z, initial_state=h0, return_final_state=True)

A call is bound as a compiled op's is (`ssmc.validate.bind`), then checked against the manifest
(device, dtypes, the sizes of h, g, n, p, the compiled-in features) before the library runs,
since the library's own checks give terse messages. Outputs are allocated with torch on the
inputs' device; tensors go to the library zero-copy through DLPack.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ...errors import (ArgumentError, BackendUnavailableError, ConfigError, DeviceError,
                       DTypeError, ShapeError)
from ...ir import parse_program
from ...validate import Bound, bind, expected_state_shape

FORMAT = "ssmc-tvm-export/1"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[1]


class ExportedKernel:
    """One exported specialisation, called like a compiled op. Calls the export does not cover
    (another device, dtype or size of h, g, n, p; a state or packed sequences it was not
    compiled for) raise an `ssmc.SSMCError` naming what the export covers."""

    def __init__(self, directory: Path, manifest: dict, function):
        self.directory = directory
        self.manifest = manifest
        self.function = function
        self.program = parse_program(manifest["program"])
        self.inputs = manifest["inputs"]
        self.sizes = manifest["sizes"]
        self.D = len(manifest["directions"])
        self.device_type = "cuda" if manifest["target"] == "cuda" else "cpu"

    def __repr__(self):
        m = self.manifest
        return (f"<ssmc exported {m['program_name']} {m['lowering']} on {m['target']} "
                f"h={self.sizes['h']} g={self.sizes['g']} n={self.sizes['n']} "
                f"p={self.sizes['p']} {m['dtype']}>")

    def _bind(self, args: tuple, kwargs: dict) -> tuple[Bound, bool]:
        """The checked call and whether it returns the final state (by default: when the
        export computes one)."""
        m = self.manifest
        fn = f"{self.program.name}() (exported for {m['target']})"
        want_final = bool(kwargs.pop("return_final_state", m["return_final_state"]))
        h0 = kwargs.pop("initial_state", None)
        bound = bind(self.program, args, kwargs)  # the state after the inputs' coverage
        if bound.device.type != self.device_type:
            raise DeviceError(f"{fn}: the inputs are on {bound.device}; this {m['target']} "
                              f"export runs on {self.device_type} tensors")
        for spec in self.inputs:
            actual = _dtype_name(bound.tensors[spec["name"]].dtype)
            if actual != spec["dtype"]:
                raise DTypeError(f"{fn}: {spec['name']!r} has dtype {actual}; the export was "
                                 f"compiled for {spec['dtype']}")
        for axis, size in self.sizes.items():
            if bound.sizes[axis] != size:
                users = [i.name for i in self.program.inputs if axis in i.axes]
                raise ShapeError(f"{fn}: {axis}={bound.sizes[axis]} (in "
                                 f"{', '.join(map(repr, users)) or 'no input: implied'}); the "
                                 f"export was compiled for {axis}={size} (b and t may vary)")
        if h0 is not None:
            bound = bind(self.program, args, {**kwargs, "initial_state": h0})
        self._check_features(fn, bound, want_final)
        return bound, want_final

    def _check_features(self, fn: str, bound: Bound, want_final: bool) -> None:
        m = self.manifest
        features = (("initial_state", bound.initial_state is not None, m["has_initial_state"],
                     "initial_state=True"),
                    ("cu_seqlens", bound.cu_seqlens is not None, m["varlen"], "varlen=True"),
                    ("return_final_state", want_final, m["return_final_state"],
                     "return_final_state=True"))
        for name, asked, compiled, option in features:
            if asked and not compiled:
                raise ArgumentError(f"{fn}: {name!r} was given but the export was compiled "
                                    f"without it (export with {option})")
        if m["varlen"] and bound.cu_seqlens is None:
            raise ArgumentError(f"{fn}: the export was compiled for packed sequences: pass "
                                "'cu_seqlens'")
        for name, x, want in (("cu_seqlens", bound.cu_seqlens, m["cu_seqlens_dtype"]),
                              ("initial_state", bound.initial_state,
                               m["initial_state_dtype"])):
            if x is not None and _dtype_name(x.dtype) != want:
                raise DTypeError(f"{fn}: {name!r} has dtype {_dtype_name(x.dtype)}; the export "
                                 f"was compiled for {want}")

    def __call__(self, *args, **kwargs):
        m = self.manifest
        bound, want_final = self._bind(args, kwargs)
        B, T, S = bound.sizes["b"], bound.sizes["t"], bound.num_states
        device = bound.device
        # TVM's DLPack import rejects strided views; copy those (only those)
        call = [x if x.is_contiguous() else x.contiguous() for x in bound.tensors.values()]
        H, N, P = self.sizes["h"], self.sizes["n"], self.sizes["p"]
        if m["varlen"]:
            call.append(bound.cu_seqlens.contiguous())
        if m["has_initial_state"]:
            h0 = bound.initial_state
            if h0 is None:  # a zero state is the same as none
                h0 = torch.zeros(expected_state_shape(self.program, bound), device=device,
                                 dtype=getattr(torch, m["initial_state_dtype"]))
            h0 = h0.contiguous()
            call.append(h0 if self.D > 1 else h0.unsqueeze(0))
        out = torch.empty(B, T, H, P, dtype=getattr(torch, m["dtype"]), device=device)
        call.append(out)
        final = None
        if m["return_final_state"]:
            final = torch.empty(self.D, S, H, N, P, dtype=getattr(torch, m["state_dtype"]),
                                device=device)
            call.append(final)
        if self.D > 1:
            acc = torch.float64 if m["dtype"] == "float64" else torch.float32
            call.append(torch.empty(B, T, H, P, dtype=acc, device=device))
        for ws in m.get("workspaces", ()):
            # scratch of the CUDA chunked lowering (export._workspaces)
            Q = m["chunk_size"]
            slots = T // Q + S if m["varlen"] else B * max(-(-T // Q), 1)
            size = dict(slots=max(slots, 1), h=H, n=N, p=P)
            call.append(torch.empty([size[d] for d in ws["dims"]],
                                    dtype=getattr(torch, ws["dtype"]), device=device))
        if B * T > 0 or final is not None:
            self.function(*call)
        if not want_final:
            return out
        return out, (final if self.D > 1 else final[0])


def _read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"load(): {directory} is not an ssmc export (no manifest.json; "
                          "write one with `ssmc export` or ssmc.export)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"load(): {path} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ConfigError(f"load(): {directory} is not an ssmc TVM export (format {found!r}, "
                          f"expected {FORMAT!r})")
    return manifest


def load(directory) -> ExportedKernel:
    """Load an exported kernel directory (manifest.json + library) with tvm_ffi only."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    lib = directory / manifest["library"]
    try:
        digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"load(): the export's library cannot be read: {exc}") from None
    if digest != manifest["library_sha256"]:
        raise ConfigError(f"load(): {lib}: the library does not match its manifest (sha256 "
                          f"{digest[:12]} != {manifest['library_sha256'][:12]})")
    try:  # imported here, not at the top: what an export needs depends on its target
        import tvm_ffi
        if manifest["target"] == "llvm":
            # CPU libraries from TVM's LLVM codegen call the TVM runtime for their thread pool
            # (T.parallel) and workspaces; those symbols live in the `tvm` package, not in
            # tvm_ffi. CUDA exports are built with a C++ host (cuda_host) and need tvm_ffi only.
            import tvm  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            f"load(): {directory}: {exc.name or 'a package'} is missing; a CPU (llvm) export "
            "needs the `tvm` package's runtime, a CUDA export only apache-tvm-ffi") from exc
    module = tvm_ffi.load_module(str(lib))
    return ExportedKernel(directory, manifest, module[manifest["function"]])
