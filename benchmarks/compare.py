"""Side-by-side comparison with the Node reference: one command, ratios measured in one run.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/compare.py                       # 3 rounds, every scenario, the first 4 variants
    .venv/bin/python benchmarks/compare.py --rounds 1 --scenarios small --variants node,full-sqlite
    .venv/bin/python benchmarks/compare.py --results /tmp/compare.jsonl --quick   # smaller sizes, a smoke run

Installs @tus/server + @tus/file-store from the lock file in ``benchmarks/node_reference`` (``npm ci``, once),
then for each scenario runs every variant once per round, in the same order each round (A B C D A B C D ...),
each on a fresh server, through ``benchmarks/load.py`` (which starts, measures and stops the server). Prints,
per scenario and variant, the median throughput, its ratio to @tus/server, the median PATCH/POST p99, the peak
RSS and the server's CPU seconds per GiB received.

Variants:

``node``
    @tus/server 2.4.5 with @tus/file-store (stores bytes, never fsyncs).
``tus-sqlite``
    tusingest's tus path only: the finaliser swapped for PlainHooks (``serve_patched.py --patches plainhooks``);
    a benchmark-only launcher, not a production setting.
``full-sqlite`` / ``full-postgres``
    tusingest as shipped: bytes in, verified, placed on the directory Storage Element, registered.
``tus-sqlite-granian`` / ``full-sqlite-granian``
    The same on Granian instead of Hypercorn (``load.py --asgi granian``); with ``--baseline full-sqlite`` the
    ratio column compares the two servers (issue 16 part 5)::

        .venv/bin/python benchmarks/compare.py --variants full-sqlite,full-sqlite-granian --baseline full-sqlite

Scenarios are load.py's: ``single`` (1 x 512 MiB, 16 MiB PATCHes), ``concurrent`` (8 x 64 MiB, 8 MiB PATCHes),
``small`` (200 x 64 KiB, 16 in flight). The figures are never asserted by a test; docs/benchmarks.md keeps them
with the date, the machine and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node_reference"
GIB = 1 << 30

VARIANTS: dict[str, list[str]] = {
    "node": ["--server", "node"],
    "tus-sqlite": ["--store", "sqlite", "--patches", "plainhooks"],
    "full-sqlite": ["--store", "sqlite"],
    "full-postgres": ["--store", "postgres"],
    "tus-sqlite-granian": ["--store", "sqlite", "--patches", "plainhooks", "--asgi", "granian"],
    "full-sqlite-granian": ["--store", "sqlite", "--asgi", "granian"],
}
# Variants that differ from another only in the server's environment. GLIBC_TUNABLES naming any malloc
# tunable (here one at its default value) makes `tusingest serve` leave glibc's thresholds as they are
# (serving.tune_malloc), so these measure that tuning against the shipped default.
VARIANT_ENV: dict[str, dict[str, str]] = {
    "tus-sqlite-untuned": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"},
    "full-sqlite-untuned": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"},
}
VARIANTS["tus-sqlite-untuned"] = VARIANTS["tus-sqlite"]
VARIANTS["full-sqlite-untuned"] = VARIANTS["full-sqlite"]
DEFAULT_VARIANTS = ("node", "tus-sqlite", "full-sqlite", "full-postgres")  # the Granian ones need `pip install granian`
SCENARIOS = ("single", "concurrent", "small")
QUICK: dict[str, list[str]] = {  # a smoke run: the same shapes, a fraction of the bytes
    "single": ["--size", "64MiB", "--patch-size", "8MiB"],
    "concurrent": ["--uploads", "4", "--size", "16MiB", "--patch-size", "4MiB"],
    "small": ["--uploads", "60"],
}


def install_node_reference() -> None:
    if (NODE_DIR / "node_modules" / "@tus" / "server").is_dir():
        return
    subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)


def run_once(scenario: str, variant: str, results: Path, quick: bool, timeout: float) -> None:
    command = [sys.executable, str(HERE / "load.py"), "--scenario", scenario, "--results", str(results)]
    command += ["--label", f"compare {variant}", *VARIANTS[variant], *(QUICK[scenario] if quick else [])]
    print(f"# {scenario} {variant}", flush=True)
    environ = {**os.environ, **VARIANT_ENV.get(variant, {})}
    subprocess.run(command, check=True, timeout=timeout, env=environ)


def throughput(row: dict[str, Any]) -> float:
    return float(row["uploads_s"] if row["scenario"] == "small" else row["mib_s"])


def report(rows: list[dict[str, Any]], scenarios: list[str], variants: list[str], baseline: str = "node") -> str:
    against = "@tus/server" if baseline == "node" else baseline
    lines = [
        f"| scenario | variant | median | vs {against} | p99 ms | peak RSS MiB | server CPU s/GiB | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario in scenarios:
        medians: dict[str, float] = {}
        for variant in variants:
            runs = [row for row in rows if row["scenario"] == scenario and row["label"] == f"compare {variant}"]
            if runs:
                medians[variant] = statistics.median(throughput(row) for row in runs)
        for variant in variants:
            runs = [row for row in rows if row["scenario"] == scenario and row["label"] == f"compare {variant}"]
            if not runs:
                continue
            unit = "uploads/s" if scenario == "small" else "MiB/s"
            base = medians.get(baseline)
            ratio = f"{medians[variant] / base:.2f}x" if base else "-"
            p99 = statistics.median(float(row["p99_ms"]) for row in runs)
            rss = max(float(row["peak_rss_mib"]) for row in runs)
            cpu = statistics.median(float(row["server_cpu_s"]) / (int(row["total_bytes"]) / GIB) for row in runs)
            lines.append(
                f"| {scenario} | {variant} | {medians[variant]:.1f} {unit} | {ratio} | {p99:.0f} | {rss:.0f} "
                f"| {cpu:.1f} | {len(runs)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="times each variant runs per scenario (3)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of: " + ", ".join(SCENARIOS))
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--results", type=Path, help="JSON lines of every run (default: a temporary file)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: checks the harness, not the speed")
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline per run, seconds")
    parser.add_argument("--baseline", default="node", help="the variant the ratio column divides by (node)")
    args = parser.parse_args()
    scenarios = [name for name in args.scenarios.split(",") if name]
    variants = [name for name in args.variants.split(",") if name]
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    for name in variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}")
    if args.baseline not in VARIANTS:
        parser.error(f"unknown baseline {args.baseline!r}")
    results = args.results or Path(tempfile.mkstemp(prefix="compare-", suffix=".jsonl")[1])
    results.write_text("")
    if "node" in variants:
        install_node_reference()
    for scenario in scenarios:
        for _ in range(args.rounds):
            for variant in variants:  # the same order every round: A B C D A B C D ...
                run_once(scenario, variant, results, args.quick, args.timeout)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    print()
    print(f"results: {results}")
    print(report(rows, scenarios, variants, args.baseline))


if __name__ == "__main__":
    main()
