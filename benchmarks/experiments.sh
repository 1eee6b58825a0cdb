#!/usr/bin/env bash
# Measure the optimisations proposed in docs/benchmarks.md before anyone implements them: the same scenarios, with
# tusingest run through serve_patched.py (monkeypatches standing in for each proposal), and the bare Starlette +
# Hypercorn app (bare_app.py) as the floor on this machine.
#
# Usage: benchmarks/experiments.sh   (REPEAT=5 by default; results in benchmarks/results/experiments.jsonl)
# `small` runs here use 1000 uploads instead of 200, so that a run lasts seconds rather than half of one.
# Takes about 25 minutes with REPEAT=5 on a 2-core machine. SQLite store only; staging on the normal disk, plus a
# tmpfs pass (TMPFS_DIR, default /dev/shm) for the CPU-only view of the large-upload patches.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$(dirname "$here")/.venv/bin/python"
repeat="${REPEAT:-5}"
tmpfs="${TMPFS_DIR:-/dev/shm}"
results="${RESULTS:-$here/results/experiments.jsonl}"
mkdir -p "$(dirname "$results")"
: >"$results"

run() {
    timeout 300 "$python" "$here/load.py" --results "$results" "$@" || echo "(run failed: $*)"
}

for ((i = 1; i <= repeat; i++)); do
    for scenario in single concurrent small; do
        small=()
        [[ $scenario == small ]] && small=(--uploads 1000)
        run --scenario "$scenario" --server bare "${small[@]}"
        run --scenario "$scenario" "${small[@]}"
    done
    for patches in recv1m sfr recv1m,sfr nofsync recv1m,nofsync; do
        run --scenario single --patches "$patches"
    done
    run --scenario concurrent --patches recv1m
    run --scenario concurrent --patches recv1m,sfr
    for patches in pool32 nodirfsync post1 postfast postfast,pool32; do
        run --scenario small --uploads 1000 --patches "$patches"
    done
    if [[ -d "$tmpfs" ]]; then
        for patches in "" recv1m; do
            run --scenario single --tmp-dir "$tmpfs" ${patches:+--patches "$patches"}
            run --scenario concurrent --tmp-dir "$tmpfs" ${patches:+--patches "$patches"}
        done
        run --scenario single --tmp-dir "$tmpfs" --server bare
        run --scenario small --uploads 1000 --tmp-dir "$tmpfs"
        run --scenario small --uploads 1000 --tmp-dir "$tmpfs" --patches postfast
    fi
done

"$python" "$here/report.py" "$results" --pick median
