#!/usr/bin/env bash
# Measure the Node reference (@tus/server + @tus/file-store) and the bare Starlette app on this machine, with the
# same client and scenarios as tusingest: REPEAT (3) rounds, each round runs single, concurrent and small against
# node then bare (interleaved, so that a slow minute of the VM's disk hits both alike).
#
# Usage (from anywhere; needs the repository's .venv and `npm ci` in this folder):
#   benchmarks/node_reference/run.sh
#   REPEAT=5 RESULTS=/tmp/ref.jsonl benchmarks/node_reference/run.sh
# Results: RESULTS (benchmarks/node_reference/results.jsonl, overwritten), then report.py's median table.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$(dirname "$here")"
repo="$(dirname "$bench")"
python="$repo/.venv/bin/python"
repeat="${REPEAT:-3}"
results="${RESULTS:-$here/results.jsonl}"

if [[ ! -d "$here/node_modules/@tus/server" ]]; then
    (cd "$here" && npm ci --no-audit --no-fund)
fi
: >"$results"

echo "# $(date -u +%FT%TZ) nproc=$(nproc) node=$(node --version) python=$("$python" -V 2>&1) repeat=$repeat"
echo "# @tus/server $(node -p "require('$here/node_modules/@tus/server/package.json').version")," \
    "@tus/file-store $(node -p "require('$here/node_modules/@tus/file-store/package.json').version")"
for ((i = 1; i <= repeat; i++)); do
    for scenario in single concurrent small; do
        for server in node bare; do
            timeout 300 "$python" "$bench/load.py" --results "$results" --server "$server" --scenario "$scenario"
        done
    done
done

echo
"$python" "$bench/report.py" "$results" --pick median
