"""GET on an upload against a live server: the bytes received so far, whole or by Range, from
staging or (once placed) from the Storage Element, decompressed; for its owner or an admin only.

Raw HTTP where httpx would hide the answer (a body cut short, a PATCH still sending)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.fixtures.jwt import rsa_key, token
from tests.fixtures.rawhttp import eventually, open_request
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tests.integration.test_concatenation import create_final, create_partial, patch
from tests.integration.test_delete import directory_element
from tests.integration.test_finalise import element_file, s3_element, text_payload
from tusingest.saga.records import SagaState

__all__ = ["s3_element"]  # a fixture, used by name

MiB = 1 << 20


def metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def create(client: httpx.AsyncClient, length: int, **meta: str) -> str:
    headers = TUS | {"Upload-Length": str(length)}
    if meta:
        headers["Upload-Metadata"] = metadata(**meta)
    response = await client.post("/files/", headers=headers)
    assert response.status_code == 201, response.text
    return response.headers["Location"]


async def upload(client: httpx.AsyncClient, payload: bytes, chunk: int = 8 * MiB, **meta: str) -> str:
    url = await create(client, len(payload), **meta)
    for offset in range(0, len(payload), chunk):
        response = await patch(client, url, offset, payload[offset : offset + chunk])
        assert response.status_code == 204, response.text
    return url


def upload_id(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def placed(server: LiveServer, url: str) -> None:
    """Wait until the upload's saga finished and its staged bytes are gone."""

    async def state() -> SagaState | None:
        saga = await server.parts.saga_store.latest_saga("upload", upload_id(url))
        return None if saga is None else saga.state

    assert await eventually(state, lambda s: s is not None and s.is_finished, timeout=60) is SagaState.COMPLETED
    assert await server.parts.staging.last_written(upload_id(url)) is None


RANGES = {  # Range header -> (start, stop) of a 3 MiB + 5 upload
    "first-byte": ("bytes=0-0", 0, 1),
    "middle": ("bytes=1000-1999", 1000, 2000),
    "across-blocks": (f"bytes={MiB - 3}-{2 * MiB + 3}", MiB - 3, 2 * MiB + 4),
    "open-ended": (f"bytes={3 * MiB}-", 3 * MiB, 3 * MiB + 5),
    "suffix": ("bytes=-7", 3 * MiB - 2, 3 * MiB + 5),
    "past-the-end-is-clamped": ("bytes=10-99999999999", 10, 3 * MiB + 5),
}


async def assert_served(client: httpx.AsyncClient, url: str, payload: bytes, content_type: str) -> None:
    """The whole payload with 200, and each RANGES entry with 206, byte for byte."""
    whole = await client.get(url)
    assert whole.status_code == 200, whole.text
    assert sha256(whole.content) == sha256(payload)
    assert whole.headers["Content-Length"] == str(len(payload))
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Type"].split(";")[0] == content_type
    assert whole.headers["X-Content-Type-Options"] == "nosniff"
    for header, start, stop in RANGES.values():
        part = await client.get(url, headers={"Range": header})
        assert part.status_code == 206, (header, part.text)
        assert part.content == payload[start:stop], header
        assert part.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(payload)}"
        assert part.headers["Content-Length"] == str(stop - start)
        assert part.headers["ETag"] == whole.headers["ETag"]


# --- from staging ---------------------------------------------------------------------------------


async def test_get_on_a_partly_received_upload_serves_the_committed_bytes_whole_and_by_range(
    sqlite_server: LiveServer,
) -> None:
    received = os.urandom(3 * MiB + 5)
    async with sqlite_server.client() as client:
        url = await create(client, 10 * MiB, filename="data.csv", filetype="text/csv")
        assert (await patch(client, url, 0, received)).status_code == 204
        await assert_served(client, url, received, "text/csv")
        response = await client.get(url)
    assert response.headers["Content-Disposition"] == 'attachment; filename="data.csv"'
    assert response.headers["ETag"] == f'"{upload_id(url)}-{len(received)}"'
    assert "Last-Modified" in response.headers


async def test_get_never_serves_bytes_a_running_patch_staged_but_did_not_commit(sqlite_server: LiveServer) -> None:
    committed = os.urandom(MiB)
    async with sqlite_server.client() as client:
        url = await create(client, 16 * MiB)
        assert (await patch(client, url, 0, committed)).status_code == 204
        # A PATCH that sends 6 of its 8 MiB and stalls: more than a write buffer is staged, nothing committed.
        headers = TUS | {"Upload-Offset": str(len(committed)), "Content-Type": OCTETS, "Content-Length": str(8 * MiB)}
        _, writer = await open_request(url, "PATCH", headers)
        writer.write(os.urandom(6 * MiB))
        await writer.drain()
        staging = sqlite_server.parts.staging
        await eventually(lambda: staging.staged_size(upload_id(url)), lambda size: size > len(committed), timeout=30)
        response = await client.get(url)
        writer.close()
    assert response.status_code == 200
    assert response.content == committed


