"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) into the hottest functions.

Usage::

    .venv/bin/python benchmarks/load.py --scenario single --profile /tmp/single.txt
    .venv/bin/python benchmarks/profile_summary.py /tmp/single.txt --top 25

Each line of the input is ``frame;frame;...;frame COUNT`` (outermost first; with ``--threads`` the first frame
names the thread). Prints, per thread and overall, the share of samples in which a function is the innermost
Python frame ("self") and in which it is anywhere on the stack ("total").

py-spy's idle detection does not recognise every blocked thread on this VM: the thread pool's workers waiting for
work and aiosqlite's worker waiting for a query are sampled as busy. Samples whose innermost frame is one of those
waits (``IDLE_FRAMES``) are dropped before the percentages are computed, so they are shares of busy samples.
``--thread MainThread`` keeps only the event loop's thread. ``Runner.run`` as a *self* frame is time inside
uvloop's C code (socket reads and writes, callbacks, and any epoll wait py-spy did not see as idle).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")
IDLE_FRAMES = (
    "_worker (concurrent/futures/thread.py:89)",  # ThreadPoolExecutor worker: work_queue.get(block=True)
    "_connection_worker_thread (aiosqlite/core.py:59)",  # aiosqlite worker: tx.get()
)


def frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` without its line number, so one function is one entry."""
    return _FRAME_LINE.sub(")", frame.strip())


def package(frame: str) -> str:
    """The library a frame belongs to: ``hypercorn``, ``h11``, ``tusingest``, ``asyncio`` ... or ``uvloop (C)``."""
    if frame.startswith("Runner.run (asyncio/runners.py"):
        return "uvloop (C code under the event loop)"
    match = re.search(r"\((?P<file>[^:)]+)", frame)
    if match is None:
        return "?"
    file = match.group("file")
    if file.startswith("<"):
        return "python builtins " + file
    return file.split("/")[0].removesuffix(".py") if "/" in file else file.removesuffix(".py")


def summarise(path: Path, top: int, group: str, thread_filter: str) -> str:
    self_counts: Counter[str] = Counter()
    package_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = idle = 0
    for raw in path.read_text(errors="replace").splitlines():
        match = _LINE.match(raw.strip())
        if match is None:
            continue
        count = int(match.group("count"))
        frames = match.group("stack").split(";")
        thread = frames[0] if frames[0].startswith("thread") else "?"
        if thread_filter and thread_filter not in thread:
            continue
        if frames[-1].strip() in IDLE_FRAMES:
            idle += count
            continue
        threads[re.sub(r"\s*\(\d+\)", "", thread)] += count
        stack = [frame_name(f) for f in frames if not f.startswith(("thread", "process"))]
        if group:
            stack = [f for f in stack if group in f] or stack[-1:]
        samples += count
        if stack:
            self_counts[stack[-1]] += count
            package_counts[package(stack[-1])] += count
            for name in set(stack):
                total_counts[name] += count
    if samples == 0:
        return f"{path}: no samples"
    lines = [f"{path}: {samples} busy samples ({idle} idle-wait samples dropped)"]
    lines.append("threads: " + ", ".join(f"{t} {100 * c / samples:.1f}%" for t, c in threads.most_common()))
    lines.append(f"\n{'self %':>7}  library of the innermost frame")
    lines += [f"{100 * c / samples:7.1f}  {name}" for name, c in package_counts.most_common(12)]
    lines.append(f"\n{'self %':>7}  function")
    lines += [f"{100 * c / samples:7.1f}  {name}" for name, c in self_counts.most_common(top)]
    lines.append(f"\n{'total %':>7}  function")
    lines += [f"{100 * c / samples:7.1f}  {name}" for name, c in total_counts.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, nargs="+", help="py-spy raw output (collapsed stacks)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--group", default="", help="attribute samples to the innermost frame whose text contains this (e.g. a path)"
    )
    parser.add_argument("--thread", default="", help="only samples of threads whose name contains this")
    args = parser.parse_args(argv)
    for path in args.profile:
        print(summarise(path, args.top, args.group, args.thread))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
