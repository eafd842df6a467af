#!/usr/bin/env bash
# Set up a development environment in .venv at the repository root. Safe to run again:
# an existing .venv is reused and pip skips what is already installed.
#
#   bash scripts/setup.sh            # then: .venv/bin/python examples/quickstart.py
#
# torch is installed first and pinned to 2.13.0: any other torch request (including the
# `torch>=2.4` in pyproject.toml on a fresh environment) may pull a CUDA build of several GB.
# Set PYTHON to choose the interpreter (3.10 or newer; default python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi
venv_python=.venv/bin/python
"$venv_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "setup: .venv has $("$venv_python" --version 2>&1); ssmc needs Python 3.10 or newer" >&2
    exit 1
}

echo "setup: installing torch==2.13.0"
"$venv_python" -m pip install --quiet torch==2.13.0
echo "setup: installing ssmc (editable) with the [dev] extras"
"$venv_python" -m pip install --quiet -e ".[dev]"
"$venv_python" -c 'import torch, ssmc; print(f"setup: ok: ssmc {ssmc.__version__}, torch {torch.__version__}")'