async def test_get_on_an_upload_with_no_bytes_yet_is_an_empty_200_and_any_range_is_416(
    sqlite_server: LiveServer,
) -> None:
    async with sqlite_server.client() as client:
        url = await create(client, 100)
        empty = await client.get(url)
        ranged = await client.get(url, headers={"Range": "bytes=0-"})
    assert empty.status_code == 200 and empty.content == b"" and empty.headers["Content-Length"] == "0"
    assert empty.headers["Content-Type"] == "application/octet-stream"
    assert empty.headers["Content-Disposition"] == "attachment"
    assert ranged.status_code == 416 and ranged.headers["Content-Range"] == "bytes */0"


@pytest.mark.parametrize(
    "headers",
    [
        {"Range": "bytes=0-1,5-6"},
        {"Range": "bytes=5-2"},
        {"Range": "items=0-1"},
        {"Range": "bytes=0-1", "If-Range": '"another-etag"'},
    ],
    ids=["several-ranges", "malformed", "another-unit", "if-range-mismatch"],
)
async def test_a_range_that_is_not_one_satisfiable_byte_range_gets_the_whole_upload_with_200(
    sqlite_server: LiveServer, headers: dict[str, str]
) -> None:
    received = os.urandom(100)
    async with sqlite_server.client() as client:
        url = await create(client, 200)
        await patch(client, url, 0, received)
        response = await client.get(url, headers=headers)
    assert response.status_code == 200
    assert response.content == received
    assert "Content-Range" not in response.headers


async def test_a_range_matching_if_range_is_honoured(sqlite_server: LiveServer) -> None:
    received = os.urandom(100)
    async with sqlite_server.client() as client:
        url = await create(client, 200)
        await patch(client, url, 0, received)
        etag = (await client.get(url)).headers["ETag"]
        response = await client.get(url, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert response.status_code == 206 and response.content == received[10:20]


async def test_a_range_starting_past_the_received_bytes_is_416_with_the_size(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        url = await create(client, 200)
        await patch(client, url, 0, os.urandom(100))
        response = await client.get(url, headers={"Range": "bytes=100-"})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == "bytes */100"
    assert response.headers["Tus-Resumable"] == "1.0.0"


async def test_a_browser_may_read_the_download_headers_cross_origin(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        url = await create(client, 10, filename="a.txt")
        await patch(client, url, 0, b"0123456789")
        response = await client.get(url, headers={"Origin": "https://app.example", "Range": "bytes=2-3"})
    assert response.status_code == 206 and response.content == b"23"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"accept-ranges", "content-range", "content-disposition", "etag"} <= exposed


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("report 2026.pdf", 'attachment; filename="report 2026.pdf"'),
        ('say "hi"%.txt', "attachment; filename=\"say _hi__.txt\"; filename*=UTF-8''say%20%22hi%22%25.txt"),
        ("naïve ☃.txt", "attachment; filename=\"na_ve _.txt\"; filename*=UTF-8''na%C3%AFve%20%E2%98%83.txt"),
        ("../../etc/passwd", 'attachment; filename=".._.._etc_passwd"'),
        ("a\r\nSet-Cookie: x=1", 'attachment; filename="a__Set-Cookie: x=1"'),
    ],
    ids=["plain", "quotes-and-percent", "non-ascii", "path", "header-injection"],
)
async def test_content_disposition_carries_the_file_name_safely_quoted(
    sqlite_server: LiveServer, filename: str, expected: str
) -> None:
    async with sqlite_server.client() as client:
        url = await create(client, 10, filename=filename, filetype="text/html\r\nX-Evil: 1")
        response = await client.get(url)
    assert response.headers["Content-Disposition"] == expected
    assert response.headers["Content-Type"] == "application/octet-stream"  # the filetype is no media type
    assert "X-Evil" not in response.headers


# --- complete, before and after placement -----------------------------------------------------------


async def test_a_complete_upload_is_served_from_staging_while_its_finalisation_runs(
    start_server: ServerFactory,
) -> None:
    # The saga stops after inspecting the file, before anything is placed; the PATCH does not wait for it.
    server = await start_server(saga_failpoints="inspected=pause", finalise_wait_seconds=0)
    payload = os.urandom(3 * MiB + 5)
    async with server.client() as client:
        url = await upload(client, payload, filename="blob.bin")
        assert (await client.head(url, headers=TUS)).headers["Upload-Offset"] == str(len(payload))
        assert await server.parts.saga_store.file_for_upload(upload_id(url)) is None
        await assert_served(client, url, payload, "application/octet-stream")


