#!/usr/bin/env bash
# Time two (or more) commits against each other in one GPU run: each commit's ssmc and
# benchmarks, exported with `git archive` into .carry/trees/<rev>, run alternately, each in its
# own processes and kernel cache, ROUNDS times (the spread between one tree's rounds is the
# noise to read the differences against).
#
#   bash benchmarks/ab_trees.sh prepare REV [REV ...]      # here, where git is
#   ROUNDS=2 bash benchmarks/ab_trees.sh run SCRIPT [ARGS ...]   # on the GPU machine
#
# `run` executes each tree's own benchmarks/SCRIPT (e.g. gpu_table.py --only fwd,train, or
# profile_gla.py) with that tree first on PYTHONPATH, the reference libraries of .carry after
# it, and prefixes every output line with the tree and round. Carry .carry to the GPU machine.
# TREES="rev rev" runs only those of the prepared trees.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
trees="$root/.carry/trees"
case "${1:-}" in
prepare)
    shift
    for rev in "$@"; do
        name="$(git -C "$root" rev-parse --short "$rev")" || exit 1
        rm -rf "${trees:?}/$name" && mkdir -p "$trees/$name"
        git -C "$root" archive "$name" ssmc benchmarks | tar -x -C "$trees/$name"
        echo "prepared $name ($(git -C "$root" log -1 --format='%s' "$name" | cut -c1-70))"
    done ;;
run)
    shift
    script="$1"; shift
    export PYTHONUNBUFFERED=1 SSMC_AUTOTUNE="${SSMC_AUTOTUNE:-off}"
    for round in $(seq 1 "${ROUNDS:-2}"); do
        for tree in "$trees"/*/; do
            rev="$(basename "$tree")"
            case " ${TREES:-$rev} " in *" $rev "*) ;; *) continue ;; esac
            SSMC_CACHE_DIR="/tmp/ab_cache_$rev" \
            PYTHONPATH="$tree:$tree/benchmarks:$root/.carry/mamba_src:$root/.carry/fla_src" \
                python3 -P "$tree/benchmarks/$script" "$@" 2>&1 | sed "s/^/$rev round $round: /"
        done
    done ;;
*)
    echo "usage: ab_trees.sh prepare REV... | run SCRIPT [ARGS...]" >&2
    exit 2 ;;
esac
