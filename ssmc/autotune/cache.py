"""The persistent tuning cache: one directory per device model and software stack, one checked
JSON entry per key.

    <SSMC_CACHE_DIR>/autotune/<device slug>/<stack hash>/stack.json     what the stack is
    <SSMC_CACHE_DIR>/autotune/<device slug>/<stack hash>/<key>.json     one tuned config

The stack hash covers the GPU name, compute capability, CUDA and driver versions and the
triton / tvm / torch / ssmc versions, so a driver or compiler upgrade starts a fresh cache
instead of reusing configs measured under another stack. A key names the definition (hash of
its IR structure), the lowering policy, the dtype, the call features and the shape bucket.

Entries are written atomically (temp file + rename, with the kernel cache's hash line) and
tuned under a per-key file lock: of several processes that miss the same key at once (8 ranks
on one host), one tunes; the others wait on the lock, then read its entry. A corrupt or
unreadable entry is reported once per process and treated as a miss (re-tuned, overwritten);
an unwritable cache directory is reported once and the process keeps its results in memory.
Nothing here raises into the op.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Callable

from .. import config
from .._version import __version__
from ..backends.cache import read_checked, write_checked
from ..plan import DTYPE_SHORT
from ..tiles import next_pow2
from .space import Config

FORMAT = 1
#: how long a process waits for another one tuning the same key before giving up on it
LOCK_TIMEOUT_S = 1800.0


# --------------------------------------------------------------------------- keys

def shape_bucket(sizes: dict[str, int]) -> dict[str, int]:
    """Powers of two of b*t (tokens) and t; n, p, h and g exactly (they change the code)."""
    b, t = int(sizes.get("b", 1)), int(sizes.get("t", 1))
    out = {"bt": next_pow2(max(b * t, 1)), "t": next_pow2(max(t, 1))}
    for a in "hgnp":
        out[a] = int(sizes.get(a, 1))
    return out


def definition_hash(program) -> str:
    return hashlib.sha256(program.structural_key().encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TuneKey:
    name: str                 # the definition's name (readability only)
    definition: str           # definition_hash(program)
    backend: str              # backend policy: auto | triton | tvm | reference
    lowering: str             # lowering policy: auto (every legal lowering) or a fixed one
    dtype: str                # torch dtype name
    bucket: tuple[tuple[str, int], ...]
    flags: str = ""           # _h0 / _hT / _varlen

    @staticmethod
    def make(program, *, backend: str, lowering: str, dtype: str, sizes: dict[str, int],
             has_initial_state=False, return_final_state=False, varlen=False) -> "TuneKey":
        flags = "".join(f for f, on in (("_h0", has_initial_state), ("_hT", return_final_state),
                                        ("_varlen", varlen)) if on)
        return TuneKey(program.name, definition_hash(program), backend, lowering, dtype,
                       tuple(shape_bucket(sizes).items()), flags)

    def text(self) -> str:
        """`mamba2_auto_bf16_bt32768_t4096_h80_g1_n128_p64_<sha8>`: readable prefix + hash."""
        bucket = "_".join(f"{a}{v}" for a, v in self.bucket)
        body = "|".join([self.name, self.definition, self.backend, self.lowering, self.dtype,
                         bucket, self.flags, str(FORMAT)])
        digest = hashlib.sha256(body.encode()).hexdigest()[:8]
        safe = re.sub(r"[^A-Za-z0-9]+", "-", self.name)
        return (f"{safe}_{self.lowering}_{DTYPE_SHORT.get(self.dtype, self.dtype)}{self.flags}"
                f"_{bucket}_{digest}")


# --------------------------------------------------------------------------- environment

def _dist_version(*names: str) -> str:
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return "none"


def _driver_version() -> str:
    try:
        import ctypes
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"{v.value // 1000}.{v.value % 1000 // 10}"
    except Exception:  # noqa: BLE001 - no driver: not part of the stack
        pass
    return "none"


def environment(device=None) -> dict:
    """The device model and software stack a tuned config is valid for."""
    import torch
    env = {"torch": torch.__version__, "triton": _dist_version("triton"),
           "tvm": _dist_version("apache-tvm", "tvm"), "ssmc": __version__}
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   cuda=str(torch.version.cuda), driver=_driver_version())
    else:
        import platform
        env.update(gpu="none", cpu=platform.machine() or "unknown",
                   cpu_model=_cpu_model())
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def device_slug(env: dict) -> str:
    if env.get("gpu", "none") != "none":
        name = env["gpu"]
        cc = env.get("capability", "").replace(".", "")
        return re.sub(r"[^a-z0-9]+", "-", f"{name} sm{cc}".lower()).strip("-")
    return re.sub(r"[^a-z0-9]+", "-", f"cpu {env.get('cpu', '')}".lower()).strip("-")


def stack_hash(env: dict) -> str:
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- records

def validate_record(data) -> dict:
    """A cache record, checked; raises ValueError when malformed."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a tuning record of format %d" % FORMAT)
    Config.from_json(data.get("config"))
    for k in ("median_ms", "default_ms"):
        v = data.get(k)
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"{k} is not a number")
    return data


