"""Turn the JSON lines written by ``load.py --results`` into Markdown tables (median and best of the runs).

Usage::

    .venv/bin/python benchmarks/report.py benchmarks/results/latest.jsonl [--pick median|best]

Runs are grouped by (store, scenario, size, label); for each group the table shows the run picked by MiB/s
(``median``: the median run, the lower middle one for an even count; ``best``: the fastest) with its own latency and
RSS figures, the number of runs and the MiB/s range across them. A second table shows peak RSS against upload size
for the ``single`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

MiB = 1 << 20
SCENARIO_ORDER = {"single": 0, "concurrent": 1, "small": 2}


def size_text(size: int) -> str:
    if size >= 1 << 30 and size % (1 << 30) == 0:
        return f"{size >> 30} GiB"
    if size >= MiB:
        return f"{size / MiB:g} MiB"
    return f"{size >> 10} KiB"


def pick(runs: list[dict[str, Any]], how: str) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["mib_s"])
    return ordered[-1] if how == "best" else ordered[(len(ordered) - 1) // 2]


def describe(run: dict[str, Any]) -> str:
    if run["scenario"] == "small":
        return f"small: {run['uploads']} x {size_text(run['size'])}, {run['in_flight']} in flight, one POST each"
    if run["scenario"] == "concurrent":
        return f"concurrent: {run['uploads']} x {size_text(run['size'])}, PATCH {size_text(run['patch_size'])}"
    return f"single: {size_text(run['size'])}, PATCH {size_text(run['patch_size'])}"


def tables(rows: list[dict[str, Any]], how: str) -> str:
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["store"], row["scenario"], row["size"], row.get("label", ""))].append(row)
    out: list[str] = []
    for store in sorted({key[0] for key in groups}):
        out.append(f"\n#### {store} ({how} of n runs by MiB/s)\n")
        out.append("| scenario | label | MiB/s | uploads/s | p50 ms | p99 ms | peak RSS MiB | n | MiB/s range |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        keys = sorted((k for k in groups if k[0] == store), key=lambda k: (SCENARIO_ORDER.get(k[1], 9), k[2], k[3]))
        for key in keys:
            runs = groups[key]
            run = pick(runs, how)
            speeds = sorted(r["mib_s"] for r in runs)
            out.append(
                f"| {describe(run)} | {key[3]} | {run['mib_s']:.0f} | {run['uploads_s']:.1f} | {run['p50_ms']:.0f} "
                f"| {run['p99_ms']:.0f} | {run['peak_rss_mib']:.0f} | {len(runs)} | {speeds[0]:.0f}-{speeds[-1]:.0f} |"
            )
    singles = [k for k in groups if k[1] == "single" and k[0] == "sqlite" and not k[3]]
    if singles:
        out.append("\n#### Peak RSS against upload size (single, sqlite)\n")
        out.append("| upload size | peak RSS MiB (max over runs) | idle RSS MiB | MiB/s |")
        out.append("|---|---:|---:|---:|")
        for key in sorted(singles, key=lambda k: k[2]):
            runs = groups[key]
            run = pick(runs, how)
            peak = max(r["peak_rss_mib"] for r in runs)
            out.append(f"| {size_text(key[2])} | {peak:.0f} | {run['idle_rss_mib']:.0f} | {run['mib_s']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--pick", choices=["median", "best"], default="median")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for path in args.results for line in path.read_text().splitlines() if line.strip()]
    print(tables(rows, args.pick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
