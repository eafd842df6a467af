#!/usr/bin/env bash
# The GPU checks still owed to the issues, in one run. Run from the repository root on the GPU
# machine, with the reference libraries carried as in the device notes:
#
#     bash benchmarks/gpu_pending.sh                 # carry: [".carry"]
#     STEPS="tests fuzz" LIMIT=300 bash benchmarks/gpu_pending.sh
#
# Correctness steps (tests, fuzz, mamba2, compat) run side by side, each in its own processes
# and each stopped at LIMIT seconds (SIGINT first, so pytest still prints what failed); kernel
# compilation, not the GPU, is what they wait on. Timing steps (table) run afterwards, alone.
# Logs go to $OUT (or the current directory). Autotuning is off: a benchmark that tunes on
# first use measures the tuner, not the kernels.
set -u
export PYTHONPATH="$PWD:.carry/mamba_src:.carry/fla_src"
export SSMC_AUTOTUNE=off
export SSMC_CACHE_DIR="${SSMC_CACHE_DIR:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
# the float64 references run on the CPU: one thread per process, or a dozen processes with a
# full thread pool each slow one another down several times over
export OMP_NUM_THREADS=1
STEPS="${STEPS:-tests fuzz mamba2 compat steps determinism table per_key decode mixing cross2d ab}"
# not in the default steps: `defaults` (the shipped tuning defaults of this GPU model, minutes)
LIMIT="${LIMIT:-420}"
LOGS="${OUT:-.}"
want() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
bounded() { timeout -s INT -k 30 "$LIMIT" "$@"; }

want tests && bounded python3 -m pytest -q -rfE --tb=short -n 6 -m gpu tests/backends/triton \
    tests/backends/test_decay_domain.py tests/test_step.py tests/torch tests/compat \
    tests/autotune -k "not fuzz" -p no:cacheprovider > "$LOGS/tests.log" 2>&1 &
# the cross2d tests run on the device where there is one, unmarked (they run under the
# interpreter on the CPU too), so `-m gpu` leaves them out
want tests && bounded python3 -m pytest -q -rfE --tb=short -n 6 \
    tests/backends/triton/test_cross2d_chunked.py tests/backends/triton/test_cross2d_scan.py \
    -p no:cacheprovider > "$LOGS/tests_cross2d.log" 2>&1 &
# the scan file, the chunked files' unmarked tests (the pairs of orders among them), likewise
want tests && bounded python3 -m pytest -q -rfE --tb=short -n 6 \
    tests/backends/triton/test_scan.py tests/backends/triton/test_chunked.py \
    tests/backends/triton/test_chunked_pairs.py tests/backends/triton/test_streams.py -m "not gpu" \
    -p no:cacheprovider > "$LOGS/tests_unmarked.log" 2>&1 &
# every fuzz example is a new definition, so compiling dominates: four processes draw their own
# examples (different hypothesis seeds), FUZZ in all
if want fuzz; then
    for seed in 1 2 3 4; do
        bounded python3 -m pytest -q --tb=short tests/backends/triton/test_fuzz.py \
            --fuzz-count $(( ${FUZZ:-200} / 4 )) --hypothesis-seed "$seed" -p no:cacheprovider \
            > "$LOGS/fuzz_$seed.log" 2>&1 &
    done
fi
# the originals' first-use autotuning over every config took most of a step: ORIGINAL_CONFIGS of
# each (0: all)
ORIGINAL_CONFIGS="${ORIGINAL_CONFIGS:-4}"
want mamba2 && bounded python3 benchmarks/mamba2_gpu_check.py \
    --original-configs "$ORIGINAL_CONFIGS" > "$LOGS/mamba2.log" 2>&1 &
# every shim x dtype in its own process (the originals autotune on first use); FLA's gradients
# are compared with its Hopper guard lifted, and checked against the float64 reference alongside
if want compat; then
    bounded python3 benchmarks/compat_gpu_check.py --jobs "${COMPAT_JOBS:-8}" --fla-hopper-bwd \
        --original-configs "$ORIGINAL_CONFIGS" \
        > "$LOGS/compat.log" 2>&1 &
    bounded python3 benchmarks/compat_gpu_check.py --only fla --backend reference \
        --dtypes float32 --jobs 3 --fla-hopper-bwd --original-configs "$ORIGINAL_CONFIGS" \
        > "$LOGS/compat_fla_vs_float64.log" 2>&1 &
fi
# issue 17: mamba_ssm's batch-index step cases replayed through the shim, each miss dissected
want steps && bounded python3 benchmarks/step_sequence_check.py --rounds 2 \
    > "$LOGS/step_sequence.log" 2>&1 &
# sums over warps that hold copies (RESULTS.md): the same inputs, 200 calls, bit for bit
want determinism && bounded python3 benchmarks/determinism_check.py --calls 200 \
    > "$LOGS/determinism.log" 2>&1 &
