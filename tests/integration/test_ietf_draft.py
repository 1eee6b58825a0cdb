"""The IETF draft "Resumable Uploads for HTTP", interop version 8, on the tus endpoint: requests
with ``Upload-Draft-Interop-Version: 8`` need no Tus-Resumable; without it tus 1.0 rules apply.

Every test runs against both session stores (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import LiveServer, upload_bytes
from tusingest.sessions import UploadState
from tusingest.sessions.locks import MemoryLocker

DRAFT = {"Upload-Draft-Interop-Version": "8"}
PARTIAL = "application/partial-upload"
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
MAX_SIZE = 64 << 20


async def create(client: httpx.AsyncClient, body: bytes, complete: bool, **headers: str) -> httpx.Response:
    h = DRAFT | {"Upload-Complete": "?1" if complete else "?0"} | headers
    return await client.post("/files/", headers=h, content=body)


async def append(
    client: httpx.AsyncClient, url: str, offset: int, body: bytes, complete: bool, **headers: str
) -> httpx.Response:
    h = DRAFT | {"Upload-Offset": str(offset), "Upload-Complete": "?1" if complete else "?0", "Content-Type": PARTIAL}
    return await client.patch(url, headers=h | headers, content=body)


async def staged(server: LiveServer, url: str, length: int) -> bytes:
    upload_id = url.rsplit("/", 1)[1]
    return await upload_bytes(server, upload_id, length)


async def state(server: LiveServer, url: str) -> UploadState:
    upload = await server.parts.store.get(url.rsplit("/", 1)[1])
    assert upload is not None
    return upload.state


async def test_upload_created_partially_then_appended_and_completed_holds_exact_bytes(server: LiveServer) -> None:
    async with server.client() as client:
        created = await create(client, b"hello ", complete=False)
        assert created.status_code == 201, created.text
        url = created.headers["Location"]
        assert url.startswith(server.files_url)
        assert created.headers["Upload-Offset"] == "6"
        assert created.headers["Upload-Complete"] == "?0"
        assert "Tus-Resumable" not in created.headers

        offset = await client.head(url, headers=DRAFT)
        assert offset.status_code == 204
        assert offset.headers["Upload-Offset"] == "6"
        assert offset.headers["Upload-Complete"] == "?0"
        assert "Upload-Length" not in offset.headers
        assert offset.headers["Cache-Control"] == "no-store"

        middle = await append(client, url, 6, b"resumable ", complete=False)
        assert middle.status_code == 204, middle.text
        assert middle.headers["Upload-Offset"] == "16"
        assert middle.headers["Upload-Complete"] == "?0"
        assert await state(server, url) is UploadState.ACTIVE

        last = await append(client, url, 16, b"world", complete=True)
        assert last.status_code == 204, last.text
        assert last.headers["Upload-Offset"] == "21"
        assert last.headers["Upload-Complete"] == "?1"

        after = await client.head(url, headers=DRAFT)
    assert after.headers["Upload-Complete"] == "?1"
    assert after.headers["Upload-Length"] == "21"
    assert await staged(server, url, 21) == b"hello resumable world"
    assert await state(server, url) is UploadState.COMPLETE


async def test_creation_with_the_whole_body_and_upload_complete_true_completes_at_once(server: LiveServer) -> None:
    async with server.client() as client:
        created = await create(client, b"0123456789", complete=True, **{"Upload-Length": "10"})
    assert created.status_code == 201, created.text
    assert created.headers["Upload-Complete"] == "?1"
    assert created.headers["Upload-Offset"] == "10"
    url = created.headers["Location"]
    assert await staged(server, url, 10) == b"0123456789"
    assert await state(server, url) is UploadState.COMPLETE


async def test_empty_append_with_upload_complete_true_completes_the_upload(server: LiveServer) -> None:
    async with server.client() as client:
        url = (await create(client, b"abc", complete=False)).headers["Location"]
        response = await append(client, url, 3, b"", complete=True)
    assert response.status_code == 204
    assert response.headers["Upload-Complete"] == "?1"
    assert await state(server, url) is UploadState.COMPLETE


async def test_append_at_a_stale_offset_gets_409_mismatching_offset_problem_and_keeps_data(
    server: LiveServer,
) -> None:
    async with server.client() as client:
        url = (await create(client, b"abcd", complete=False)).headers["Location"]
        response = await append(client, url, 2, b"xyz", complete=False)
        after = await client.head(url, headers=DRAFT)
    assert response.status_code == 409
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Upload-Offset"] == "4"
    problem = response.json()
    assert problem["type"] == PROBLEM_TYPES + "mismatching-upload-offset"
    assert problem["expected-offset"] == 4
    assert problem["provided-offset"] == 2
    assert after.headers["Upload-Offset"] == "4"
    assert await staged(server, url, 4) == b"abcd"


async def test_an_append_interrupted_before_its_first_byte_gets_409_problem_and_the_one_that_took_over_204(
    sqlite_server: LiveServer,
) -> None:
    server = sqlite_server
    locker = server.parts.locker
    assert isinstance(locker, MemoryLocker)
    headers = DRAFT | {"Upload-Offset": "0", "Upload-Complete": "?0", "Content-Type": PARTIAL, "Content-Length": "5"}
    async with server.client() as client:
        url = (await create(client, b"", complete=False)).headers["Location"]
        upload_id = url.rsplit("/", 1)[1]
        reader, writer = await open_request(url, "PATCH", headers)  # not a byte of its body follows

        async def held() -> bool:
            return locker.is_locked(upload_id)

        await eventually(held, bool)
        second = await append(client, url, 0, b"hello", complete=False)
        try:
            async with asyncio.timeout(10):
                status, answer = await read_response(reader)
                problem = json.loads(await reader.readexactly(int(answer["content-length"])))
        finally:
            writer.close()
    assert (status, answer["content-type"], answer["upload-offset"]) == (409, "application/problem+json", "0")
    assert problem["title"] == "upload has been interrupted by another request for this upload resource"
    assert second.status_code == 204 and second.headers["Upload-Offset"] == "5"
    assert await staged(server, url, 5) == b"hello"


async def test_append_to_a_completed_upload_gets_the_completed_upload_problem(server: LiveServer) -> None:
    async with server.client() as client:
        url = (await create(client, b"done", complete=True)).headers["Location"]
        response = await append(client, url, 4, b"more", complete=False)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == PROBLEM_TYPES + "completed-upload"
    assert await staged(server, url, 4) == b"done"


async def test_upload_length_disagreeing_with_a_completing_body_gets_inconsistent_length_and_creates_nothing(
    server: LiveServer,
) -> None:
    async with server.client() as client:
        response = await create(client, b"12345", complete=True, **{"Upload-Length": "9"})
    assert response.status_code == 400
    assert response.json()["type"] == PROBLEM_TYPES + "inconsistent-upload-length"
    assert await server.parts.staging.list_upload_ids() == []


async def test_append_without_partial_upload_content_type_gets_415(server: LiveServer) -> None:
    async with server.client() as client:
        url = (await create(client, b"", complete=False)).headers["Location"]
        response = await append(client, url, 0, b"abc", complete=False, **{"Content-Type": "application/octet-stream"})
    assert response.status_code == 415


async def test_creation_without_upload_complete_gets_400(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=DRAFT, content=b"abc")
    assert response.status_code == 400


async def test_cancellation_returns_204_and_later_requests_get_410(server: LiveServer) -> None:
    async with server.client() as client:
        url = (await create(client, b"abc", complete=False)).headers["Location"]
        cancelled = await client.delete(url, headers=DRAFT)
        after = await client.head(url, headers=DRAFT)
        again = await append(client, url, 3, b"d", complete=False)
    assert cancelled.status_code == 204
    assert after.status_code == 410
    assert again.status_code == 410
    assert await server.parts.staging.list_upload_ids() == []


async def test_unknown_upload_gets_404(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.head("/files/" + "0" * 32, headers=DRAFT)
    assert response.status_code == 404


async def test_options_and_head_announce_upload_limit_max_size(server: LiveServer) -> None:
    async with server.client() as client:
        options = await client.options("/files/", headers=DRAFT)
        url = (await create(client, b"", complete=False)).headers["Location"]
        offset = await client.head(url, headers=DRAFT)
    assert options.status_code == 204
    assert options.headers["Upload-Limit"] == f"max-size={MAX_SIZE}"
    assert options.headers["Accept-Patch"] == PARTIAL
    limits = dict(member.strip().split("=") for member in offset.headers["Upload-Limit"].split(","))
    assert limits["max-size"] == str(MAX_SIZE)
    assert 0 < int(limits["max-age"]) <= 24 * 3600


async def test_creation_larger_than_max_size_gets_413_with_upload_limit(server: LiveServer) -> None:
    async with server.client() as client:
        response = await create(client, b"", complete=False, **{"Upload-Length": str(MAX_SIZE + 1)})
    assert response.status_code == 413
    assert response.headers["Upload-Limit"] == f"max-size={MAX_SIZE}"


async def test_draft_headers_are_exposed_to_browser_scripts(server: LiveServer) -> None:
    async with server.client() as client:
        response = await create(client, b"", complete=False, Origin="https://app.example")
    exposed = {name.strip().lower() for name in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"upload-complete", "upload-limit", "upload-draft-interop-version"} <= exposed


@pytest.mark.parametrize("version", [None, "7"])
async def test_request_without_interop_version_8_follows_tus_and_gets_412_without_tus_resumable(
    server: LiveServer, version: str | None
) -> None:
    headers = {"Upload-Complete": "?1"}
    if version is not None:
        headers["Upload-Draft-Interop-Version"] = version
    async with server.client() as client:
        response = await client.post("/files/", headers=headers, content=b"abc")
    assert response.status_code == 412
    assert response.headers["Tus-Version"] == "1.0.0"
    assert await server.parts.staging.list_upload_ids() == []
