"""Resumability: a PATCH cut off mid-body keeps every byte that arrived (invariant 2); bytes
staged past the committed offset are garbage (invariant 1); a resuming client is never locked
out by its own dead request (invariant 3)."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, upload_bytes
from tusingest.sessions.locks import MemoryLocker


async def create(client: httpx.AsyncClient, length: int) -> str:
    response = await client.post("/files/", headers=TUS | {"Upload-Length": str(length)})
    assert response.status_code == 201
    return response.headers["Location"]


async def staged(server: LiveServer, upload_id: str, length: int) -> bytes:
    return await upload_bytes(server, upload_id, length)


def patch_headers(offset: int, length: int) -> dict[str, str]:
    return TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS, "Content-Length": str(length)}


async def test_patch_cut_off_mid_body_keeps_every_received_byte_and_the_upload_resumes(server: LiveServer) -> None:
    payload = os.urandom(1 << 20)
    half = len(payload) // 2
    async with server.client() as client:
        url = await create(client, len(payload))
        upload_id = url.rsplit("/", 1)[1]
        _, writer = await open_request(url, "PATCH", patch_headers(0, len(payload)))
        writer.write(payload[:half])
        await writer.drain()
        writer.close()  # the network drops: half the body was sent
        await writer.wait_closed()

        async def committed() -> int:
            upload = await server.parts.store.get(upload_id)
            return -1 if upload is None else upload.offset

        await eventually(committed, lambda offset: offset == half)
        resumed_at = await client.head(url, headers=TUS)
        rest = await client.patch(url, headers=patch_headers(half, half), content=payload[half:])
    assert resumed_at.headers["Upload-Offset"] == str(half)
    assert rest.status_code == 204 and rest.headers["Upload-Offset"] == str(len(payload))
    assert await staged(server, upload_id, len(payload)) == payload


async def test_a_resuming_client_interrupts_its_stalled_patch_which_commits_what_it_received(
    start_server: ServerFactory,
) -> None:
    buffer = 64 << 10
    server = await start_server(staging_write_buffer_kb=buffer >> 10)
    payload = os.urandom(1 << 20)
    sent = 256 << 10
    async with server.client() as client:
        url = await create(client, len(payload))
        upload_id = url.rsplit("/", 1)[1]
        reader, writer = await open_request(url, "PATCH", patch_headers(0, len(payload)))
        writer.write(payload[:sent])
        await writer.drain()  # ...and then the client goes quiet, its connection still open

        # Staging shows the body arriving (less at most one write buffer still in memory).
        await eventually(lambda: server.parts.staging.staged_size(upload_id), lambda size: size > sent - buffer)
        resumed_at = await client.head(url, headers=TUS)  # asks the stalled PATCH to let go
        status, headers = await read_response(reader)  # the stalled PATCH's own answer
        offset = int(resumed_at.headers["Upload-Offset"])
        rest = await client.patch(url, headers=patch_headers(offset, len(payload) - offset), content=payload[offset:])
        writer.close()
    assert sent - buffer < offset <= sent
    assert (status, headers["upload-offset"], headers["connection"]) == (204, str(offset), "close")
    assert rest.status_code == 204
    assert await staged(server, upload_id, len(payload)) == payload


async def test_a_new_patch_interrupts_a_stalled_patch_and_gets_409_with_the_committed_offset(
    start_server: ServerFactory,
) -> None:
    buffer = 64 << 10
    server = await start_server(staging_write_buffer_kb=buffer >> 10)
    payload = os.urandom(512 << 10)
    sent = 128 << 10
    async with server.client() as client:
        url = await create(client, len(payload))
        upload_id = url.rsplit("/", 1)[1]
        _, writer = await open_request(url, "PATCH", patch_headers(0, len(payload)))
        writer.write(payload[:sent])
        await writer.drain()
        await eventually(lambda: server.parts.staging.staged_size(upload_id), lambda size: size > sent - buffer)
        # A client that lost track retries from 0: it is not locked out, it learns the offset.
        retry = await client.patch(url, headers=patch_headers(0, len(payload)), content=payload)
        writer.close()
        after = await client.head(url, headers=TUS)
    assert retry.status_code == 409
    assert sent - buffer < int(after.headers["Upload-Offset"]) <= sent


@pytest.mark.directory_staging
async def test_bytes_staged_past_the_committed_offset_are_ignored_then_overwritten(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 20)  # stays incomplete, so its staging is still there to look at
        upload_id = url.rsplit("/", 1)[1]
        await client.patch(url, headers=patch_headers(0, 5), content=b"hello")
        # A crash after staging but before the commit: garbage past the offset, in the chunk
        # file and in a chunk file of its own.
        directory = server.parts.staging.directory(upload_id)
        (chunk,) = directory.iterdir()
        chunk.write_bytes(chunk.read_bytes() + b"GARBAGE")
        (directory / f"{12:020d}.chunk").write_bytes(b"MORE GARBAGE")
        reported = await client.head(url, headers=TUS)
        rest = await client.patch(url, headers=patch_headers(5, 6), content=b" world")
    assert reported.headers["Upload-Offset"] == "5"
    assert rest.status_code == 204 and rest.headers["Upload-Offset"] == "11"
    assert await staged(server, upload_id, 11) == b"hello world"
    assert sorted(p.name for p in directory.iterdir()) == [f"{0:020d}.chunk"]


@pytest.mark.directory_staging
async def test_an_upload_spanning_several_chunk_files_reads_back_exactly(start_server: ServerFactory) -> None:
    server = await start_server(staging_chunk_max_mb=1, staging_write_buffer_kb=256)
    payload = os.urandom((3 << 20) + 12345)
    async with server.client() as client:
        url = await create(client, len(payload) + 1)  # one byte short until the end: staging stays to look at
        upload_id = url.rsplit("/", 1)[1]
        offset = 0
        for size in (700_000, 1_500_000, len(payload) - 2_200_000):
            response = await client.patch(
                url, headers=patch_headers(offset, size), content=payload[offset : offset + size]
            )
            assert response.status_code == 204
            offset += size
        chunk_files = len(list(server.parts.staging.directory(upload_id).iterdir()))
        staged_before = await staged(server, upload_id, len(payload))
        last = await client.patch(url, headers=patch_headers(offset, 1), content=b"!")
    assert chunk_files >= 3
    assert staged_before == payload
    # The finaliser read the chunk files in order into the stored file.
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed"
    assert await staged(server, upload_id, len(payload) + 1) == payload + b"!"


async def test_a_patch_interrupted_before_its_first_byte_gets_400_and_the_patch_that_took_over_204(
    sqlite_server: LiveServer,
) -> None:
    server = sqlite_server
    locker = server.parts.locker
    assert isinstance(locker, MemoryLocker)
    async with server.client() as client:
        url = await create(client, 6)
        upload_id = url.rsplit("/", 1)[1]
        reader, writer = await open_request(url, "PATCH", patch_headers(0, 6))  # not a byte of its body follows

        async def held() -> bool:
            return locker.is_locked(upload_id)

        await eventually(held, bool)  # the first PATCH holds the upload, waiting for its body
        second = await client.patch(url, headers=patch_headers(0, 6), content=b"abcdef")
        try:
            async with asyncio.timeout(10):
                status, headers = await read_response(reader)
                body = await reader.readexactly(int(headers["content-length"]))
        finally:
            writer.close()
    assert (status, headers["upload-offset"]) == (400, "0")
    assert body == b"upload has been interrupted by another request for this upload resource\n"
    assert second.status_code == 204 and second.headers["Upload-Offset"] == "6"
    assert await staged(server, upload_id, 6) == b"abcdef"


async def test_an_upload_held_past_the_lock_timeout_answers_423_with_retry_after(start_server: ServerFactory) -> None:
    server = await start_server(lock_timeout_seconds=0.3)
    async with server.client() as client:
        url = await create(client, 10)
        upload_id = url.rsplit("/", 1)[1]
        # A holder that never lets go (a request stuck in the store, say): no release callback.
        async with server.parts.locker.lock(upload_id):
            response = await client.patch(url, headers=patch_headers(0, 3), content=b"abc")
        after = await client.head(url, headers=TUS)
    assert response.status_code == 423
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert after.headers["Upload-Offset"] == "0"


async def test_a_session_store_that_went_away_is_a_503_that_still_speaks_tus(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        await server.parts.store.close()  # the store goes away under the running server
        response = await client.head(url, headers=TUS)
        await server.parts.store.open()
    assert response.status_code == 503
    assert response.headers["Tus-Resumable"] == "1.0.0"
