#!/usr/bin/env bash
# Fuzz campaign: N examples (default 10000) of each backend's differential fuzz test that runs
# here (Triton on the GPU, or under the interpreter without one; TVM on LLVM), drawn from
# hypothesis seed SEED (default 1), over WORKERS pytest workers (default 4: one per shard).
#
#   bash scripts/fuzz_campaign.sh [N] [SEED]        BACKENDS="triton tvm" by default
#
# Every example is a random definition with random decay values (tests/fuzzing.py) checked on
# every legal lowering against the float64 reference; a failure prints the shrunk example.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
n="${1:-10000}"
seed="${2:-1}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
files=()
for backend in ${BACKENDS:-triton tvm}; do
    files+=("tests/backends/$backend/test_fuzz.py")
done
exec "$python" -m pytest -q -rfE --tb=short -n "${WORKERS:-4}" "${files[@]}" \
    --fuzz-count "$n" --hypothesis-seed "$seed" -p no:cacheprovider