@pytest.fixture(params=["directory", "s3"])
def element(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "directory":
        return directory_element(tmp_path, "se-dir", "edit")
    found: dict[str, Any] = request.getfixturevalue("s3_element")
    return found


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "as-received"])
async def test_a_placed_upload_is_served_from_its_element_with_the_original_bytes(
    start_server: ServerFactory, tmp_path: Path, element: dict[str, Any], compressed: bool
) -> None:
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, element), compression_enabled=compressed
    )
    payload = text_payload(3 * MiB + 5)
    async with server.client() as client:
        url = await upload(client, payload, chunk=MiB, filename="server.log")
        await placed(server, url)
        record = await server.parts.saga_store.file_for_upload(upload_id(url))
        assert record is not None and (record.content_encoding is not None) is compressed
        await assert_served(client, url, payload, "text/plain")
        response = await client.get(url)
    assert response.headers["Content-Disposition"] == 'attachment; filename="server.log"'


async def test_a_placed_file_deleted_from_the_registry_is_410(sqlite_server: LiveServer) -> None:
    payload = os.urandom(1000)
    async with sqlite_server.client() as client:
        url = await upload(client, payload)
        await placed(sqlite_server, url)
        record = await sqlite_server.parts.saga_store.file_for_upload(upload_id(url))
        assert record is not None
        assert (await client.delete(f"/api/files/{record.file_id}")).status_code == 204
        response = await client.get(url)
    assert response.status_code == 410


# --- concatenation --------------------------------------------------------------------------------


async def test_a_concatenated_upload_is_its_partials_bytes_in_order_whole_and_by_range(
    start_server: ServerFactory,
) -> None:
    server = await start_server(saga_failpoints="inspected=pause", finalise_wait_seconds=0)
    parts = [os.urandom(MiB + 1), os.urandom(2 * MiB + 4)]  # 3 MiB + 5 together, as RANGES expects
    async with server.client() as client:
        urls = [await create_partial(client, len(part), part) for part in parts]
        final = await create_final(client, urls)
        assert final.status_code == 201, final.text
        url = final.headers["Location"]
        await assert_served(client, url, b"".join(parts), "application/octet-stream")
        first = await client.get(urls[0])
    assert first.content == parts[0]  # a partial is its own bytes


async def test_an_unfinished_final_upload_has_no_bytes_yet(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        done = await create_partial(client, 3, b"abc")
        waiting = await create_partial(client, 3)
        final = await create_final(client, [done, waiting])
        response = await client.get(final.headers["Location"])
    assert response.status_code == 200 and response.content == b""


# --- who may read ---------------------------------------------------------------------------------


def bearer(subject: str, role: str = "USER") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(rsa_key(), sub=subject, name=subject.title(), role=role)}"}


async def test_only_the_owner_or_an_admin_may_get_an_upload(keyed_server: LiveServer) -> None:
    payload = os.urandom(1000)
    async with keyed_server.client() as client:
        client.headers.update(bearer("alice"))
        url = await create(client, 2000)
        await patch(client, url, 0, payload)
        owner = await client.get(url)
        other = await client.get(url, headers=bearer("bob"))
        admin = await client.get(url, headers=bearer("root", "ADMIN"))
        unknown = await client.get(url[:-4] + "0000")
        del client.headers["Authorization"]
        anonymous = await client.get(url)
    assert owner.status_code == 200 and owner.content == payload
    assert other.status_code == 404 and other.content == unknown.content
    assert unknown.status_code == 404
    assert admin.status_code == 200 and admin.content == payload
    assert anonymous.status_code == 401


async def test_a_terminated_upload_is_410(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        url = await create(client, 10)
        assert (await client.delete(url, headers=TUS)).status_code == 204
        response = await client.get(url)
    assert response.status_code == 410


# --- memory ---------------------------------------------------------------------------------------


async def test_a_64_mib_download_keeps_the_servers_memory_flat(start_server: ServerFactory) -> None:
    # The server runs in this process: its resident set is ours. Compressed on the element, so the
    # download decompresses as it streams.
    server = await start_server(max_file_size_mb=128)
    payload = text_payload(64 * MiB)
    digest = sha256(payload)
    async with server.client() as client:
        url = await upload(client, payload)
        del payload
        await placed(server, url)
        record = await server.parts.saga_store.file_for_upload(upload_id(url))
        assert record is not None and record.content_encoding is not None
        process = psutil.Process()
        before = process.memory_info().rss
        peak = before
        hasher = hashlib.sha256()
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                hasher.update(chunk)
                peak = max(peak, process.memory_info().rss)
    assert hasher.hexdigest() == digest
    assert peak - before < 32 * MiB, f"the resident set grew by {(peak - before) / MiB:.1f} MiB"


async def test_a_client_that_hangs_up_mid_download_leaves_the_server_serving(sqlite_server: LiveServer) -> None:
    payload = os.urandom(8 * MiB)
    async with sqlite_server.client() as client:
        url = await create(client, 16 * MiB)
        await patch(client, url, 0, payload)
        reader, writer = await open_request(url, "GET", {})
        await reader.readexactly(MiB)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
        again = await client.get(url, headers={"Range": "bytes=-4"})
    assert again.status_code == 206 and again.content == payload[-4:]
