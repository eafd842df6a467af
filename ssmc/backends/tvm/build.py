"""Targets, compilation and the on-disk kernel cache of the TVM backend.

A cache entry is a directory `<cache_dir>/tvm/<plan cache key>/<specialisation>/` holding
    kernel.tvmscript  the TVMScript source that was compiled
    kernel.so         the compiled library (`export_library`)
    meta.json         sha256 of both files, the function name, tvm's version
An entry is used only when its recorded source hash equals the hash of the source generated
now and the library's hash matches its bytes; anything missing, unreadable or mismatched is a
miss and is rebuilt (never a crash). Builds hold a file lock so that concurrent processes do not
build the same entry twice or read a half-written one. No pickle anywhere.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from ... import config

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

SOURCE = "kernel.tvmscript"
LIBRARY = "kernel.so"
META = "meta.json"


def tvm_version() -> str:
    import tvm
    return str(tvm.__version__)


def host_cpu() -> str:
    """LLVM's name for this machine's CPU ("znver4", "skylake-avx512", ...), or "generic"."""
    try:
        import tvm
        return str(tvm.target.codegen.llvm_get_system_cpu()) or "generic"
    except Exception:  # noqa: BLE001 - an unknown CPU falls back to generic x86-64 code
        return "generic"


def llvm_target(mcpu: str | None = None):
    """The LLVM target for this machine's CPU. Plain "llvm" means generic x86-64 (SSE2 only);
    naming the CPU lets LLVM use AVX2/AVX-512 and FMA: the SSD scan ran ~3x faster with
    mcpu=znver4 than with the generic target on the 2-core EPYC box. The CPU name is part of
    the backend's cache tag, so a shared cache never hands one CPU's code to another."""
    import tvm
    mcpu = host_cpu() if mcpu is None else mcpu
    if mcpu == "generic":
        return tvm.target.Target("llvm")
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu})


def compile_source(source: str, target=None):
    """TVMScript text -> a compiled executable (tvm.runtime.Executable)."""
    import tvm
    func = tvm.script.from_source(source)
    return tvm.compile(func, target=target or llvm_target())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def try_load(entry: Path, source: str, name: str):
    """The cached function for `source`, or None on any kind of miss."""
    try:
        meta = json.loads((entry / META).read_text())
        if meta.get("source_sha256") != _sha(source.encode()) or meta.get("function") != name:
            return None
        lib = entry / LIBRARY
        if meta.get("library_sha256") != _sha(lib.read_bytes()):
            return None
        import tvm  # noqa: F401 - LLVM-built libraries call into TVM's runtime (thread pool)
        import tvm_ffi
        module = tvm_ffi.load_module(str(lib))
        return module[name]
    except Exception:  # noqa: BLE001 - a corrupt or foreign entry is a miss by contract
        return None


def _atomic_write(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build_entry(entry: Path, source: str, name: str, cuda_arch: str | None = None):
    """Compile `source` into `entry`: for the CPU with TVM's LLVM codegen; for CUDA (when
    `cuda_arch` is given) as one .cu file compiled by nvcc (see `cuda_host_source`)."""
    entry.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry, prefix="build.", suffix=".so")
    os.close(fd)
    try:
        if cuda_arch is None:
            compile_source(source).export_library(tmp)
        else:
            cu = entry / "kernel.cu"
            _atomic_write(cu, cuda_host_source(source, name, cuda_arch).encode())
            nvcc_compile(cu, Path(tmp), cuda_arch)
        os.replace(tmp, entry / LIBRARY)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _atomic_write(entry / SOURCE, source.encode())
    meta = {"function": name, "source_sha256": _sha(source.encode()),
            "library_sha256": _sha((entry / LIBRARY).read_bytes()), "tvm": tvm_version(),
            "target": "llvm" if cuda_arch is None else f"cuda {cuda_arch}"}
    _atomic_write(entry / META, json.dumps(meta, indent=1).encode())


def cached_function(key: str, spec_tag: str, source: str, name: str,
                    cuda_arch: str | None = None):
    """try_load, lock, try_load again, build, load. CPU kernels fall back to an in-memory build
    when the cache directory cannot be written; CUDA ones need the directory (nvcc)."""
    entry = config.cache_dir() / "tvm" / key / spec_tag
    fn = try_load(entry, source, name)
    if fn is not None:
        return fn
    try:
        with file_lock(entry.parent / (spec_tag + ".lock")):
            fn = try_load(entry, source, name)
            if fn is not None:
                return fn
            build_entry(entry, source, name, cuda_arch)
    except OSError:
        if cuda_arch is not None:
            raise
        return compile_source(source)[name]
    fn = try_load(entry, source, name)
    if fn is None:
        if cuda_arch is not None:
            raise RuntimeError(f"the CUDA kernel built in {entry} could not be loaded")
        return compile_source(source)[name]  # written but unreadable (e.g. a full disk)
    return fn


# ---- CUDA: one .cu translation unit compiled by nvcc into a library that needs only tvm_ffi

def cuda_target(arch: str = "sm_90", host: str = "cuda_host"):
    import tvm
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=host)


def cuda_host_source(source: str, name: str, arch: str = "sm_90") -> str:
    """TVMScript text -> one CUDA C++ file holding the kernel and its tvm-ffi host wrapper.

    Built with host="cuda_host" (not llvm) so that the host side is C++ that nvcc compiles
    together with the device code; the resulting library then needs no TVM runtime, only
    libtvm_ffi (STACK.md, path 2).
    """
    import re

    import tvm
    func = tvm.script.from_source(source)
    mod = tvm.IRModule({name: func})
    lib = tvm.tirx.build(mod, target=cuda_target(arch))
    cu = tvm.backend.cuda.export_cuda_host(lib)
    # a lowering may ask for a minimum of resident blocks per SM of some kernels (ptxas then
    # caps their registers): a comment line "# ssmc.cuda_min_blocks_per_sm = K @ i,j" in the
    # TVMScript text, i, j the kernels' order in the function (TVM names them name_kernel,
    # name_kernel_1, ...)
    mark = re.search(r"^\s*# ssmc\.cuda_min_blocks_per_sm = (\d+) @ ([\d,]+)$", source, re.M)
    if mark and int(mark.group(1)) > 0:
        for k in mark.group(2).split(","):
            kname = f"{name}_kernel" + (f"_{k}" if int(k) else "")
            cu = re.sub(rf"__launch_bounds__\((\d+)\) {kname}\(",
                        rf"__launch_bounds__(\1, {mark.group(1)}) {kname}(", cu)
    return cu


def tvm_ffi_paths() -> tuple[str, str]:
    """(include dir, lib dir) of the installed apache-tvm-ffi."""
    import tvm_ffi
    import tvm_ffi.libinfo as info
    include = info.find_include_path() if hasattr(info, "find_include_path") else \
        os.path.join(os.path.dirname(tvm_ffi.__file__), "include")
    lib = os.path.join(os.path.dirname(tvm_ffi.__file__), "lib")
    return str(include), lib


def nvcc_compile(cu_path: Path, so_path: Path, arch: str = "sm_90", nvcc: str = "nvcc",
                 extra: tuple[str, ...] = ()) -> list[str]:
    """nvcc -shared against tvm_ffi only (the CUDA runtime is linked statically, the driver is
    resolved at load time; no -lcuda: toolkits without a driver have no stub for it)."""
    import shutil
    import subprocess
    if shutil.which(nvcc) is None:
        raise FileNotFoundError(f"{nvcc!r} was not found on PATH; it is needed to compile the "
                                "exported CUDA source")
    include, libdir = tvm_ffi_paths()
    cc = arch.replace("sm_", "")
    cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3",
           f"-gencode=arch=compute_{cc},code=sm_{cc}", "-w", f"-I{include}", str(cu_path),
           "-o", str(so_path), f"-L{libdir}", "-ltvm_ffi", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed ({done.returncode}):\n{' '.join(cmd)}\n{done.stderr}")
    return cmd
