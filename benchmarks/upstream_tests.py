"""Run an original library's own test file against ssmc's shim of one of its functions.

    python benchmarks/upstream_tests.py TEST_FILE --shim MODULE:FUNCTION=SHIM_MODULE
        [--shim ...] [--cpu] [-- PYTEST_ARGS...]

e.g., with mamba's `tests/ops/triton/test_selective_state_update.py` taken from its repository
(not part of ssmc; carry it beside the checkout):

    python benchmarks/upstream_tests.py .carry/upstream/test_selective_state_update.py \\
        --shim mamba_ssm.ops.triton.selective_state_update:selective_state_update=ssmc.compat.mamba_ssm \\
        -- -n 8 -q

The file is copied into a temporary directory with one line added after the import that brings
FUNCTION from MODULE: `from SHIM_MODULE import FUNCTION`, so every test calls the shim while the
file's reference functions stay the library's own. `--cpu` sets the file's `device = "cuda"`
assignments to "cpu" (ssmc's Triton kernels then run under Triton's interpreter: set
TRITON_INTERPRET=1). The library itself must be importable (its references are imported), and
so must what the test file imports (einops for mamba's).
Exits with pytest's status.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile


def rebind(source: str, shims: list[tuple[str, str, str]]) -> str:
    """`source` with `from shim import function` after the import of each (module, function,
    shim); raises where the file has no such import."""
    lines = source.splitlines()
    top = ast.parse(source).body
    inserts = {}
    for module, function, shim in shims:
        ends = [node.end_lineno for node in top
                if isinstance(node, ast.ImportFrom) and node.module == module
                and any(alias.name == function for alias in node.names)]
        if not ends:
            raise SystemExit(f"no 'from {module} import {function}' at the top of the file")
        inserts.setdefault(ends[0], []).append(
            f"from {shim} import {function}  # ssmc's shim in place of the original")
    out = []
    for number, line in enumerate(lines, 1):
        out.append(line)
        out.extend(inserts.get(number, []))
    return "\n".join(out) + "\n"


def on_cpu(source: str) -> str:
    return re.sub(r'device\s*=\s*"cuda"', 'device = "cpu"', source)


def main() -> int:
    argv = sys.argv[1:]
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("test_file")
    ap.add_argument("--shim", action="append", required=True,
                    help="MODULE:FUNCTION=SHIM_MODULE (repeatable)")
    ap.add_argument("--cpu", action="store_true")
    a = ap.parse_args(argv)
    shims = []
    for spec in a.shim:
        target, shim = spec.split("=")
        module, function = target.split(":")
        shims.append((module, function, shim))
    source = rebind(open(a.test_file).read(), shims)
    if a.cpu:
        source = on_cpu(source)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(a.test_file))
        with open(path, "w") as f:
            f.write(source)
        return subprocess.call([sys.executable, "-m", "pytest", path, "--rootdir", tmp,
                                "-p", "no:cacheprovider", *pytest_args])


if __name__ == "__main__":
    sys.exit(main())
