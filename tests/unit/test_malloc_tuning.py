"""glibc malloc's fixed thresholds (serving.tune_malloc): memory a streaming node frees stays in its heap for the
next reads instead of going back to the kernel and faulting in again. Each case runs in a fresh interpreter, whose
own resident memory (/proc/self/statm) shows where freed blocks went."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
from tusingest.serving import tune_malloc

PAGE = os.sysconf("SC_PAGE_SIZE")

def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE

tuned = tune_malloc() if sys.argv[1] == "tuned" else None
blocks = [b"\\x01" * (1 << 20) for _ in range(24)]  # 24 MiB in 1 MiB blocks: a node's reads in flight, and more
peak = rss()
del blocks
print(json.dumps({"tuned": tuned, "released_mib": (peak - rss()) / (1 << 20)}))
"""


def _probe(mode: str, **environ: str) -> dict[str, object]:
    ours = {"GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**env, **environ}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_without_tuning_freed_blocks_go_back_to_the_kernel() -> None:
    result = _probe("plain")
    assert result["tuned"] is None
    assert isinstance(result["released_mib"], float) and result["released_mib"] > 16


def test_with_tuning_freed_blocks_stay_in_the_heap_for_the_next_reads() -> None:
    result = _probe("tuned")
    assert result["tuned"] is True
    assert isinstance(result["released_mib"], float) and result["released_mib"] < 4


def test_an_operators_malloc_tunables_are_left_alone() -> None:
    result = _probe("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert result["tuned"] is False
    assert isinstance(result["released_mib"], float) and result["released_mib"] > 16
