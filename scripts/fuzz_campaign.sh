#!/usr/bin/env bash
# Fuzz campaign: N cases (default 10000) of each backend's differential fuzz test that runs
# here (Triton on the GPU when there is one, else under the interpreter; TVM on LLVM), drawn
# from hypothesis seed SEED (default 1), over WORKERS pytest workers (default: the CPUs, at
# most 16), then one summary line per backend and in all: cases, seed, failures.
#
#   bash scripts/fuzz_campaign.sh [N] [SEED]
#
# Environment: BACKENDS (default: those installed, of "triton tvm"); WORKERS; SHARDS (tests per
# backend, default 4 per worker, so fast workers take over slow definitions); K (cases per
# drawn definition; default in each test_fuzz.py: 50 on a GPU, 10 under the interpreter);
# LIMIT (seconds: no new definition starts after it, and the summary counts what ran).
# A case is one value draw (sizes, packed lengths, edge decays, initial state) checked on every
# legal lowering against the float64 reference (tests/fuzzing.py); a failure prints the
# definition, its setup and the case, shrunk. Autotuning is off (SSMC_AUTOTUNE=off): the
# campaign checks the lowerings' own kernels, not the tuner's measurements.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
n="${1:-10000}"
seed="${2:-1}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
cpus="$(nproc 2>/dev/null || echo 4)"
workers="${WORKERS:-$(( cpus < 16 ? cpus : 16 ))}"
shards="${SHARDS:-$(( 4 * workers ))}"
backends="${BACKENDS:-}"
if [ -z "$backends" ]; then
    for b in triton tvm; do
        "$python" -c "import $b" 2>/dev/null && backends="$backends $b"
    done
fi
export SSMC_AUTOTUNE="${SSMC_AUTOTUNE:-off}"
# the float64 reference runs on the CPU: one thread per worker
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
files=()
for backend in $backends; do
    files+=("tests/backends/$backend/test_fuzz.py")
done
extra=()
[ -n "${K:-}" ] && extra+=(--fuzz-cases-per-definition "$K")
[ -n "${LIMIT:-}" ] && extra+=(--fuzz-stop-at "$(( $(date +%s) + LIMIT ))")
start="$(date +%s)"
"$python" -m pytest -q -rfE --tb=short -n "$workers" "${files[@]}" -k against_reference \
    -p no:cacheprovider \
    --fuzz-count "$n" --fuzz-shards "$shards" --hypothesis-seed "$seed" \
    --fuzz-report "$report" ${extra[@]+"${extra[@]}"}
status=$?
"$python" - "$report" "$seed" "$(( $(date +%s) - start ))" "$workers" <<'PY'
import collections, json, sys
path, seed, wall, workers = sys.argv[1:]
rows = [json.loads(line) for line in open(path) if line.strip()]
total = collections.Counter()
for backend in sorted({r["backend"] for r in rows}):
    mine = [r for r in rows if r["backend"] == backend]
    c = collections.Counter()
    for r in mine:
        c.update(cases=r["cases"], checks=r["checks"], definitions=r["definitions"],
                 failed=r["failed"], stopped=r["stopped"])
    total.update(c)
    print(f"fuzz campaign {backend}: {c['cases']} cases ({c['checks']} lowering checks, "
          f"{c['definitions']} definitions), seed {seed}, {c['failed']} failed shards of "
          f"{len(mine)}" + (f", {c['stopped']} stopped at LIMIT" if c["stopped"] else ""))
rate = total["cases"] / max(float(wall), 1.0)
print(f"fuzz campaign total: {total['cases']} cases, seed {seed}, {total['failed']} failures, "
      f"{wall} s on {workers} workers ({rate:.2f} cases/s)")
PY
exit "$status"
