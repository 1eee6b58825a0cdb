"""Chunk files on a directory (a shared volume in a cluster).

Layout: ``<root>/<upload id>/<start offset, 20 digits>.chunk``. A PATCH appends to the last
chunk file while it is below ``chunk_max_bytes`` and opens a new one after, so a long upload
is a handful of large files, and a concatenated upload can refer to its partials' chunks.

Bytes gather in memory and go to the page cache in large batches (``write_buffer_bytes``) on
staging's own threads, one batch in flight per request, so the event loop keeps receiving
while a batch is copied; there is no thread hop per received chunk. Opening, truncating and
the fsync at the commit point run once per request on the same threads. The node's writers
share one budget for these buffers (``write_budget_bytes``): many at once write smaller batches,
so memory stays bounded as uploads are added, not per upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import io
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tusingest.staging.base import StagedObject, StagingError
from tusingest.staging.digests import DigestCache, RunningDigest
from tusingest.staging.fileio import IOV_MAX, writev_all

_CHUNK_NAME = re.compile(r"^(\d{20})\.chunk$")
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
# A new chunk file's descriptor, and whether its folder and the folder's parent gained an entry.
type _Created = tuple[int, bool, bool]
# A writer holds at most this many batches: one gathering, one in flight on a staging thread.
_BATCHES_PER_WRITER = 2
# The smallest batch a shared budget cuts to: below it, thread hops per byte start to cost.
_MIN_BATCH_BYTES = 256 << 10
# A last batch up to this size (a small file's body, a short tail) is written, hashed and synced in one
# thread call, saving three thread hand-offs; its MD5 and SHA-256 then run one after the other (about
# 0.2 ms for 64 KiB, 0.7 ms at this size), so larger ones keep the two hashes beside the write.
_ONE_CALL_BYTES = 256 << 10


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
            try:
                size = entry.stat().st_size
            except FileNotFoundError:  # discarded between the listing and now
                continue
            chunks.append(Chunk(int(match.group(1)), Path(entry.path), size))
    chunks.sort(key=lambda c: c.start)
    return chunks


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _remove_tree(directory: Path) -> None:
    """Remove an upload's folder, also when a file appears in it meanwhile: a compression follower
    that opens its spool while the folder is being removed makes the last ``rmdir`` fail, and the
    folder would stay behind (empty, once the follower gives its spool up). A second pass removes
    the late file; the follower opens its spool only once, so a third is never needed."""
    for _ in range(2):
        shutil.rmtree(directory, ignore_errors=True)
        if not os.path.lexists(directory):
            return


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing dirty pages now; a hint, so failures are ignored."""
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class ChunkWriter:
    """Appends one request's bytes at a known offset; ``sync`` makes them durable.

    Bytes gather in memory up to ``write_buffer_bytes``, then go to the page cache on a staging
    thread while the event loop keeps receiving, in calls of at most ``fileio.WRITE_PIECE``
    bytes (why: ``staging/fileio.py``). At most one batch is in flight, so a request holds at
    most two buffers. ``sync_file_range`` starts writeback of each batch at once, so the fsync
    at the commit point has little left to do.

    With a ``RunningDigest`` (positioned at ``offset``), each batch's MD5 and SHA-256 run on two
    more staging threads while it is written (hashlib lets go of the GIL), so the slowest of the
    three, not their sum, sets the pace; ``digest`` then covers exactly the bytes up to ``offset``.

    Not safe for concurrent use: one writer per upload at a time is the locker's job.
    """

    def __init__(
        self,
        staging: DirectoryStaging,
        directory: Path,
        fd: int,
        chunk_start: int,
        offset: int,
        digest: RunningDigest | None = None,
        *,
        create: Callable[[], _Created] | None = None,
    ) -> None:
        self._staging = staging
        self._digest = digest
        self._directory = directory
        self._fd = fd
        # A writer at offset 0 makes its folder and first chunk file in its first thread call (fd -1
        # until then): a small upload's body is then opened, written, hashed and synced in one.
        self._create = create
        self._chunk_start = chunk_start
        self._start_offset = offset
        self._queued = offset  # the upload offset after every batch handed to the thread
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._inflight: Awaitable[object] | None = None  # the batch being written (and hashed)
        self._hashing = 0  # its size, when it is being hashed too
        self._writing: Future[None] | None = None  # the thread's own handle on the batch being written
        self._new_files = False
        self._new_directory = False
        self._closed = False

    @property
    def upload_id(self) -> str:
        return self._directory.name

    @property
    def offset(self) -> int:
        """The upload offset after everything written so far (synced or not)."""
        return self._queued + self._pending_bytes

    @property
    def written(self) -> int:
        return self.offset - self._start_offset

    @property
    def digest(self) -> RunningDigest | None:
        """The running digest of the upload up to the synced offset (valid after ``sync``); None
        without one, or once the writer's bytes were discarded. Keep it only after the commit."""
        return self._digest

    async def __aenter__(self) -> ChunkWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        # A batch also goes once it holds one writev's worth of pieces (many small reads).
        if self._pending_bytes >= self._staging.batch_bytes or len(self._pending) >= IOV_MAX:
            await self._flush()

    async def _wait_inflight(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            hashed, self._hashing = self._hashing, 0
            await inflight
            if self._digest is not None:  # None: the write failed, and nothing of it is kept
                self._digest.advance(hashed)

    def _take_batch(self) -> tuple[list[bytes], int, int | None]:
        """The gathered bytes as the next batch: the bytes, their size, and the offset at which a new
        chunk file begins for them (None: the current one goes on)."""
        batch, size = self._pending, self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        roll_at = self._queued if self._queued - self._chunk_start >= self._staging.chunk_max_bytes else None
        if roll_at is not None:
            self._chunk_start = roll_at
        self._queued += size
        return batch, size, roll_at

    async def _flush(self) -> None:
        await self._wait_inflight()
        if not self._pending:
            return
        batch, size, roll_at = self._take_batch()
        loop = asyncio.get_running_loop()
        executor = self._staging.executor
        self._writing = executor.submit(self._write_batch, batch, roll_at)
        write = asyncio.wrap_future(self._writing)
        digest = self._digest
        if digest is None:
            self._inflight = write
            return
        # All three finish before the next batch starts (``_wait_inflight``): each hash sees its
        # batches in order, and a request still holds at most two batches.
        self._inflight = asyncio.gather(
            write,
            loop.run_in_executor(executor, digest.update_md5, batch),
            loop.run_in_executor(executor, digest.update_sha256, batch),
        )
        self._hashing = size

    def _write_batch(self, batch: list[bytes], roll_at: int | None) -> None:
        """Runs on a staging thread, never two at once for one writer."""
        self._ensure_open()
        try:
            if roll_at is not None:
                os.close(self._fd)
                self._fd = os.open(_chunk_path(self._directory, roll_at), _CREATE_FLAGS, 0o640)
                self._new_files = True
            writev_all(self._fd, batch)
            _start_writeback(self._fd)
        except OSError as exc:
            self._digest = None  # what reached the file is unknown now; nothing of it is kept
            raise StagingError(f"cannot write staged bytes of upload {self._directory.name}: {exc}") from exc

    async def drain(self) -> None:
        """Hand everything to the file (not synced): ``digest`` then covers every byte written."""
        await self._flush()
        await self._wait_inflight()

    async def sync(self) -> int:
        """Write out everything and fsync it; returns the durable offset. Call before committing."""
        if self._inflight is None and 0 < self._pending_bytes <= _ONE_CALL_BYTES:
            return await self._write_and_sync()
        await self.drain()
        await asyncio.get_running_loop().run_in_executor(self._staging.executor, self._fsync)
        self._new_files = self._new_directory = False
        return self._queued

    async def _write_and_sync(self) -> int:
        """``sync`` for a short last batch (a small file's whole body, the tail of a request): its
        write, its two digests and the fsync in one thread call instead of four."""
        batch, size, roll_at = self._take_batch()
        digest = self._digest

        def _job() -> None:
            self._write_batch(batch, roll_at)
            if digest is not None:
                digest.update_md5(batch)
                digest.update_sha256(batch)
            self._fsync()

        self._writing = self._staging.executor.submit(_job)
        await asyncio.wrap_future(self._writing)
        if self._digest is not None:  # None: the write failed, and nothing of it is kept
            self._digest.advance(size)
        self._new_files = self._new_directory = False
        return self._queued

    def _ensure_open(self) -> None:
        """Runs on a staging thread: the folder and first chunk file of a writer at offset 0."""
        if self._create is None:
            return
        create, self._create = self._create, None
        try:
            self._fd, self._new_files, self._new_directory = create()
        except OSError as exc:
            self._digest = None
            raise StagingError(f"cannot open staging for upload {self._directory.name}: {exc}") from exc

    def _fsync(self) -> None:
        """Runs on a staging thread once every batch is in the file: the file, and the folders that
        gained an entry since the last sync."""
        self._ensure_open()  # a request with no body still leaves its upload's folder and file
        directory = self._directory
        try:
            os.fsync(self._fd)
            if self._new_files:
                _fsync_dir(directory)
            if self._new_directory:
                _fsync_dir(directory.parent)
        except OSError as exc:
            raise StagingError(f"cannot sync staged bytes of upload {directory.name}: {exc}") from exc

    async def discard(self) -> None:
        """Forget this request's bytes: cut the staged data back to where the writer started."""
        self._pending, self._pending_bytes = [], 0
        self._digest = None
        await self.aclose()
        await self._staging.truncate(self._directory.name, self._start_offset)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._staging._closed(self)
        try:
            with contextlib.suppress(StagingError):
                await self._wait_inflight()
        finally:
            writing = self._writing
            if writing is not None and not writing.done():
                # Cancelled while a batch is still being written on its thread: close the file after
                # that write, never under it (a reused descriptor would take the rest of the batch).
                writing.add_done_callback(lambda _: self._close_fd())
            else:
                self._close_fd()

    def _close_fd(self) -> None:
        self._create = None  # closed before its first write: nothing was made, nothing is to be
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True, slots=True)
class _Span:
    """The part of one chunk file that holds bytes of a wanted range."""

    chunk: Chunk
    skip: int  # where in the file the range begins
    size: int  # how many of its bytes belong to the range


