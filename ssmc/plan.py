"""The Plan: everything a backend sees, and nothing from the DSL."""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .ir import Program

DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class Plan:
    """One kernel specialisation: the analysed program, the lowering, dtype and call features.

    Shapes are not part of a plan (kernels take sizes at run time); tile parameters are, since
    they change the generated code.
    """

    program: Program
    lowering: str
    dtype: str                       # torch dtype name of the inputs, e.g. "bfloat16"
    has_initial_state: bool = False
    return_final_state: bool = False
    varlen: bool = False
    chunk_size: int = 64
    #: None (the lowering's built-in tiles) or the backend lowering's `ssmc.tiles.Tile`
    tile: object = None

    def tile_dict(self) -> dict[str, int]:
        """The tile parameters that are set, by name."""
        return {} if self.tile is None else self.tile.as_dict()

    def describe(self) -> str:
        flags = "".join(f for f, on in (("_h0", self.has_initial_state),
                                        ("_hT", self.return_final_state),
                                        ("_varlen", self.varlen)) if on)
        return f"{self.lowering}_{DTYPE_SHORT.get(self.dtype, self.dtype)}{flags}"

    def cache_key(self, backend_tag: str = "") -> str:
        """Readable prefix + hash of (IR structure, plan, backend tag, ssmc version and code);
        made once per plan, tag, version and code (backends ask for it on every call)."""
        memo = (backend_tag, __version__, code_fingerprint())
        key = self._cache_keys.get(memo)
        if key is None:
            key = self._cache_keys[memo] = self._cache_key(*memo)
        return key

    @functools.cached_property
    def _cache_keys(self) -> dict[tuple, str]:
        return {}

    def _cache_key(self, backend_tag: str, version: str, code: str) -> str:
        body = "|".join([self.program.structural_key(), self.lowering, self.dtype,
                         str(self.has_initial_state), str(self.return_final_state),
                         str(self.varlen), str(self.chunk_size), repr(self.tile), backend_tag,
                         version, code])
        digest = hashlib.sha256(body.encode()).hexdigest()[:8]
        return f"{self.program.name}_{self.describe()}_{digest}"


@functools.cache
def code_fingerprint() -> str:
    """ssmc's own sources, hashed: a kernel cached by other code (a renderer fix or a new
    default tile, with the version number unchanged) is a miss, not a stale hit."""
    return sources_digest(Path(__file__).resolve().parent)


def sources_digest(root: Path) -> str:
    """A hash of the names and contents of the Python files under root."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
