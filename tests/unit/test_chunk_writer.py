"""Staging's ChunkWriter on a real directory: the hashes of many batches run beside their writes and
come out in order, and a request cancelled while a batch is being written never has the file closed
under that write (a reused descriptor would receive the rest of the batch)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from tusingest.staging import DirectoryStaging, StagingError


async def test_batches_of_every_size_are_written_and_hashed_in_order(tmp_path: Path) -> None:
    staging = DirectoryStaging(tmp_path, write_buffer_bytes=64 << 10)
    pieces = [random.Random(seed).randbytes(random.Random(seed).randint(1, 200_000)) for seed in range(60)]
    try:
        async with await staging.open_writer("u", 0, digest_tag="t") as writer:
            for piece in pieces:
                await writer.write(piece)
            offset = await writer.sync()
            digest = writer.digest
    finally:
        staging.close()
    data = b"".join(pieces)
    assert offset == len(data)
    assert (tmp_path / "u" / f"{0:020d}.chunk").read_bytes() == data
    assert digest is not None and digest.offset == len(data)
    assert digest.md5.hexdigest() == hashlib.md5(data).hexdigest()
    assert digest.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_a_cancelled_request_never_closes_the_file_under_a_batch_still_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write is held inside ``os.writev`` by a wrapper around the real call: a timing seam, so the
    cancellation lands while the thread is in the middle of the batch."""
    staging = DirectoryStaging(tmp_path, write_buffer_bytes=64 << 10)
    inside, release = threading.Event(), threading.Event()
    real_writev = os.writev

    def held_writev(fd: int, buffers: list[bytes]) -> int:
        inside.set()
        release.wait(30)
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", held_writev)
    writer = await staging.open_writer("u", 0, digest_tag="t")
    chunk = tmp_path / "u" / f"{0:020d}.chunk"

    async def request() -> None:
        async with writer:
            await writer.write(b"a" * (64 << 10))  # a full buffer: the batch goes to a thread
            await writer.drain()

    task = asyncio.create_task(request())
    assert await asyncio.to_thread(inside.wait, 30)
    fd = writer._fd
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.fstat(fd).st_ino == chunk.stat().st_ino  # still open: its batch is still being written
    release.set()
    await asyncio.to_thread(staging.close)  # waits for the staging threads to finish
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once the write was done
    assert chunk.read_bytes() == b"a" * (64 << 10)


def _count_submissions(staging: DirectoryStaging, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs handed to staging's threads from now on (a spy: each still runs on the real pool)."""
    handed: list[str] = []
    executor = staging.executor
    real_submit = executor.submit

    def submit(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        handed.append(getattr(fn, "__name__", repr(fn)))
        return real_submit(fn, *args, **kwargs)

    monkeypatch.setattr(executor, "submit", submit)
    return handed


async def test_a_short_body_is_written_hashed_and_synced_in_one_thread_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From opening to synced: a writer at offset 0 makes its folder and chunk file in that call too."""
    staging = DirectoryStaging(tmp_path)  # 4 MiB batches: a 64 KiB body is one short last batch
    handed = _count_submissions(staging, monkeypatch)
    data = random.Random(7).randbytes(64 << 10)
    try:
        async with await staging.open_writer("u", 0, digest_tag="t") as writer:
            assert not (tmp_path / "u").exists()  # nothing made yet
            await writer.write(data[:1000])
            await writer.write(data[1000:])
            offset = await writer.sync()
            digest = writer.digest
    finally:
        staging.close()
    assert len(handed) == 1, handed
    assert offset == len(data)
    assert (tmp_path / "u" / f"{0:020d}.chunk").read_bytes() == data
    assert digest is not None and digest.offset == len(data)
    assert digest.md5.hexdigest() == hashlib.md5(data).hexdigest()
    assert digest.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_a_short_last_batch_that_begins_a_new_chunk_file_lands_in_it(tmp_path: Path) -> None:
    staging = DirectoryStaging(tmp_path, write_buffer_bytes=64 << 10, chunk_max_bytes=64 << 10)
    first, rest = b"a" * (64 << 10), b"b" * 5000
    try:
        async with await staging.open_writer("u", 0, digest_tag="t") as writer:
            await writer.write(first)  # a full batch: written in its own call, fills the first chunk file
            await writer.write(rest)  # the short last batch: after the roll, in one call with the fsync
            offset = await writer.sync()
            digest = writer.digest
    finally:
        staging.close()
    assert offset == len(first) + len(rest)
    assert (tmp_path / "u" / f"{0:020d}.chunk").read_bytes() == first
    assert (tmp_path / "u" / f"{len(first):020d}.chunk").read_bytes() == rest
    assert digest is not None and digest.md5.hexdigest() == hashlib.md5(first + rest).hexdigest()


async def test_a_writer_at_offset_0_over_an_earlier_attempts_folder_starts_it_afresh(tmp_path: Path) -> None:
    folder = tmp_path / "u"
    folder.mkdir()
    (folder / f"{0:020d}.chunk").write_bytes(b"stale bytes of an attempt that never committed")
    (folder / f"{100:020d}.chunk").write_bytes(b"more of them")
    staging = DirectoryStaging(tmp_path)
    try:
        async with await staging.open_writer("u", 0, digest_tag="t") as writer:
            await writer.write(b"fresh")
            assert await writer.sync() == 5
            digest = writer.digest
    finally:
        staging.close()
    assert sorted(p.name for p in folder.iterdir()) == [f"{0:020d}.chunk"]
    assert (folder / f"{0:020d}.chunk").read_bytes() == b"fresh"
    assert digest is not None and digest.md5.hexdigest() == hashlib.md5(b"fresh").hexdigest()


async def test_a_writer_at_offset_0_closed_before_its_first_byte_leaves_nothing(tmp_path: Path) -> None:
    staging = DirectoryStaging(tmp_path)
    try:
        writer = await staging.open_writer("u", 0, digest_tag="t")
        await writer.aclose()
        assert staging.writers == 0
    finally:
        staging.close()
    assert not (tmp_path / "u").exists()


async def test_a_sync_with_no_bytes_still_leaves_the_uploads_folder_and_file(tmp_path: Path) -> None:
    staging = DirectoryStaging(tmp_path)
    try:
        async with await staging.open_writer("u", 0) as writer:
            assert await writer.sync() == 0
    finally:
        staging.close()
    assert (tmp_path / "u" / f"{0:020d}.chunk").read_bytes() == b""


async def test_a_folder_that_cannot_be_made_fails_the_first_write_with_a_staging_error(tmp_path: Path) -> None:
    (tmp_path / "u").write_bytes(b"a file where the upload's folder belongs")
    staging = DirectoryStaging(tmp_path)
    try:
        async with await staging.open_writer("u", 0, digest_tag="t") as writer:
            await writer.write(b"x" * 100)
            with pytest.raises(StagingError, match="cannot open staging for upload u"):
                await writer.sync()
            assert writer.digest is None  # nothing of it is kept
    finally:
        staging.close()
    assert (tmp_path / "u").read_bytes() == b"a file where the upload's folder belongs"
