"""Bounds on what one request may cost the server: the size and field count of its head (431
beyond), the time its head may take, and how slowly its body may arrive. A body cut off for
slowness ends like a disconnect: what arrived is committed and the client resumes from there.

Store-independent: every test runs on SQLite only, with short timeouts set per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator

import pytest

from tests.fixtures.rawhttp import open_request, read_response
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, upload_bytes


@pytest.fixture
def store_url(sqlite_url: str) -> str:
    return sqlite_url  # nothing here depends on the session store: run once


async def create(server: LiveServer, length: int) -> str:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": str(length)})
    assert response.status_code == 201
    return str(response.headers["Location"])


def patch_headers(offset: int, length: int) -> dict[str, str]:
    return TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS, "Content-Length": str(length)}


async def raw_exchange(server: LiveServer, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` as it is; the answer's status, headers and body."""
    port = int(server.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(10):
            status, headers = await read_response(reader)
            body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    return status, headers, body


def options_head(*fields: str) -> bytes:
    lines = ["OPTIONS /files/ HTTP/1.1", "Host: test", "Tus-Resumable: 1.0.0", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.asynccontextmanager
async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> AsyncIterator[list[int]]:
    """Send ``data`` one byte every ``every`` seconds in the background (the slow client under
    test); yields the count sent so far, and stops when the block ends or the server hangs up."""
    sent = [0]

    async def run() -> None:
        with contextlib.suppress(OSError):
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                sent[0] += 1
                await asyncio.sleep(every)

    task = asyncio.create_task(run())
    try:
        yield sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.close()


# -- the request head -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "status"), [(100, 204), (101, 431)])
async def test_a_head_with_more_header_fields_than_allowed_gets_431_with_a_text_body(
    sqlite_server: LiveServer, fields: int, status: int
) -> None:
    # Host and Tus-Resumable count: REQUEST_HEADERS_MAX (100) is every field of the head.
    filler = [f"X-Filler-{n}: {n}" for n in range(fields - 2)]
    answered, headers, body = await raw_exchange(sqlite_server, options_head(*filler))
    assert answered == status
    if status == 431:
        assert headers["content-type"].startswith("text/plain")
        assert b"101 header fields; at most 100" in body


async def test_ten_thousand_header_fields_get_431(sqlite_server: LiveServer) -> None:
    status, _, _ = await raw_exchange(sqlite_server, options_head(*(f"X-{n}: v" for n in range(10_000))))
    assert status == 431


@pytest.mark.parametrize(("pad_kib", "status"), [(30, 204), (33, 431), (96, 431)])
async def test_a_head_over_request_head_max_kb_gets_431(sqlite_server: LiveServer, pad_kib: int, status: int) -> None:
    answered, _, _ = await raw_exchange(sqlite_server, options_head("X-Pad: " + "a" * (pad_kib << 10)))
    assert answered == status


async def test_a_head_that_grows_past_the_limit_unfinished_gets_431_before_it_ends(sqlite_server: LiveServer) -> None:
    # 40 KiB of a head that is still going: the parser refuses it without waiting for its end.
    unfinished = b"OPTIONS /files/ HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"a" * (40 << 10)
    status, headers, _ = await raw_exchange(sqlite_server, unfinished)
    assert (status, headers["connection"]) == (431, "close")


async def test_a_head_trickled_slowly_is_cut_off_after_request_head_timeout_seconds(
    start_server: ServerFactory,
) -> None:
    server = await start_server(request_head_timeout_seconds=1)
    head = options_head("X-Pad: " + "a" * 100)
    port = int(server.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with trickle(writer, head, every=0.1) as sent:
        async with asyncio.timeout(10):
            answer = await reader.read()  # until the server closes the connection
        elapsed = loop.time() - started
    assert answer == b""  # cut off without an answer: the request never began
    assert sent[0] < len(head)
    assert 0.9 < elapsed < 5


# -- the request body -----------------------------------------------------------------------------


async def test_a_patch_body_that_stops_is_cut_after_the_idle_timeout_keeps_what_arrived_and_resumes(
    start_server: ServerFactory,
) -> None:
    server = await start_server(body_idle_timeout_seconds=1, body_min_rate_kbps=0)
    payload = os.urandom(100_000)
    url = await create(server, len(payload))
    reader, writer = await open_request(url, "PATCH", patch_headers(0, len(payload)))
    try:
        writer.write(payload[:30_000])
        await writer.drain()  # ...and then not another byte, the connection left open
        async with asyncio.timeout(10):
            status, headers = await read_response(reader)
            closed = await reader.read() == b""
    finally:
        writer.close()
    async with server.client() as client:
        head = await client.head(url, headers=TUS)
        rest = await client.patch(url, headers=patch_headers(30_000, 70_000), content=payload[30_000:])
    assert (status, headers["upload-offset"], headers["connection"]) == (204, "30000", "close")
    assert closed
    assert head.headers["Upload-Offset"] == "30000"
    assert rest.status_code == 204 and rest.headers["Upload-Offset"] == str(len(payload))
    assert await upload_bytes(server, url.rsplit("/", 1)[1], len(payload)) == payload


async def test_a_patch_body_trickled_below_the_minimum_rate_is_cut_and_the_client_resumes(
    start_server: ServerFactory,
) -> None:
    # 20 bytes/s against a minimum of 1 KiB/s over 1-second windows; the idle timeout never fires.
    server = await start_server(body_min_rate_kbps=1, body_min_rate_window_seconds=1, body_idle_timeout_seconds=60)
    payload = os.urandom(10_000)
    url = await create(server, len(payload))
    reader, writer = await open_request(url, "PATCH", patch_headers(0, len(payload)))
    async with trickle(writer, payload, every=0.05) as sent:
        async with asyncio.timeout(10):
            status, headers = await read_response(reader)
        sent_by_then = sent[0]
    offset = int(headers["upload-offset"])
    async with server.client() as client:
        head = await client.head(url, headers=TUS)
        rest = await client.patch(url, headers=patch_headers(offset, len(payload) - offset), content=payload[offset:])
    assert status == 204
    assert 0 < offset <= sent_by_then < len(payload)
    assert head.headers["Upload-Offset"] == str(offset)
    assert rest.status_code == 204 and rest.headers["Upload-Offset"] == str(len(payload))
    assert await upload_bytes(server, url.rsplit("/", 1)[1], len(payload)) == payload


async def test_a_slow_body_above_the_minimum_rate_is_received_whole(start_server: ServerFactory) -> None:
    # A slow link: 4 KiB/s in quarter-second bursts, against a minimum of 1 KiB/s per second.
    server = await start_server(body_min_rate_kbps=1, body_min_rate_window_seconds=1, body_idle_timeout_seconds=1)
    payload = os.urandom(12 << 10)
    url = await create(server, len(payload))
    reader, writer = await open_request(url, "PATCH", patch_headers(0, len(payload)))
    try:
        for start in range(0, len(payload), 1024):
            writer.write(payload[start : start + 1024])
            await writer.drain()
            await asyncio.sleep(0.25)
        async with asyncio.timeout(10):
            status, headers = await read_response(reader)
    finally:
        writer.close()
    assert (status, headers["upload-offset"]) == (204, str(len(payload)))


async def test_a_patch_that_sends_no_byte_within_the_idle_timeout_gets_408_and_changes_nothing(
    start_server: ServerFactory,
) -> None:
    server = await start_server(body_idle_timeout_seconds=1, body_min_rate_kbps=0)
    url = await create(server, 10)
    reader, writer = await open_request(url, "PATCH", patch_headers(0, 10))
    try:
        async with asyncio.timeout(10):
            status, headers = await read_response(reader)
    finally:
        writer.close()
    async with server.client() as client:
        head = await client.head(url, headers=TUS)
    assert (status, headers["upload-offset"], headers["connection"]) == (408, "0", "close")
    assert head.headers["Upload-Offset"] == "0"


async def test_a_creation_with_upload_that_stops_creates_the_upload_with_what_arrived(
    start_server: ServerFactory,
) -> None:
    server = await start_server(body_idle_timeout_seconds=1, body_min_rate_kbps=0)
    headers = TUS | {"Upload-Length": "5000", "Content-Type": OCTETS, "Content-Length": "5000"}
    reader, writer = await open_request(server.files_url, "POST", headers)
    try:
        writer.write(b"x" * 2000)
        await writer.drain()
        async with asyncio.timeout(10):
            status, answer = await read_response(reader)
    finally:
        writer.close()
    async with server.client() as client:
        head = await client.head(answer["location"], headers=TUS)
    assert (status, answer["upload-offset"]) == (201, "2000")
    assert head.headers["Upload-Offset"] == "2000"


async def test_an_ietf_draft_append_that_stops_is_cut_and_keeps_what_arrived(start_server: ServerFactory) -> None:
    server = await start_server(body_idle_timeout_seconds=1, body_min_rate_kbps=0)
    draft = {"Upload-Draft-Interop-Version": "8"}
    async with server.client() as client:
        created = await client.post("/files/", headers=draft | {"Upload-Complete": "?0"})
    url = created.headers["Location"]
    headers = draft | {
        "Upload-Offset": "0",
        "Upload-Complete": "?1",
        "Content-Type": "application/partial-upload",
        "Content-Length": "3000",
    }
    reader, writer = await open_request(url, "PATCH", headers)
    try:
        writer.write(b"y" * 1000)
        await writer.drain()
        async with asyncio.timeout(10):
            status, answer = await read_response(reader)
    finally:
        writer.close()
    assert (status, answer["upload-offset"], answer["upload-complete"]) == (204, "1000", "?0")


async def test_a_resumable_facade_upload_that_stops_gets_408_and_keeps_what_arrived(
    start_server: ServerFactory,
) -> None:
    server = await start_server(body_idle_timeout_seconds=1, body_min_rate_kbps=0)
    session = "slow-" + secrets.token_hex(6)
    boundary = "----slow" + secrets.token_hex(4)
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"z" * 50_000
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(part) + 100_000),
        "X-Upload-Session-ID": session,
        "Content-Range": "bytes 0-99999/100000",
    }
    reader, writer = await open_request(server.url + "/api/files/upload", "POST", headers)
    try:
        writer.write(part)
        await writer.drain()
        async with asyncio.timeout(10):
            status, answer = await read_response(reader)
            body = await reader.readexactly(int(answer["content-length"]))
    finally:
        writer.close()
    async with server.client() as client:
        progress = (await client.get(f"/api/files/upload/session/{session}")).json()
    assert status == 408 and b'"body_too_slow"' in body
    # The part's bytes minus what the parser holds back (a possible boundary) are committed.
    assert 40_000 < progress["bytes_uploaded"] <= 50_000
