"""Server CPU per upload, side by side: two tusingest source trees, ABAB, each run on a fresh server.

Usage (from the repository root, with the project's venv)::

    git archive main | tar -x -C /tmp/tusingest-main        # the tree to compare against
    .venv/bin/python benchmarks/cpu_ab.py --a /tmp/tusingest-main --b . --rounds 3
    .venv/bin/python benchmarks/cpu_ab.py --a /tmp/tusingest-main --b . -- --store postgres --uploads 400

Throughput drifts with whatever else the machine runs; the CPU seconds the server spends per upload (psutil's
user + system time of the server process, before and after a fixed run of N uploads: ``load.py``'s
``server_cpu_s``) drift far less. Each round runs A then B through ``benchmarks/load.py`` (the arguments after
``--``; default ``--scenario small --uploads 400``), with ``PYTHONPATH`` set to the tree, so both use this venv's
libraries and differ only in tusingest's code. Prints each run and the median ms of server CPU per upload.
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

HERE = Path(__file__).resolve().parent


def run(tree: Path, load_args: list[str], results: Path) -> dict[str, object]:
    # A launcher with the tree first on the path: load.py runs `<launcher> serve ...` (and `migrate`).
    launcher = results.parent / f"tusingest-{abs(hash(str(tree)))}"
    launcher.write_text(f'#!/bin/sh\nPYTHONPATH="{tree}" exec "{sys.executable}" -m tusingest "$@"\n')
    launcher.chmod(0o755)
    before = results.read_text().count("\n") if results.exists() else 0
    command = [sys.executable, str(HERE / "load.py"), "--tusingest", str(launcher), "--results", str(results)]
    subprocess.run([*command, *load_args], check=True, env={**os.environ, "PYTHONPATH": str(tree)})
    lines = results.read_text().splitlines()
    if len(lines) != before + 1:
        raise SystemExit(f"load.py wrote no result for {tree}")
    row: dict[str, object] = json.loads(lines[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="tusingest source tree A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="tusingest source tree B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("load_args", nargs="*", help="load.py's arguments (after --)")
    args = parser.parse_args()
    load_args = args.load_args or ["--scenario", "small", "--uploads", "400"]
    per_upload: dict[str, list[float]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="cpu-ab-") as scratch:
        results = Path(scratch) / "results.jsonl"
        for round_ in range(1, args.rounds + 1):
            for name, tree in (("A", args.a.resolve()), ("B", args.b.resolve())):
                row = run(tree, load_args, results)
                ms = 1000 * float(row["server_cpu_s"]) / int(row["uploads"])  # type: ignore[arg-type]
                per_upload[name].append(ms)
                print(
                    f"round {round_} {name}: {ms:.2f} ms server CPU per upload "
                    f"(sys {1000 * float(row['server_system_s']) / int(row['uploads']):.2f}), "  # type: ignore[arg-type]
                    f"{row['uploads_s']} uploads/s",
                    flush=True,
                )
    a, b = statistics.median(per_upload["A"]), statistics.median(per_upload["B"])
    print(f"median server CPU per upload: A {a:.2f} ms, B {b:.2f} ms, B/A {b / a:.3f}")
    # Other load on the machine only ever adds CPU time (cache misses, lock contention): the least is the cleanest.
    a, b = min(per_upload["A"]), min(per_upload["B"])
    print(f"least server CPU per upload: A {a:.2f} ms, B {b:.2f} ms, B/A {b / a:.3f}")


if __name__ == "__main__":
    main()
