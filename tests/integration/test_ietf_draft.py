"""The IETF draft "Resumable Uploads for HTTP", interop version 8, on the tus endpoint: requests
with ``Upload-Draft-Interop-Version: 8`` need no Tus-Resumable; without it tus 1.0 rules apply.

Every test runs against both session stores (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import LiveServer, ServerFactory, upload_bytes
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


def limits(response: httpx.Response) -> dict[str, int]:
    """Upload-Limit, a Structured Field Dictionary of Integers."""
    members = (member.strip().split("=") for member in response.headers["Upload-Limit"].split(","))
    return {key: int(value) for key, value in members}


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
        assert "Upload-Complete" not in created.headers  # -11, creation example B: Location and Upload-Limit
        assert limits(created)["max-size"] == MAX_SIZE
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
    assert problem["title"] == "Conflict"  # about:blank: the status phrase (RFC 9457, section 4.2.1)
    assert problem["detail"] == "upload has been interrupted by another request for this upload resource"
    assert second.status_code == 204 and second.headers["Upload-Offset"] == "5"
    assert await staged(server, url, 5) == b"hello"


async def chunked(*pieces: bytes) -> AsyncIterator[bytes]:
    """A body httpx sends chunked, without Content-Length."""
    for piece in pieces:
        yield piece


@pytest.mark.parametrize(
    ("pieces", "sent_chunked", "status", "problem_type"),
    [
        ([b"more"], False, 400, "inconsistent-upload-length"),
        ([b""], False, 410, "completed-upload"),
        ([b"m", b"ore"], True, 400, "inconsistent-upload-length"),
        ([b""], True, 410, "completed-upload"),
    ],
    ids=["non-empty", "empty", "non-empty-chunked", "empty-chunked"],
)
async def test_append_to_a_completed_upload_is_refused_per_draft_11_without_upload_complete(
    server: LiveServer, pieces: list[bytes], sent_chunked: bool, status: int, problem_type: str
) -> None:
    body = chunked(*pieces) if sent_chunked else b"".join(pieces)
    async with server.client() as client:
        url = (await create(client, b"done", complete=True)).headers["Location"]
        h = DRAFT | {"Upload-Offset": "4", "Upload-Complete": "?1", "Content-Type": PARTIAL}
        response = await client.patch(url, headers=h, content=body)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == PROBLEM_TYPES + problem_type
    assert "Upload-Complete" not in response.headers  # it completed nothing: ?1 would mislead
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
    assert limits(options) == {"max-size": MAX_SIZE, "max-age": 24 * 3600}  # the lifetime a new upload gets
    assert options.headers["Accept-Patch"] == PARTIAL
    assert limits(offset)["max-size"] == MAX_SIZE
    assert 0 < limits(offset)["max-age"] <= 24 * 3600


async def test_creation_larger_than_max_size_gets_413_with_upload_limit(server: LiveServer) -> None:
    async with server.client() as client:
        response = await create(client, b"", complete=False, **{"Upload-Length": str(MAX_SIZE + 1)})
    assert response.status_code == 413
    assert limits(response)["max-size"] == MAX_SIZE


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


# -- draft -11 to the letter (issue 17) -----------------------------------------------------------


async def test_append_announcing_a_body_past_the_known_length_invalidates_the_upload(server: LiveServer) -> None:
    async with server.client() as client:
        url = (await create(client, b"abc", complete=False, **{"Upload-Length": "5"})).headers["Location"]
        overflow = await append(client, url, 3, b"defgh", complete=False)
        head = await client.head(url, headers=DRAFT)
        again = await append(client, url, 3, b"de", complete=True)
        cancel = await client.delete(url, headers=DRAFT)
    assert overflow.status_code == 400, overflow.text
    assert overflow.json()["type"] == PROBLEM_TYPES + "inconsistent-upload-length"
    for refused in (head, again, cancel):  # -11: "rejecting any further interaction with it"
        assert refused.status_code == 410
        assert refused.headers["Content-Type"] == "application/problem+json"
    assert again.json() == {
        "type": "about:blank",
        "title": "Gone",
        "detail": "the upload resource was invalidated: a request ran past its length",
    }
    assert await state(server, url) is UploadState.INVALID
    assert await server.parts.staging.list_upload_ids() == []


async def test_chunked_append_running_past_the_known_length_invalidates_the_upload(server: LiveServer) -> None:
    async with server.client() as client:
        url = (await create(client, b"", complete=False, **{"Upload-Length": "4"})).headers["Location"]
        h = DRAFT | {"Upload-Offset": "0", "Upload-Complete": "?0", "Content-Type": PARTIAL}
        overflow = await client.patch(url, headers=h, content=chunked(b"abc", b"def"))
        head = await client.head(url, headers=DRAFT)
    assert overflow.status_code == 400, overflow.text
    assert overflow.json()["type"] == PROBLEM_TYPES + "inconsistent-upload-length"
    assert head.status_code == 410
    assert await state(server, url) is UploadState.INVALID


async def test_creation_whose_body_runs_past_its_upload_length_creates_nothing(server: LiveServer) -> None:
    async with server.client() as client:
        response = await create(client, b"too long", complete=False, **{"Upload-Length": "3"})
    assert response.status_code == 400
    assert response.json()["type"] == PROBLEM_TYPES + "inconsistent-upload-length"
    assert "Location" not in response.headers
    assert await server.parts.staging.list_upload_ids() == []


async def test_tus_patch_past_the_length_still_gets_413_and_the_upload_stays_usable(server: LiveServer) -> None:
    tus = {"Tus-Resumable": "1.0.0"}
    async with server.client() as client:
        url = (await client.post("/files/", headers=tus | {"Upload-Length": "3"})).headers["Location"]
        octets = tus | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        overflow = await client.patch(url, headers=octets, content=b"abcd")
        head = await client.head(url, headers=tus)
    assert (overflow.status_code, overflow.headers["Content-Type"].split(";")[0]) == (413, "text/plain")
    assert (head.status_code, head.headers["Upload-Offset"]) == (200, "0")
    assert await state(server, url) is UploadState.ACTIVE


async def test_a_refused_completion_answers_with_upload_complete_true(start_server: ServerFactory) -> None:
    server = await start_server(allowed_mime_types="image/png")
    async with server.client() as client:
        refused = await create(client, b"text, not a picture", complete=True)
    assert refused.status_code == 415, refused.text
    assert refused.headers["Upload-Complete"] == "?1"  # the processing's error, not the transfer's


async def test_an_append_refused_on_its_first_bytes_after_a_short_creation_gets_415_not_500(
    start_server: ServerFactory,
) -> None:
    server = await start_server(allowed_mime_types="image/png")
    async with server.client() as client:
        url = (await create(client, b"plain ", complete=False)).headers["Location"]
        # The whole upload is shorter than the inspection wants: it sees it all when the body ends.
        refused = await append(client, url, 6, b"text, not a picture", complete=True)
    assert refused.status_code == 415, refused.text  # the refusal freed the staging the append then cut back
    assert "Upload-Complete" not in refused.headers  # refused on its first bytes: it completed nothing


async def test_content_disposition_names_the_file_and_upload_metadata_wins(server: LiveServer) -> None:
    disposition = "inline; filename=\"plain.txt\"; filename*=UTF-8''%C3%A9t%C3%A9%20b.txt"
    named = base64.b64encode(b"chosen.txt").decode()
    async with server.client() as client:
        by_disposition = await create(client, b"", complete=False, **{"Content-Disposition": disposition})
        by_both = await create(
            client, b"", complete=False, **{"Content-Disposition": disposition, "Upload-Metadata": f"filename {named}"}
        )
        plain = await create(client, b"", complete=False, **{"Content-Disposition": 'inline; filename="a.txt"'})
    assert await file_name(server, by_disposition) == "été b.txt"  # filename* before filename (RFC 6266)
    assert await file_name(server, by_both) == "chosen.txt"
    assert await file_name(server, plain) == "a.txt"


async def file_name(server: LiveServer, created: httpx.Response) -> str:
    from tusingest.sessions.metadata import metadata_text

    assert created.status_code == 201, created.text
    upload = await server.parts.store.get(created.headers["Location"].rsplit("/", 1)[1])
    assert upload is not None
    return metadata_text(upload.metadata)["filename"]


async def test_upload_limit_append_sizes_are_announced_and_enforced(start_server: ServerFactory) -> None:
    server = await start_server(upload_min_append_size_kb=1, upload_max_append_size_mb=1)
    async with server.client() as client:
        options = await client.options("/files/", headers=DRAFT)
        created = await create(client, b"x" * 10, complete=False)  # a creation is no append: no minimum
        url = created.headers["Location"]
        small = await append(client, url, 10, b"tiny", complete=False)
        large = await append(client, url, 10, b"y" * ((1 << 20) + 1), complete=False)
        middle = await append(client, url, 10, b"z" * 2048, complete=False)
        last = await append(client, url, 2058, b"end", complete=True)  # completing: exempt from the minimum
    announced = {"max-size": MAX_SIZE, "min-append-size": 1024, "max-append-size": 1 << 20, "max-age": 24 * 3600}
    assert limits(options) == announced
    assert limits(created) | {"max-age": 0} == announced | {"max-age": 0}
    assert small.status_code == 400 and small.json()["type"] == "about:blank"
    assert large.status_code == 413 and limits(large)["max-append-size"] == 1 << 20
    assert (middle.status_code, middle.headers["Upload-Offset"]) == (204, "2058")
    assert (last.status_code, last.headers["Upload-Complete"]) == (204, "?1")
    assert await staged(server, url, 2061) == b"x" * 10 + b"z" * 2048 + b"end"


async def test_chunked_append_past_max_append_size_gets_413_and_keeps_the_upload(start_server: ServerFactory) -> None:
    server = await start_server(upload_max_append_size_mb=1)
    async with server.client() as client:
        url = (await create(client, b"", complete=False)).headers["Location"]
        h = DRAFT | {"Upload-Offset": "0", "Upload-Complete": "?0", "Content-Type": PARTIAL}
        large = await client.patch(url, headers=h, content=chunked(b"a" * (1 << 20), b"b"))
        head = await client.head(url, headers=DRAFT)
    assert large.status_code == 413
    assert (head.status_code, head.headers["Upload-Offset"]) == (204, "0")
    assert await state(server, url) is UploadState.ACTIVE
