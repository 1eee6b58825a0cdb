"""The `tusingest upload` run: which files, several at once, how the user sees it (a rich progress bar per
file and in total, or JSON lines for scripts), one line per file at the end, and the exit code."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TextIO

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from tusingest.client.fingerprints import FingerprintStore
from tusingest.client.uploader import Refused, Uploader, UploadResult, UploadSettings, discover

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2}
_UNITS |= {"g": 1 << 30, "gib": 1 << 30, "gb": 1000**3}


def parse_size(text: str) -> int:
    """``8MiB``, ``512k``, ``1048576``: a size in bytes (k/m/g and KiB/MiB/GiB are powers of 1024)."""
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number) :]
    if not number.isdigit() or unit not in _UNITS or int(number) * _UNITS[unit] <= 0:
        raise ValueError(f"{text!r} is not a size (e.g. 8MiB, 512KiB, 1048576)")
    return int(number) * _UNITS[unit]


def parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or any(c in key for c in " ,"):
            raise ValueError(f"--metadata {pair!r} is not key=value (a key without spaces or commas)")
        metadata[key] = value
    return metadata


def collect(paths: Sequence[Path], include: Sequence[str], exclude: Sequence[str]) -> Iterator[Path]:
    """The files to send: each file named, and the regular files under each folder named (recursively)
    whose path below the folder (or name) matches an --include glob, if any, and no --exclude glob."""

    def matches(relative: str, name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch(relative, pattern) or fnmatch(name, pattern) for pattern in patterns)

    seen: set[Path] = set()
    for path in paths:
        if not path.is_dir():
            found: Iterator[Path] = iter([path])  # a missing one fails on its own line
        else:
            found = (
                candidate
                for candidate in sorted(path.rglob("*"))
                if candidate.is_file()
                and (not include or matches(candidate.relative_to(path).as_posix(), candidate.name, include))
                and not matches(candidate.relative_to(path).as_posix(), candidate.name, exclude)
            )
        for file in found:
            if file.absolute() not in seen:
                seen.add(file.absolute())
                yield file


@dataclass
class _Display:
    """Everything the user sees: JSON lines, or the progress bars (on a terminal) and one line per file."""

    json_lines: bool
    out: TextIO
    progress: Progress | None = None
    total: TaskID | None = None

    def __post_init__(self) -> None:
        console = Console(file=self.out)
        if not self.json_lines and console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
        self._tasks: dict[Path, TaskID] = {}

    def begin(self, total_bytes: int) -> None:
        if self.progress is not None:
            self.progress.start()
            self.total = self.progress.add_task("total", total=total_bytes)

    def started(self, path: Path, size: int, url: str, offset: int) -> None:
        if self.json_lines:
            self._emit({"event": "started", "path": str(path), "size": size, "url": url, "offset": offset})
        elif self.progress is not None:
            self._tasks[path] = self.progress.add_task(path.name, total=size, completed=offset)
            assert self.total is not None
            self.progress.advance(self.total, offset)

    def advanced(self, path: Path, offset: int, size: int) -> None:
        if self.json_lines:
            self._emit({"event": "progress", "path": str(path), "offset": offset, "size": size})
        elif self.progress is not None and path in self._tasks:
            task = self.progress.tasks[self._tasks[path]]
            assert self.total is not None
            self.progress.advance(self.total, offset - task.completed)
            self.progress.update(self._tasks[path], completed=offset)

    def finished(self, result: UploadResult) -> None:
        if self.json_lines:
            self._emit({"event": "completed" if result.ok else "failed", **dataclasses.asdict(result)})
            return
        path = Path(result.path)
        if self.progress is not None and path in self._tasks:
            self.progress.remove_task(self._tasks.pop(path))
        if result.ok:
            line = f"ok      {result.path}  status={result.status} sha256={result.sha256}"
            if result.file_id is not None:
                line += f" file_id={result.file_id} element={result.element}"
        else:
            line = f"FAILED  {result.path}: {result.reason}" + (f" [{result.code}]" if result.code else "")
        self.line(line)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def summary(self, results: Sequence[UploadResult]) -> None:
        failed = sum(not result.ok for result in results)
        if not self.json_lines:
            print(f"{len(results) - failed} of {len(results)} files uploaded, {failed} failed", file=sys.stderr)

    def line(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.out, flush=True)

    def _emit(self, event: dict[str, object]) -> None:
        print(json.dumps(event), file=self.out, flush=True)


async def run(
    paths: Sequence[Path],
    settings: UploadSettings,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    jobs: int = 2,
    state_file: Path,
    json_lines: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Upload every file; 0 when all were stored, 1 when any failed (each with its one-line reason)."""
    display = _Display(json_lines, out)
    files = list(collect(paths, include, exclude))
    if not files:
        display.line("FAILED  nothing to upload: no file matched")
        return 1
    fingerprints = FingerprintStore(state_file)
    # No connection limit of aiohttp's own: --jobs bounds the requests in flight.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False) as session:
        try:
            abilities = await discover(session, settings)
        except Refused as refusal:
            display.line(f"FAILED  {settings.endpoint}: {refusal.reason}")
            return 1
        uploader = Uploader(session, settings, abilities, fingerprints, display)
        display.begin(sum(file.stat().st_size for file in files if file.is_file()))
        slots = asyncio.Semaphore(max(1, jobs))

        async def one(path: Path) -> UploadResult:
            async with slots:
                result = await uploader.upload(path)
            display.finished(result)
            return result

        try:
            results = await asyncio.gather(*(one(path) for path in files))
        finally:
            display.stop()
    display.summary(results)
    return 0 if all(result.ok for result in results) else 1
