"""Load a kernel written by `export.export` with `tvm_ffi` alone (no `tvm` compiler package).

CUDA exports need only tvm_ffi. CPU (llvm) exports also import `tvm`, whose runtime provides
the thread pool that TVM's LLVM code calls.

    kernel = load("ssd_export")
    y = kernel(x, dt, A, B, C)                                   # tensors in manifest order
    y, h = kernel(x, dt, A, B, C, initial_state=h0)              # when exported with states

Arguments are checked against the manifest (count, dtypes, sizes, device) before the call,
since the library's own checks give terse messages. Outputs are allocated with torch on the
inputs' device; tensors go to the library zero-copy through DLPack.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ...errors import DTypeError, ShapeError

FORMAT = "ssmc-tvm-export/1"


class ExportedKernel:
    def __init__(self, directory: Path, manifest: dict, function):
        self.directory = directory
        self.manifest = manifest
        self.function = function
        self.inputs = manifest["inputs"]
        self.sizes = manifest["sizes"]
        self.D = len(manifest["directions"])

    def __repr__(self):
        m = self.manifest
        return (f"<ssmc exported {m['program_name']} {m['lowering']} on {m['target']} "
                f"h={self.sizes['h']} g={self.sizes['g']} n={self.sizes['n']} "
                f"p={self.sizes['p']} {m['dtype']}>")

    def _check(self, tensors):
        m, fn = self.manifest, f"{self.manifest['program_name']}()"
        if len(tensors) != len(self.inputs):
            raise TypeError(f"{fn} takes {len(self.inputs)} tensors "
                            f"({', '.join(i['name'] for i in self.inputs)}), got {len(tensors)}")
        want_device = "cuda" if m["target"] == "cuda" else "cpu"
        bt: dict[str, int] = {}
        for spec, x in zip(self.inputs, tensors):
            name = spec["name"]
            if not isinstance(x, torch.Tensor):
                raise DTypeError(f"{fn}: {name!r} must be a torch.Tensor")
            if x.device.type != want_device:
                raise DTypeError(f"{fn}: {name!r} is on {x.device}; this {m['target']} export "
                                 f"runs on {want_device}")
            if str(x.dtype).split(".")[1] != spec["dtype"]:
                raise DTypeError(f"{fn}: {name!r} has dtype {x.dtype}; the export was compiled "
                                 f"for {spec['dtype']}")
            if x.dim() != len(spec["axes"]):
                raise ShapeError(f"{fn}: {name!r} has shape {tuple(x.shape)}; expected axes "
                                 f"{' '.join(spec['axes'])}")
            for axis, size in zip(spec["axes"], x.shape):
                if axis in self.sizes and self.sizes[axis] != size:
                    raise ShapeError(f"{fn}: {name!r} has {axis}={size}; the export was "
                                     f"compiled for {axis}={self.sizes[axis]}")
                if axis in ("b", "t"):
                    if bt.setdefault(axis, int(size)) != size:
                        raise ShapeError(f"{fn}: {name!r} has {axis}={size}, others "
                                         f"{axis}={bt[axis]}")
        return bt.get("b", 1), bt.get("t", 1)

    def __call__(self, *tensors, initial_state=None, cu_seqlens=None):
        m = self.manifest
        B, T = self._check(tensors)
        device = tensors[0].device
        # TVM's DLPack import rejects strided views; copy those (only those)
        args = [x if x.is_contiguous() else x.contiguous() for x in tensors]
        H, N, P = self.sizes["h"], self.sizes["n"], self.sizes["p"]
        if m["varlen"]:
            if cu_seqlens is None:
                raise TypeError("this export was compiled for packed sequences: pass cu_seqlens")
            if str(cu_seqlens.dtype).split(".")[1] != m["cu_seqlens_dtype"]:
                raise DTypeError(f"cu_seqlens has dtype {cu_seqlens.dtype}; expected "
                                 f"{m['cu_seqlens_dtype']}")
            S = cu_seqlens.numel() - 1
            args.append(cu_seqlens.contiguous())
        else:
            if cu_seqlens is not None:
                raise TypeError("this export was compiled without cu_seqlens")
            S = B
        if m["has_initial_state"]:
            if initial_state is None:
                raise TypeError("this export was compiled with an initial state: pass "
                                "initial_state")
            want = (self.D, S, H, N, P) if self.D > 1 else (S, H, N, P)
            if tuple(initial_state.shape) != want:
                raise ShapeError(f"initial_state has shape {tuple(initial_state.shape)}; "
                                 f"expected {want}")
            h0 = initial_state.contiguous()
            args.append(h0 if self.D > 1 else h0.unsqueeze(0))
        elif initial_state is not None:
            raise TypeError("this export was compiled without an initial state")
        out = torch.empty(B, T, H, P, dtype=getattr(torch, m["dtype"]), device=device)
        args.append(out)
        final = None
        if m["return_final_state"]:
            final = torch.empty(self.D, S, H, N, P, dtype=getattr(torch, m["state_dtype"]),
                                device=device)
            args.append(final)
        if self.D > 1:
            acc = torch.float64 if m["dtype"] == "float64" else torch.float32
            args.append(torch.empty(B, T, H, P, dtype=acc, device=device))
        for ws in m.get("workspaces", ()):
            # scratch of the CUDA chunked lowering (export._workspaces)
            Q = m["chunk_size"]
            slots = T // Q + S if m["varlen"] else B * max(-(-T // Q), 1)
            size = dict(slots=max(slots, 1), h=H, n=N, p=P)
            args.append(torch.empty([size[d] for d in ws["dims"]],
                                    dtype=getattr(torch, ws["dtype"]), device=device))
        if B * T > 0 or final is not None:
            self.function(*args)
        if final is None:
            return out
        return out, (final if self.D > 1 else final[0])


def load(directory) -> ExportedKernel:
    """Load an exported kernel directory (manifest.json + library) with tvm_ffi only."""
    import tvm_ffi
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: not an ssmc TVM export (format "
                         f"{manifest.get('format')!r}, expected {FORMAT!r})")
    lib = directory / manifest["library"]
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    if digest != manifest["library_sha256"]:
        raise ValueError(f"{lib}: the library does not match its manifest (sha256 {digest[:12]} "
                         f"!= {manifest['library_sha256'][:12]})")
    if manifest["target"] == "llvm":
        # CPU libraries from TVM's LLVM codegen call the TVM runtime for their thread pool
        # (T.parallel) and workspaces; those symbols live in the `tvm` package, not in
        # tvm_ffi. CUDA exports are built with a C++ host (cuda_host) and need tvm_ffi only.
        try:
            import tvm  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"{directory}: a CPU (llvm) export needs the `tvm` package's "
                              "runtime; CUDA exports need only tvm_ffi") from exc
    module = tvm_ffi.load_module(str(lib))
    return ExportedKernel(directory, manifest, module[manifest["function"]])
