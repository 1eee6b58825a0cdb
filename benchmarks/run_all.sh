#!/usr/bin/env bash
# Run the tusingest benchmark suite: the three scenarios on SQLite and PostgreSQL, then `single` at 64 MiB and
# 2 GiB (SQLite) to show that the server's peak RSS does not grow with the upload size.
#
# Usage (from anywhere; the repository's .venv must exist):
#   benchmarks/run_all.sh                 # REPEAT=3 runs of each, results in benchmarks/results/latest.jsonl
#   REPEAT=2 STORES=sqlite benchmarks/run_all.sh
#   TMP_DIR=/dev/shm benchmarks/run_all.sh   # staging and SQLite on tmpfs: the server's CPU cost without the disk
#
# Environment: REPEAT (3), STORES ("sqlite postgres"), RESULTS (benchmarks/results/latest.jsonl, overwritten),
# TMP_DIR (system temp dir), BENCH_PG_ADMIN_URL (postgresql://postgres@127.0.0.1:5432/postgres), LABEL ("").
# Takes about 2.5 minutes on a 2-core machine with REPEAT=3. Every run starts and stops its own server on
# 127.0.0.1; a PostgreSQL run creates, migrates and drops its own database.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="$repo/.venv/bin/python"
repeat="${REPEAT:-3}"
stores="${STORES:-sqlite postgres}"
results="${RESULTS:-$here/results/latest.jsonl}"
label="${LABEL:-}"

mkdir -p "$(dirname "$results")"
: >"$results"

extra=()
if [[ -n "${TMP_DIR:-}" ]]; then
    extra+=(--tmp-dir "$TMP_DIR")
fi

run() {
    timeout 300 "$python" "$here/load.py" --results "$results" --label "$label" "${extra[@]}" "$@"
}

echo "# $(date -u +%FT%TZ) nproc=$(nproc) python=$("$python" -V 2>&1) repeat=$repeat stores=$stores"
for store in $stores; do
    for scenario in single concurrent small; do
        for ((i = 1; i <= repeat; i++)); do
            run --scenario "$scenario" --store "$store"
        done
    done
done
# Peak RSS against upload size (the 512 MiB point comes from the runs above).
for ((i = 1; i <= repeat; i++)); do
    run --scenario single --store sqlite --size 64
done
for ((i = 1; i <= (repeat < 2 ? repeat : 2); i++)); do
    run --scenario single --store sqlite --size 2048
done

echo
"$python" "$here/report.py" "$results" --pick median