wait
for log in "$LOGS"/tests.log "$LOGS"/fuzz_*.log "$LOGS"/mamba2.log "$LOGS"/compat*.log \
    "$LOGS"/step_sequence.log "$LOGS"/determinism.log; do
    [ -f "$log" ] && { echo; echo "=== $(basename "$log")"; grep -v '^[.sF]*$' "$log" | tail -n 60; }
done

if want table; then
    echo; echo "=== forward, decode, forward+backward vs mamba_ssm / FLA"
    timeout -s INT -k 30 "${TABLE_LIMIT:-300}" python3 benchmarks/gpu_table.py \
        --only "${TABLE:-check,fwd,decode,train,long,user}" 2>&1 | tee "$LOGS/table.log"
    echo; echo "=== forward, forward+backward vs mamba_ssm at n=64"
    timeout -s INT -k 30 "${TABLE_LIMIT:-300}" python3 benchmarks/gpu_table.py --n 64 \
        --only fwd,train 2>&1 | tee "$LOGS/table_n64.log"
fi
if want per_key; then
    echo; echo "=== per-key decays: kernel times of one GLA forward + backward, ssmc and FLA"
    timeout -s INT -k 30 120 python3 benchmarks/profile_gla.py --fla-configs "$ORIGINAL_CONFIGS" \
        2>&1 | tee "$LOGS/profile_gla.log"
    # state-pass tiles that spill nothing in ptxas (RESULTS.md, per-key registers and spills)
    for tiles in ${PER_KEY_TILES:-BN_state=32,BP_state=128 warps_state=8}; do
        echo; echo "=== the same, ssmc with $tiles"
        timeout -s INT -k 30 120 python3 benchmarks/profile_gla.py --no-fla --tiles "$tiles" \
            2>&1 | tee -a "$LOGS/profile_gla.log"
    done
    echo; echo "=== per-key decays vs FLA chunk_gla (issue 16), simple GLA vs chunk_simple_gla (issue 15); selective_scan scan vs chunked"
    timeout -s INT -k 30 "${PER_KEY_LIMIT:-420}" python3 benchmarks/per_key.py \
        --fla-configs "$ORIGINAL_CONFIGS" 2>&1 \
        | tee "$LOGS/per_key.log"
fi
if want decode; then
    echo; echo "=== decode steps (eager and CUDA-graph replayed) vs mamba_ssm / FLA"
    timeout -s INT -k 30 "${DECODE_LIMIT:-300}" python3 benchmarks/decode.py 2>&1 \
        | tee "$LOGS/decode.log"
fi
if want mixing; then
    echo; echo "=== fused matrix-matching loss vs materialised matrices (issue 19)"
    timeout -s INT -k 30 "${MIXING_LIMIT:-420}" python3 benchmarks/mixing_loss.py 2>&1 \
        | tee "$LOGS/mixing_loss.log"
fi
if want cross2d; then
    echo; echo "=== cross2d: one fused op vs four stacked orderings through the 1-D op (issue 18)"
    timeout -s INT -k 30 "${CROSS2D_LIMIT:-420}" python3 benchmarks/cross2d.py 2>&1 \
        | tee "$LOGS/cross2d.log"
fi
# the shipped tuning defaults (ssmc/autotune/defaults/README.md): the README's shapes, each in
# its own process (a config that faults loses only that process), into $LOGS/defaults.json
if want defaults; then
    echo; echo "=== tuning defaults for this GPU model"
    tune_cache="$(mktemp -d)"     # only this step's entries are exported
    for shape in b=8,t=4096,h=80,p=64,n=128,g=1 b=4,t=16384,h=80,p=64,n=128,g=1 \
                 b=32,t=512,h=80,p=64,n=128,g=1 b=64,t=64,h=80,p=64,n=128,g=1; do
        SSMC_CACHE_DIR="$tune_cache" SSMC_AUTOTUNE=full \
            timeout -s INT -k 30 "${TUNE_LIMIT:-150}" python3 -c \
            "import sys; from ssmc.cli import main; sys.exit(main())" tune ssmc.ops.ssd:mamba2 \
            --shape "$shape" --dtype bf16 --lowering all --budget "${TUNE_BUDGET:-30}" --top 4 \
            2>&1 | tee -a "$LOGS/defaults.log"
    done
    SSMC_CACHE_DIR="$tune_cache" python3 -c \
        "import sys; from ssmc.cli import main; sys.exit(main())" tune \
        --export-defaults "$LOGS/defaults.json" 2>&1 | tee -a "$LOGS/defaults.log"
fi
# commits against each other, where `bash benchmarks/ab_trees.sh prepare REV REV` made trees
# (AB: the script and its arguments under each tree's benchmarks/)
if want ab && [ -d .carry/trees ]; then
    echo; echo "=== commits against each other: ${AB:-profile_gla.py --fla-configs 4}"
    # shellcheck disable=SC2086 - AB is a script and its arguments
    ROUNDS="${ROUNDS:-2}" timeout -s INT -k 30 "${AB_LIMIT:-300}" \
        bash benchmarks/ab_trees.sh run ${AB:-profile_gla.py --fla-configs 4} 2>&1 \
        | tee "$LOGS/ab.log"
fi
