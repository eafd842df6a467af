"""Every SSMC_* environment variable, read in one place."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

BACKENDS = ("auto", "triton", "tvm", "reference")
LOWERINGS = ("auto", "scan", "chunked", "quadratic")
AUTOTUNE_MODES = ("off", "cached", "full")


def _choice(var: str, valid: tuple[str, ...], default: str) -> str:
    value = os.environ.get(var, default).strip().lower() or default
    if value not in valid:
        raise ConfigError(f"{var}={value!r} is not valid; valid values: {', '.join(valid)}")
    return value


def backend() -> str:
    """SSMC_BACKEND: which backend `backend="auto"` resolves to (default: auto)."""
    return _choice("SSMC_BACKEND", BACKENDS, "auto")


def debug_level() -> int:
    """SSMC_DEBUG: 0 quiet, 1 log choices, 2 print the IR after each pass."""
    raw = os.environ.get("SSMC_DEBUG", "0")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"SSMC_DEBUG={raw!r} is not valid; expected an integer 0, 1 or "
                          "2") from None


def cache_dir() -> Path:
    """SSMC_CACHE_DIR: where generated kernels and tuning results live."""
    explicit = os.environ.get("SSMC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ssmc"


def verify_ir() -> bool:
    """SSMC_VERIFY_IR: run the IR verifier after every pass (always on in tests)."""
    return os.environ.get("SSMC_VERIFY_IR", "1") not in ("0", "false", "no")


def autotune() -> str:
    """SSMC_AUTOTUNE: off (cost model and the backends' built-in tiles), cached (use tuned
    configs from the cache or the shipped defaults, never measure) or full (the default: tune a
    new shape bucket on first use). Only CUDA devices are tuned implicitly."""
    return _choice("SSMC_AUTOTUNE", AUTOTUNE_MODES, "full")