def _covering(chunks: list[Chunk], upload_id: str, length: int, start: int = 0) -> list[_Span]:
    """The spans of ``chunks`` that hold bytes ``start`` up to ``length``, in order; StagingError where a
    chunk is missing in between or the chunks end before ``length`` (staging and store disagree)."""
    spans, position = [], 0
    for chunk in chunks:
        if position >= length:
            break
        if chunk.start != position:
            raise StagingError(f"staging for upload {upload_id} has a gap at byte {position}")
        end = min(chunk.end, length)
        if end > start:
            skip = max(0, start - chunk.start)
            spans.append(_Span(chunk, skip, end - chunk.start - skip))
        position = end
    if position < length:
        raise StagingError(f"staging for upload {upload_id} holds {position} bytes, {length} expected")
    return spans


def _catch_up(
    digest: RunningDigest, upload_id: str, chunks: list[Chunk], offset: int, block_size: int = 1 << 20
) -> RunningDigest:
    """``digest`` moved on to ``offset`` by the staged bytes from its own offset up to there."""
    buffer = memoryview(bytearray(block_size))
    for span in _covering(chunks, upload_id, offset, digest.offset):
        want = span.size
        with io.FileIO(span.chunk.path, "r") as f:
            if span.skip:
                f.seek(span.skip)
            while want > 0:
                got = f.readinto(buffer[: min(block_size, want)])
                if not got:
                    raise StagingError(f"staging for upload {upload_id} ended early at byte {digest.offset}")
                digest.update(buffer[:got])
                want -= got
    return digest


