"""Kernel time of writing a file into the page cache, by the size of each write(2) call.

Usage (from the repository root)::

    .venv/bin/python benchmarks/write_sizes.py                       # 512 MiB, calls of 64 KiB .. 4 MiB
    .venv/bin/python benchmarks/write_sizes.py --sizes 256KiB,4MiB --idle 6 --rounds 3

Each run waits ``--idle`` seconds (the machine quiet, freed memory left alone), then writes ``--total`` bytes
into a new file under ``--dir`` in calls of one size, fsyncs it, removes it, and prints the wall time and the
system CPU time of the writing process. Why it matters here: on a VM whose balloon reports free pages to its
host, a large write(2) gets a large page-cache folio from free blocks the host has unbacked, and touching each
costs a host fault (docs/benchmarks.md, "Writes in pieces"). staging/fileio.py caps tusingest's calls.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import human, parse_size  # benchmarks/ is not a package: load.py is found by the path above


def write_once(directory: Path, total: int, call: int) -> tuple[float, float]:
    payload = os.urandom(call)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    started = time.perf_counter()
    fd, name = tempfile.mkstemp(dir=directory, prefix="write-sizes-")
    try:
        for _ in range(total // call):
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)
    return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=parse_size, default=parse_size("512MiB"))
    parser.add_argument("--sizes", default="64KiB,256KiB,512KiB,1MiB,4MiB", help="comma-separated call sizes")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of quiet before each run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    sizes = [parse_size(text) for text in args.sizes.split(",")]
    for round_ in range(1, args.rounds + 1):
        for call in sizes:
            time.sleep(args.idle)
            wall, system = write_once(args.dir, args.total, call)
            print(
                f"round {round_}: {human(args.total)} in calls of {human(call):>7}: wall {wall:5.2f} s, "
                f"system CPU {system:5.2f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
