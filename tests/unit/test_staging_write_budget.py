"""Staging's writers share one node-wide budget for their batches: many uploads at once write
smaller batches, so the memory they hold is bounded per node, not per upload; the bytes staged
are the same whatever the batch size."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tusingest.staging.directory import DirectoryStaging

KiB = 1 << 10
MiB = 1 << 20


async def test_open_writers_divide_the_budget_and_a_lone_writer_gets_full_batches(tmp_path: Path) -> None:
    staging = DirectoryStaging(tmp_path, write_buffer_bytes=4 * MiB, write_budget_bytes=16 * MiB)
    try:
        alone = await staging.open_writer("alone", 0)
        assert staging.batch_bytes == 4 * MiB
        others = [await staging.open_writer(f"other-{n}", 0) for n in range(7)]
        assert staging.batch_bytes == 1 * MiB  # 16 MiB over 8 writers, two batches each
        many = [await staging.open_writer(f"many-{n}", 0) for n in range(56)]
        assert staging.batch_bytes == 256 * KiB  # never smaller than the floor
        for writer in [*others, *many]:
            await writer.aclose()
        assert staging.batch_bytes == 4 * MiB
        await alone.aclose()
        await alone.aclose()  # closing twice counts once
        assert staging.writers == 0
    finally:
        staging.close()


async def test_a_writer_among_many_hands_its_bytes_to_the_file_at_its_share_of_the_budget(tmp_path: Path) -> None:
    staging = DirectoryStaging(tmp_path, write_buffer_bytes=4 * MiB, write_budget_bytes=4 * MiB)
    try:
        writers = [await staging.open_writer(f"upload-{n}", 0) for n in range(4)]  # share: 512 KiB
        first = writers[0]
        await first.write(os.urandom(512 * KiB))  # reaches the share: goes to the file without a sync
        await first.drain()
        assert await staging.staged_size("upload-0") == 512 * KiB
        for writer in writers:
            await writer.aclose()
    finally:
        staging.close()


async def test_concurrent_writers_in_small_batches_stage_exactly_their_bytes(tmp_path: Path) -> None:
    staging = DirectoryStaging(tmp_path, write_buffer_bytes=1 * MiB, write_budget_bytes=2 * MiB)
    payloads = {f"upload-{n}": os.urandom(3 * MiB + n) for n in range(8)}

    async def stage(upload_id: str, data: bytes) -> int:
        async with await staging.open_writer(upload_id, 0) as writer:
            for start in range(0, len(data), 100 * KiB):  # pieces that do not divide a batch
                await writer.write(data[start : start + 100 * KiB])
            return await writer.sync()

    try:
        synced = await asyncio.gather(*(stage(upload_id, data) for upload_id, data in payloads.items()))
        assert synced == [len(data) for data in payloads.values()]
        for upload_id, data in payloads.items():
            staged = b"".join([block async for block in staging.read(upload_id, len(data))])
            assert staged == data
        assert staging.writers == 0
    finally:
        staging.close()