class DirectoryStaging:
    def __init__(
        self,
        root: str | Path,
        *,
        chunk_max_bytes: int = 8 << 30,
        write_buffer_bytes: int = 4 << 20,
        write_budget_bytes: int | None = None,
        digest_catch_up_bytes: int = 64 << 20,
        threads: int = 16,
        digests: DigestCache | None = None,
    ) -> None:
        """``write_budget_bytes``: what all open writers' batches may hold together (default: two
        writers' worth at ``write_buffer_bytes``); a batch never shrinks below 256 KiB for it."""
        self.root = Path(root)
        # The running digests of uploads written on this node (``ChunkWriter.digest``).
        self.digests = digests if digests is not None else DigestCache()
        self.chunk_max_bytes = chunk_max_bytes
        self.write_buffer_bytes = write_buffer_bytes
        self.write_budget_bytes = write_budget_bytes or 2 * _BATCHES_PER_WRITER * write_buffer_bytes
        # The open writer of each upload (one at a time: the locker's job; changed on the event loop
        # only): what it has taken counts as staged before any of it is in a file, as on S3.
        self._open: dict[str, ChunkWriter] = {}
        # The most staged bytes a writer reads back to bring a running digest up to its offset
        # (about 0.15 s of hashing); beyond it, the finaliser hashes the whole file once instead.
        self.digest_catch_up_bytes = digest_catch_up_bytes
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None

    @property
    def batch_bytes(self) -> int:
        """The size at which a writer hands its gathered bytes to a staging thread: the budget
        shared by the open writers, at most ``write_buffer_bytes``."""
        share = self.write_budget_bytes // (_BATCHES_PER_WRITER * max(1, self.writers))
        return max(min(share, self.write_buffer_bytes), min(_MIN_BATCH_BYTES, self.write_buffer_bytes))

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Staging's own threads: its blocking calls never queue behind other work's."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="staging")
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def _run[T](self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function)

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
        directory = self.directory(upload_id)
        await self._run(lambda: self._truncate(directory, offset))

    async def open_writer(self, upload_id: str, offset: int, *, digest_tag: str | None = None) -> ChunkWriter:
        """A writer positioned at the committed ``offset``; anything staged past it is dropped.

        With a ``digest_tag`` (which upload of this id it is) the writer keeps a running digest: a
        copy of the one this node kept, brought up to ``offset`` from the staged bytes when other
        nodes wrote some since, or rebuilt from the staged prefix when it keeps none (the upload
        was begun on another node, or before a restart); None when that would mean reading more
        than ``digest_catch_up_bytes``. Call under the upload's lock, like every write."""
        directory = self.directory(upload_id)

        def _digest(kept: list[Chunk]) -> RunningDigest | None:
            if digest_tag is None:
                return None
            if offset == 0:
                return RunningDigest(digest_tag)
            digest = self.digests.take(upload_id, digest_tag, offset) or RunningDigest(digest_tag)
            if offset - digest.offset > self.digest_catch_up_bytes:
                return None  # the finaliser hashes the file as it reads it
            return _catch_up(digest, upload_id, kept, offset) if digest.offset < offset else digest

        def _open() -> ChunkWriter:
            try:
                return _open_at(directory, offset)
            except OSError as exc:
                raise StagingError(f"cannot open staging for upload {upload_id}: {exc}") from exc

        def _create_at_zero() -> _Created:
            """The folder and the chunk file at offset 0; a folder left by an earlier attempt is emptied."""
            try:
                directory.mkdir()
                new_directory = True
            except FileExistsError:
                self._truncate(directory, 0)
                new_directory = False
            return os.open(_chunk_path(directory, 0), _CREATE_FLAGS, 0o640), True, new_directory

        def _open_at(directory: Path, offset: int) -> ChunkWriter:
            kept = self._truncate(directory, offset)
            digest = _digest(kept)
            if kept and kept[-1].size < self.chunk_max_bytes:
                last = kept[-1]
                fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
                return ChunkWriter(self, directory, fd, last.start, offset, digest)
            fd = os.open(_chunk_path(directory, offset), _CREATE_FLAGS, 0o640)
            writer = ChunkWriter(self, directory, fd, offset, offset, digest)
            writer._new_files = True
            return writer

        if offset == 0:  # nothing to list or cut before the first write: that call makes the file
            writer = ChunkWriter(self, directory, -1, 0, 0, _digest([]), create=_create_at_zero)
        else:
            writer = await self._run(_open)
        self._open[upload_id] = writer  # here, on the event loop, not in _open's thread: aclose ends it there too
        return writer

    async def seal(self, upload_id: str, length: int) -> None:
        """Chunk files are readable as they are: nothing to do."""

    def reads_unsealed(self, upload_id: str, committed: int, start: int = 0) -> bool:
        return True

    async def staged_object(self, upload_id: str, length: int) -> StagedObject | None:
        return None  # chunk files, not an object

    @property
    def writers(self) -> int:
        """How many ChunkWriters are open on this node."""
        return len(self._open)

    def _closed(self, writer: ChunkWriter) -> None:
        if self._open.get(writer.upload_id) is writer:
            del self._open[writer.upload_id]

    async def staged_size(self, upload_id: str) -> int:
        """What this node's writer of the upload has taken, else what its chunk files hold (committed or not)."""
        writer = self._open.get(upload_id)
        if writer is not None:
            return writer.offset
        directory = self.directory(upload_id)
        chunks = await self._run(lambda: _list_chunks(directory))
        return chunks[-1].end if chunks else 0

    async def read(
        self, upload_id: str, length: int, block_size: int = 1 << 20, *, start: int = 0, committed: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` up to ``length`` of an upload, in blocks of at most ``block_size``.

        Every chunk file needed is opened before the first block, so a reader that has begun goes
        on to the end even when the upload's folder is removed meanwhile (its finalisation cleaned up).
        """
        directory = self.directory(upload_id)

        def _open() -> list[tuple[io.FileIO, int, int]]:
            opened: list[tuple[io.FileIO, int, int]] = []  # (file, where to start in it, how much to read)
            try:
                for span in _covering(_list_chunks(directory), upload_id, length, start):
                    opened.append((io.FileIO(span.chunk.path, "r"), span.skip, span.size))
            except BaseException:
                for f, _, _ in opened:
                    f.close()
                raise
            return opened

        try:
            opened = await self._run(_open)
        except OSError as exc:  # a chunk discarded between the listing and the opening
            raise StagingError(f"cannot open staging for upload {upload_id}: {exc}") from exc
        try:
            for f, skip, want in opened:
                if skip:
                    await self._run(functools.partial(f.seek, skip))
                while want > 0:
                    block = await self._run(functools.partial(f.read, min(block_size, want)))
                    if not block:
                        raise StagingError(f"staging for upload {upload_id} ended early")
                    want -= len(block)
                    yield block
        finally:
            for f, _, _ in opened:
                f.close()

    async def chunk_files(self, upload_id: str, length: int) -> list[tuple[Path, int]]:
        """The staged files that hold the first ``length`` bytes, in order, each with how many of
        its bytes belong to them: for a Storage Element that takes files (link, kernel copy)."""
        files, _ = await self.use_chunk_files(upload_id, length, lambda files: None)
        return files

    async def use_chunk_files[T](
        self, upload_id: str, length: int, use: Callable[[list[tuple[Path, int]]], T]
    ) -> tuple[list[tuple[Path, int]], T]:
        directory = self.directory(upload_id)

        def _list_and_use() -> tuple[list[tuple[Path, int]], T]:
            files = [(span.chunk.path, span.size) for span in _covering(_list_chunks(directory), upload_id, length)]
            return files, use(files)

        return await self._run(_list_and_use)

    async def remove(self, upload_id: str) -> None:
        directory = self.directory(upload_id)
        self.digests.forget(upload_id)
        await self._run(lambda: _remove_tree(directory))

    async def last_written(self, upload_id: str) -> datetime | None:
        """When the upload's folder or a file in it last changed; None when there is no folder."""
        directory = self.directory(upload_id)

        def _newest() -> float | None:
            try:
                newest = directory.stat().st_mtime
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return None
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            return newest

        newest = await self._run(_newest)
        return None if newest is None else datetime.fromtimestamp(newest, UTC)

    async def list_upload_ids(self) -> list[str]:
        def _list() -> set[str]:
            try:
                return {e.name for e in os.scandir(self.root) if e.is_dir()}
            except FileNotFoundError:
                return set()

        # With the uploads whose writer has not made their folder yet, as on S3.
        return sorted(await self._run(_list) | self._open.keys())
