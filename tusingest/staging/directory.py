"""Chunk files on a directory (a shared volume in a cluster).

Layout: ``<root>/<upload id>/<start offset, 20 digits>.chunk``. A PATCH appends to the last
chunk file while it is below ``chunk_max_bytes`` and opens a new one after, so a long upload
is a handful of large files, and a concatenated upload can refer to its partials' chunks.

Writes go to the page cache in large batches (``write_buffer_bytes``) on the event loop
thread: a write of a few MiB to the page cache is cheaper than a thread hop. The only calls
that may block for long (opening, truncating, fsync) run once per request in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_CHUNK_NAME = re.compile(r"^(\d{20})\.chunk$")
_IOV_MAX = 512  # well under the kernel's IOV_MAX (1024)


class StagingError(Exception):
    """Staged bytes are missing or unreadable: the upload cannot continue."""


@dataclass(frozen=True, slots=True)
class Chunk:
    start: int
    path: Path
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def _chunk_path(directory: Path, start: int) -> Path:
    return directory / f"{start:020d}.chunk"


def _list_chunks(directory: Path) -> list[Chunk]:
    chunks = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _CHUNK_NAME.match(entry.name)
        if match:
            chunks.append(Chunk(int(match.group(1)), Path(entry.path), entry.stat().st_size))
    chunks.sort(key=lambda c: c.start)
    return chunks


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkWriter:
    """Appends one request's bytes at a known offset; ``sync`` makes them durable.

    Not safe for concurrent use: one writer per upload at a time is the locker's job.
    """

    def __init__(self, staging: DirectoryStaging, directory: Path, fd: int, chunk_start: int, offset: int) -> None:
        self._staging = staging
        self._directory = directory
        self._fd = fd
        self._chunk_start = chunk_start
        self._start_offset = offset
        self._flushed = offset  # bytes on disk (page cache) for this upload
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._new_files = False
        self._closed = False

    @property
    def offset(self) -> int:
        """The upload offset after everything written so far (synced or not)."""
        return self._flushed + self._pending_bytes

    @property
    def written(self) -> int:
        return self.offset - self._start_offset

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self._staging.write_buffer_bytes or len(self._pending) >= _IOV_MAX:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._flushed - self._chunk_start >= self._staging.chunk_max_bytes:
            self._roll()
        buffers: Sequence[bytes] = self._pending
        total = self._pending_bytes
        done = os.writev(self._fd, buffers)
        if done != total:  # short writes are rare (disk full signals as OSError); finish the rest
            rest = b"".join(buffers)[done:]
            while rest:
                n = os.write(self._fd, rest)
                rest = rest[n:]
        self._flushed += total
        self._pending = []
        self._pending_bytes = 0

    def _roll(self) -> None:
        os.close(self._fd)
        self._chunk_start = self._flushed
        self._fd = os.open(_chunk_path(self._directory, self._flushed), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        self._new_files = True

    async def sync(self) -> int:
        """Write out everything and fsync it; returns the durable offset. Call before committing."""
        self._flush()
        fd, new_files, directory = self._fd, self._new_files, self._directory

        def _sync() -> None:
            os.fsync(fd)
            if new_files:
                _fsync_dir(directory)

        await asyncio.to_thread(_sync)
        self._new_files = False
        return self._flushed

    async def discard(self) -> None:
        """Forget this request's bytes: cut the staged data back to where the writer started."""
        self._pending = []
        self._pending_bytes = 0
        self.close()
        await self._staging.truncate(self._directory.name, self._start_offset)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class DirectoryStaging:
    def __init__(
        self, root: str | Path, *, chunk_max_bytes: int = 256 << 20, write_buffer_bytes: int = 4 << 20
    ) -> None:
        self.root = Path(root)
        self.chunk_max_bytes = chunk_max_bytes
        self.write_buffer_bytes = write_buffer_bytes

    def directory(self, upload_id: str) -> Path:
        if not upload_id or "/" in upload_id or upload_id.startswith("."):
            raise StagingError(f"invalid upload id {upload_id!r}")
        return self.root / upload_id

    def _truncate(self, directory: Path, offset: int) -> list[Chunk]:
        """Cut staged bytes to exactly ``offset``; returns the remaining chunks."""
        kept = []
        for chunk in _list_chunks(directory):
            if chunk.start >= offset:
                chunk.path.unlink(missing_ok=True)
            elif chunk.end > offset:
                os.truncate(chunk.path, offset - chunk.start)
                kept.append(Chunk(chunk.start, chunk.path, offset - chunk.start))
            else:
                kept.append(chunk)
        staged = kept[-1].end if kept else 0
        if staged < offset:
            raise StagingError(f"staging for upload {directory.name} holds {staged} bytes, the store says {offset}")
        return kept

    async def truncate(self, upload_id: str, offset: int) -> None:
        await asyncio.to_thread(self._truncate, self.directory(upload_id), offset)

    async def open_writer(self, upload_id: str, offset: int) -> ChunkWriter:
        """A writer positioned at the committed ``offset``; anything staged past it is dropped."""
        directory = self.directory(upload_id)

        def _open() -> ChunkWriter:
            new_dir = not directory.exists()
            if new_dir:
                directory.mkdir(parents=True, exist_ok=True)
            kept = self._truncate(directory, offset)
            if kept and kept[-1].size < self.chunk_max_bytes:
                last = kept[-1]
                fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
                writer = ChunkWriter(self, directory, fd, last.start, offset)
            else:
                fd = os.open(_chunk_path(directory, offset), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                writer = ChunkWriter(self, directory, fd, offset, offset)
                writer._new_files = True
            if new_dir:
                _fsync_dir(directory.parent)
            return writer

        return await asyncio.to_thread(_open)

    async def staged_size(self, upload_id: str) -> int:
        chunks = await asyncio.to_thread(_list_chunks, self.directory(upload_id))
        return chunks[-1].end if chunks else 0

    async def read(self, upload_id: str, length: int, block_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The first ``length`` bytes of an upload, in blocks of at most ``block_size``."""
        chunks = await asyncio.to_thread(_list_chunks, self.directory(upload_id))
        position = 0
        for chunk in chunks:
            if position >= length:
                break
            if chunk.start != position:
                raise StagingError(f"staging for upload {upload_id} has a gap at byte {position}")
            want = min(chunk.size, length - position)
            with open(chunk.path, "rb", buffering=0) as f:
                while want > 0:
                    block = await asyncio.to_thread(f.read, min(block_size, want))
                    if not block:
                        raise StagingError(f"staging for upload {upload_id} ended early at byte {position}")
                    want -= len(block)
                    position += len(block)
                    yield block
        if position < length:
            raise StagingError(f"staging for upload {upload_id} holds {position} bytes, {length} expected")

    async def remove(self, upload_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.directory(upload_id), True)

    async def list_upload_ids(self) -> list[str]:
        def _list() -> list[str]:
            try:
                return [e.name for e in os.scandir(self.root) if e.is_dir()]
            except FileNotFoundError:
                return []

        return await asyncio.to_thread(_list)