def record_config(record: dict) -> Config:
    return Config.from_json(record["config"])


_reported: set = set()
_report_lock = threading.Lock()


def report_once(what: str, message: str, stream=None) -> None:
    """Print `message` once per process for `what` (a path, a key)."""
    with _report_lock:
        if what in _reported:
            return
        _reported.add(what)
    print(f"ssmc: autotune: {message}", file=stream or sys.stderr)


@contextlib.contextmanager
def key_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S, poll_s: float = 0.05):
    """An exclusive lock beside `path`; yields True when held, False when it could not be
    taken (no fcntl, an unwritable directory, or `timeout_s` passed)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
        yield False
        return
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")
    except OSError:
        yield False
        return
    with f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(poll_s)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class TuneCache:
    """The cache for one device model and software stack."""

    def __init__(self, env: dict, root: Path | None = None):
        self.env = env
        self.root = Path(root) if root is not None else config.cache_dir() / "autotune"
        self.dir = self.root / device_slug(env) / stack_hash(env)
        self._memory: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._writable = True

    @staticmethod
    def for_device(device, root: Path | None = None) -> "TuneCache":
        return TuneCache(environment(device), root)

    def path(self, key: TuneKey) -> Path:
        return self.dir / f"{key.text()}.json"

    # -- reading
    def load(self, key: TuneKey) -> dict | None:
        """The stored record, or None (missing, corrupt, unreadable: reported once)."""
        text = key.text()
        with self._lock:
            if text in self._memory:
                return self._memory[text]
        path = self.path(key)
        try:
            exists = path.exists()
        except OSError as e:
            report_once(str(self.dir), f"cannot read the tuning cache ({e}); tuning results "
                                       "are kept in memory")
            return None
        if not exists:
            return None
        body = read_checked(path)
        try:
            if body is None:
                raise ValueError("hash line missing or not matching")
            record = validate_record(json.loads(body))
        except (ValueError, TypeError) as e:
            report_once(str(path), f"ignoring corrupt cache entry {path.name} ({e}); it will "
                                   "be re-tuned and rewritten")
            return None
        with self._lock:
            self._memory[text] = record
        return record

    # -- writing
    def store(self, key: TuneKey, record: dict) -> bool:
        record = dict(record, format=FORMAT, key=key.text())
        with self._lock:
            self._memory[key.text()] = record
        if not self._writable:
            return False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            manifest = self.dir / "stack.json"
            if read_checked(manifest) is None:
                write_checked(manifest, json.dumps(self.env, indent=1, sort_keys=True))
            write_checked(self.path(key), json.dumps(record, indent=1, sort_keys=True))
            return True
        except OSError as e:
            self._writable = False
            report_once(str(self.dir), f"cannot write the tuning cache ({e}); tuning results "
                                       "are kept in memory for this process")
            return False

    def get_or_tune(self, key: TuneKey, tune: Callable[[], dict | None],
                    lock_timeout_s: float = LOCK_TIMEOUT_S) -> tuple[dict | None, str]:
        """(record, how): how is "hit" (found), "waited" (another process tuned it while this
        one waited on the lock), "tuned" (tuned here) or "failed" (tune() gave nothing)."""
        record = self.load(key)
        if record is not None:
            return record, "hit"
        path = self.path(key)
        waited_from = time.monotonic()
        with key_lock(path, lock_timeout_s) as held:
            if held:
                record = self.load(key)
                if record is not None:
                    return record, "waited"
            elif time.monotonic() - waited_from >= lock_timeout_s:
                report_once(f"lock:{path}", f"gave up waiting {lock_timeout_s:g} s for another "
                                            f"process tuning {key.text()}; tuning here")
            record = tune()
            if record is None:
                return None, "failed"
            self.store(key, record)
            return self.load(key) or record, "tuned"

    # -- listing
    def entries(self) -> list[tuple[Path, dict | None]]:
        return _entries(self.dir)


def _entries(directory: Path) -> list[tuple[Path, dict | None]]:
    out = []
    try:
        files = sorted(directory.glob("*.json"))
    except OSError:
        return out
    for f in files:
        if f.name == "stack.json":
            continue
        body = read_checked(f)
        try:
            record = validate_record(json.loads(body)) if body is not None else None
        except (ValueError, TypeError):
            record = None
        out.append((f, record))
    return out


def all_caches(root: Path | None = None) -> list[tuple[Path, dict | None, list]]:
    """Every (directory, stack manifest, entries) under the cache root."""
    root = Path(root) if root is not None else config.cache_dir() / "autotune"
    out = []
    try:
        dirs = sorted(p for p in root.glob("*/*") if p.is_dir())
    except OSError:
        return out
    for d in dirs:
        body = read_checked(d / "stack.json")
        try:
            env = json.loads(body) if body is not None else None
        except ValueError:
            env = None
        out.append((d, env, _entries(d)))
    return out


# --------------------------------------------------------------------------- shipped defaults

def packaged_defaults(model: str) -> dict[str, dict]:
    """The entries of `defaults/<model>.json` (key text -> record), shipped in the package and
    produced by `ssmc tune --export-defaults` on that GPU; {} when there is none or it is bad."""
    return dict(_packaged(model))


_packaged_memo: dict[str, dict] = {}


def _packaged(model: str) -> dict:
    if model in _packaged_memo:
        return _packaged_memo[model]
    entries: dict = {}
    try:
        text = resources.files(__package__).joinpath("defaults", f"{model}.json").read_text()
    except (FileNotFoundError, OSError, ModuleNotFoundError):
        text = None
    if text is not None:
        try:
            entries = read_defaults(text)
        except ValueError as e:
            report_once(f"defaults:{model}", f"ignoring shipped defaults {model}.json ({e})")
    _packaged_memo[model] = entries
    return entries


def read_defaults(text: str) -> dict[str, dict]:
    """The entries of a shipped-defaults file's text; ValueError when malformed."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a defaults file of format {FORMAT}")
        return {k: validate_record(rec) for k, rec in data.get("entries", {}).items()}
    except (TypeError, AttributeError) as e:
        raise ValueError(str(e)) from None


def export_defaults(cache: TuneCache, model: str, path: Path) -> int:
    """Write the cache's entries as a shipped-defaults file; returns the number of entries."""
    entries = {rec["key"]: rec for _, rec in cache.entries() if rec is not None}
    data = {"format": FORMAT, "device": model, "environment": cache.env,
            "produced_by": "ssmc tune --export-defaults", "entries": entries}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return len(entries)
