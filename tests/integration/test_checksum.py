"""The checksum extension against a live server: a PATCH (or a creation-with-upload POST) with
``Upload-Checksum`` keeps its bytes only if they hash to the digest; otherwise 460 (mismatch) or
400 (unknown algorithm, malformed header), the staged bytes are cut back and the offset stays.

Every test runs against both session stores (SQLite and PostgreSQL).
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, upload_bytes

ALGORITHMS = ["md5", "sha1", "sha256", "sha512", "crc32"]


def checksum(algorithm: str, data: bytes) -> str:
    if algorithm == "crc32":
        raw = zlib.crc32(data).to_bytes(4, "big")
    else:
        raw = hashlib.new(algorithm, data).digest()
    return f"{algorithm} {base64.b64encode(raw).decode()}"


async def create(client: httpx.AsyncClient, length: int) -> str:
    response = await client.post("/files/", headers=TUS | {"Upload-Length": str(length)})
    assert response.status_code == 201, response.text
    return response.headers["Location"]


async def patch(client: httpx.AsyncClient, url: str, offset: int, body: bytes, **headers: str) -> httpx.Response:
    h = TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS} | headers
    return await client.patch(url, headers=h, content=body)


async def offset_of(client: httpx.AsyncClient, url: str) -> int:
    return int((await client.head(url, headers=TUS)).headers["Upload-Offset"])


async def staged(server: LiveServer, url: str, length: int) -> bytes:
    upload_id = url.rsplit("/", 1)[1]
    return await upload_bytes(server, upload_id, length)


async def staged_size(server: LiveServer, url: str) -> int:
    return await server.parts.staging.staged_size(url.rsplit("/", 1)[1])


# --- OPTIONS ---------------------------------------------------------------------------------------


async def test_options_advertises_checksum_and_its_algorithms_when_enabled(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.options("/files/")
    assert "checksum" in response.headers["Tus-Extension"].split(",")
    assert "checksum-trailer" not in response.headers["Tus-Extension"].split(",")
    assert response.headers["Tus-Checksum-Algorithm"] == "md5,sha1,sha256,sha512,crc32"


async def test_options_sends_no_checksum_algorithms_when_checksum_is_disabled(start_server: ServerFactory) -> None:
    server = await start_server(tus_extensions="creation,termination")
    async with server.client() as client:
        response = await client.options("/files/")
    assert "Tus-Checksum-Algorithm" not in response.headers
    assert "checksum" not in response.headers["Tus-Extension"].split(",")


# --- PATCH -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_patch_with_a_correct_checksum_is_accepted(server: LiveServer, algorithm: str) -> None:
    body = os.urandom(100_000)
    async with server.client() as client:
        url = await create(client, len(body))
        response = await patch(client, url, 0, body, **{"Upload-Checksum": checksum(algorithm, body)})
    assert response.status_code == 204, response.text
    assert response.headers["Upload-Offset"] == str(len(body))
    assert await staged(server, url, len(body)) == body


async def test_patch_with_a_mismatching_checksum_gets_460_and_the_offset_and_staging_stay(server: LiveServer) -> None:
    first, second = os.urandom(1000), os.urandom(1000)
    async with server.client() as client:
        url = await create(client, 3000)
        assert (await patch(client, url, 0, first)).status_code == 204
        response = await patch(client, url, 1000, second, **{"Upload-Checksum": checksum("sha1", first)})
        offset = await offset_of(client, url)
    assert response.status_code == 460
    assert "sha1" in response.text
    assert offset == 1000
    assert await staged_size(server, url) == 1000
    assert await staged(server, url, 1000) == first


async def test_a_mismatch_mid_upload_then_a_good_retry_completes_with_exact_bytes(server: LiveServer) -> None:
    payload = os.urandom(300_000)
    parts = [payload[:100_000], payload[100_000:200_000], payload[200_000:]]
    async with server.client() as client:
        url = await create(client, len(payload))
        first = await patch(client, url, 0, parts[0], **{"Upload-Checksum": checksum("md5", parts[0])})
        corrupted = parts[1][:-1] + bytes([parts[1][-1] ^ 0xFF])
        bad = await patch(client, url, 100_000, corrupted, **{"Upload-Checksum": checksum("md5", parts[1])})
        retry = await patch(client, url, 100_000, parts[1], **{"Upload-Checksum": checksum("md5", parts[1])})
        last = await patch(client, url, 200_000, parts[2], **{"Upload-Checksum": checksum("md5", parts[2])})
    assert first.status_code == 204
    assert bad.status_code == 460
    assert retry.status_code == 204 and retry.headers["Upload-Offset"] == "200000"
    assert last.status_code == 204 and last.headers["Upload-Offset"] == str(len(payload))
    assert await staged(server, url, len(payload)) == payload


async def test_an_unknown_algorithm_gets_400_naming_the_supported_ones_and_the_offset_stays(server: LiveServer) -> None:
    body = b"x" * 100
    async with server.client() as client:
        url = await create(client, 100)
        response = await patch(client, url, 0, body, **{"Upload-Checksum": "sha3-256 AAAA"})
        offset = await offset_of(client, url)
    assert response.status_code == 400
    assert "md5,sha1,sha256,sha512,crc32" in response.text
    assert offset == 0
    assert await staged_size(server, url) == 0


@pytest.mark.parametrize(
    "value",
    [
        "sha1",  # no digest
        "sha1 2jmj7l5rSw0yVb/vlWAYkK/YBwk= more",  # a third part
        "sha1  2jmj7l5rSw0yVb/vlWAYkK/YBwk=",  # two spaces
        "sha1 ***not-base64***",
        "sha1 2jmj7l5rSw0yVb_vlWAYkK_YBwk=",  # url-safe alphabet
        "sha256 2jmj7l5rSw0yVb/vlWAYkK/YBwk=",  # a sha1-sized digest
        "crc32 AAAAAAAA",  # 6 bytes
    ],
)
async def test_a_malformed_upload_checksum_gets_400_and_the_offset_stays(server: LiveServer, value: str) -> None:
    async with server.client() as client:
        url = await create(client, 100)
        response = await patch(client, url, 0, b"y" * 100, **{"Upload-Checksum": value})
        offset = await offset_of(client, url)
    assert response.status_code == 400
    assert "Upload-Checksum" in response.text
    assert offset == 0
    assert await staged_size(server, url) == 0


async def test_upload_checksum_gets_400_when_the_checksum_extension_is_disabled(start_server: ServerFactory) -> None:
    server = await start_server(tus_extensions="creation")
    body = b"z" * 10
    async with server.client() as client:
        url = await create(client, 10)
        response = await patch(client, url, 0, body, **{"Upload-Checksum": checksum("sha1", body)})
        offset = await offset_of(client, url)
    assert response.status_code == 400
    assert "checksum extension is not enabled" in response.text
    assert offset == 0


async def test_a_large_chunked_body_with_a_correct_sha256_is_accepted(server: LiveServer) -> None:
    payload = os.urandom(8 << 20)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 256 << 10):
            yield payload[start : start + (256 << 10)]

    async with server.client() as client:
        url = await create(client, len(payload))
        headers = TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Checksum": checksum("sha256", payload)}
        response = await client.patch(url, headers=headers, content=chunks())
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 204, response.text
    assert response.headers["Upload-Offset"] == str(len(payload))
    assert await staged(server, url, len(payload)) == payload


async def test_a_large_chunked_body_with_a_wrong_sha256_gets_460_and_keeps_nothing(server: LiveServer) -> None:
    payload = os.urandom(8 << 20)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 256 << 10):
            yield payload[start : start + (256 << 10)]

    async with server.client() as client:
        url = await create(client, len(payload))
        headers = TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Checksum": checksum("sha256", b"")}
        response = await client.patch(url, headers=headers, content=chunks())
        offset = await offset_of(client, url)
    assert response.status_code == 460
    assert offset == 0
    assert await staged_size(server, url) == 0


async def test_an_interrupted_patch_with_a_checksum_commits_nothing(start_server: ServerFactory) -> None:
    buffer = 64 << 10
    server = await start_server(staging_write_buffer_kb=buffer >> 10)
    payload = os.urandom(1 << 20)
    async with server.client() as client:
        url = await create(client, len(payload))
        headers = TUS | {
            "Upload-Offset": "0",
            "Content-Type": OCTETS,
            "Content-Length": str(len(payload)),
            "Upload-Checksum": checksum("sha256", payload),
        }
        reader, writer = await open_request(url, "PATCH", headers)
        writer.write(payload[: 256 << 10])
        await writer.drain()  # ...and the client stalls, its connection still open
        await eventually(lambda: staged_size(server, url), lambda size: size > 0)
        resumed_at = await offset_of(client, url)  # HEAD asks the stalled PATCH to let go
        status, answer = await read_response(reader)
        writer.close()
    # Part of a body cannot be verified against the whole body's digest: none of it is kept, and
    # an interrupted PATCH that kept nothing is no success (400), whatever it had received.
    assert resumed_at == 0
    assert (status, answer["upload-offset"]) == (400, "0")
    assert await staged_size(server, url) == 0


async def test_a_patch_with_a_checksum_cut_off_mid_body_commits_nothing(start_server: ServerFactory) -> None:
    buffer = 64 << 10
    server = await start_server(staging_write_buffer_kb=buffer >> 10)
    payload = os.urandom(1 << 20)
    async with server.client() as client:
        url = await create(client, len(payload))
        headers = TUS | {
            "Upload-Offset": "0",
            "Content-Type": OCTETS,
            "Content-Length": str(len(payload)),
            "Upload-Checksum": checksum("crc32", payload),
        }
        _, writer = await open_request(url, "PATCH", headers)
        writer.write(payload[: 512 << 10])
        await writer.drain()
        await eventually(lambda: staged_size(server, url), lambda size: size > 0)
        writer.close()  # the network drops mid-body
        await writer.wait_closed()
        await eventually(lambda: staged_size(server, url), lambda size: size == 0)
        offset = await offset_of(client, url)
    assert offset == 0


# --- creation-with-upload --------------------------------------------------------------------------


async def test_creation_with_upload_and_a_correct_checksum_creates_the_upload(server: LiveServer) -> None:
    body = os.urandom(5000)
    headers = TUS | {"Upload-Length": "10000", "Content-Type": OCTETS, "Upload-Checksum": checksum("sha512", body)}
    async with server.client() as client:
        response = await client.post("/files/", headers=headers, content=body)
    assert response.status_code == 201, response.text
    assert response.headers["Upload-Offset"] == "5000"
    assert await staged(server, response.headers["Location"], 5000) == body


async def test_creation_with_upload_and_a_bad_checksum_gets_460_and_creates_nothing(server: LiveServer) -> None:
    body = os.urandom(5000)
    headers = TUS | {"Upload-Length": "10000", "Content-Type": OCTETS, "Upload-Checksum": checksum("md5", b"other")}
    async with server.client() as client:
        response = await client.post("/files/", headers=headers, content=body)
    assert response.status_code == 460
    assert "Location" not in response.headers
    assert await server.parts.staging.list_upload_ids() == []


async def test_creation_with_upload_and_an_unknown_algorithm_gets_400_and_creates_nothing(server: LiveServer) -> None:
    headers = TUS | {"Upload-Length": "10", "Content-Type": OCTETS, "Upload-Checksum": "whirlpool AAAA"}
    async with server.client() as client:
        response = await client.post("/files/", headers=headers, content=b"0123456789")
    assert response.status_code == 400
    assert await server.parts.staging.list_upload_ids() == []
