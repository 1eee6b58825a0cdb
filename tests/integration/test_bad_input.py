"""Bad input answers 4xx on every route, never 5xx, and keeps nothing: junk ids in paths and
headers, numbers no parser should accept, over-long boundaries, deep JSON, truncated multipart
bodies and concatenations naming another host. Against a live server.

Store-independent rules run once, on SQLite; a NUL in an id also runs on PostgreSQL, which
refuses NUL in text and so answered 500.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tests.integration.test_facade_upload import multipart, post_file

IETF = {"Upload-Draft-Interop-Version": "8"}


def record_calls(target: object, name: str) -> list[tuple[Any, ...]]:
    """Every call of ``target.name`` from now on (the call still happens)."""
    original: Callable[..., Awaitable[Any]] = getattr(target, name)
    calls: list[tuple[Any, ...]] = []

    async def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await original(*args, **kwargs)

    setattr(target, name, recording)
    return calls


async def tus_requests(client: httpx.AsyncClient, raw_id: str) -> dict[str, httpx.Response]:
    """HEAD, PATCH and DELETE on ``/files/<raw_id>`` in tus 1.0 and in the IETF draft."""
    url = "/files/" + raw_id
    patch_headers = {"Upload-Offset": "0", "Content-Type": OCTETS}
    draft_patch = {"Upload-Offset": "0", "Upload-Complete": "?1", "Content-Type": "application/partial-upload"}
    return {
        "HEAD": await client.head(url, headers=TUS),
        "PATCH": await client.patch(url, headers=TUS | patch_headers, content=b"abc"),
        "DELETE": await client.delete(url, headers=TUS),
        "draft HEAD": await client.head(url, headers=IETF),
        "draft PATCH": await client.patch(url, headers=IETF | draft_patch, content=b"abc"),
        "draft DELETE": await client.delete(url, headers=IETF),
    }


# --- ids that cannot exist --------------------------------------------------------------------


async def test_a_nul_in_an_upload_id_is_404_on_every_tus_method_and_the_session_status(server: LiveServer) -> None:
    async with server.client() as client:
        answers = await tus_requests(client, "0123456789abcdef%00")
        answers["session status"] = await client.get("/api/files/upload/session/0123456789abcdef%00")
    assert {name: response.status_code for name, response in answers.items()} == dict.fromkeys(answers, 404)
    assert answers["session status"].json()["error"] == "session_not_found"


async def test_a_nul_in_a_file_or_transfer_id_is_404_on_the_file_routes(server: LiveServer) -> None:
    async with server.client() as client:
        deleted = await client.delete("/api/files/%00")
        transfer = await client.post("/api/files/%00/transfer", json={"destination_storage_element_id": "local"})
        status = await client.get("/api/files/transfer/%00")
    assert (deleted.status_code, deleted.json()["error"]) == (404, "file_not_found")
    assert (transfer.status_code, transfer.json()["error"]) == (404, "file_not_found")
    assert (status.status_code, status.json()["error"]) == (404, "transfer_not_found")


JUNK_UPLOAD_IDS = ["%00", "a%00" * 8, "short", "x" * 65, "%C3%A9" * 10, "abc.def.ghi", "%20" * 10]


@pytest.mark.parametrize("raw_id", JUNK_UPLOAD_IDS)
async def test_an_upload_id_that_cannot_exist_is_404_without_asking_the_store(
    sqlite_server: LiveServer, raw_id: str
) -> None:
    gets = record_calls(sqlite_server.parts.store, "get")
    async with sqlite_server.client() as client:
        answers = await tus_requests(client, raw_id)
        answers["session status"] = await client.get("/api/files/upload/session/" + raw_id)
    assert {name: response.status_code for name, response in answers.items()} == dict.fromkeys(answers, 404)
    assert gets == []


@pytest.mark.parametrize("raw_id", ["%00", "not-a-uuid", "0" * 36, str(uuid.uuid4()) + "0", "%C3%A9" * 36])
async def test_a_file_id_that_is_not_a_uuid_is_404_without_asking_the_store(
    sqlite_server: LiveServer, raw_id: str
) -> None:
    lookups = record_calls(sqlite_server.parts.saga_store, "get_file")
    async with sqlite_server.client() as client:
        deleted = await client.delete("/api/files/" + raw_id)
        transfer = await client.post(f"/api/files/{raw_id}/transfer", json={"destination_storage_element_id": "local"})
    assert (deleted.status_code, transfer.status_code) == (404, 404)
    assert lookups == []


@pytest.mark.parametrize("session_id", ["short", "x" * 65, "has space here", "sess\xe9ion-1234"])
async def test_a_bad_upload_session_id_header_is_400_and_creates_nothing(
    sqlite_server: LiveServer, session_id: str
) -> None:
    creates = record_calls(sqlite_server.parts.store, "create")
    async with sqlite_server.client() as client:
        response = await post_file(client, b"data", headers={"X-Upload-Session-ID": session_id.encode("latin-1")})  # type: ignore[dict-item]
    assert (response.status_code, response.json()["error"]) == (400, "invalid_session_id")
    assert creates == []


# --- numbers, boundaries and JSON that the parsers refused with a 500 -------------------------


@pytest.mark.parametrize(
    ("fields", "headers", "code"),
    [
        ({"offset": "\u00b2"}, {}, "invalid_request"),
        ({"offset": "\u0661"}, {}, "invalid_request"),  # ARABIC-INDIC DIGIT ONE: int() takes it, we do not
        ({"total_size": "9" * 5000}, {}, "invalid_request"),
        ({"total_size": "99999999999999999999"}, {}, "invalid_request"),
        ({}, {"Content-Range": "bytes 0-3/" + "9" * 5000}, "invalid_content_range"),
        ({}, {"Content-Range": b"bytes 0-3/\xb2"}, "invalid_content_range"),
        ({}, {"Content-Range": "bytes 0-3/99999999999999999999"}, "invalid_content_range"),
    ],
)
async def test_a_number_no_parser_accepts_is_400_and_creates_nothing(
    sqlite_server: LiveServer, fields: dict[str, str], headers: dict[str, Any], code: str
) -> None:
    creates = record_calls(sqlite_server.parts.store, "create")
    async with sqlite_server.client() as client:
        response = await post_file(client, b"data", fields=fields, headers=headers)
    assert (response.status_code, response.json()["error"]) == (400, code)
    assert creates == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Upload-Length": "9" * 5000},
        {"Upload-Length": "\u00b2".encode("latin-1")},
        {"Upload-Length": "99999999999999999999"},
        {"Upload-Defer-Length": "1", "Upload-Length": "1 2"},
    ],
)
async def test_a_tus_creation_with_an_unparseable_upload_length_is_400(
    sqlite_server: LiveServer, headers: dict[str, Any]
) -> None:
    creates = record_calls(sqlite_server.parts.store, "create")
    async with sqlite_server.client() as client:
        response = await client.post("/files/", headers=TUS | headers)
    assert response.status_code == 400 and "Upload-Length" in response.text
    assert creates == []


@pytest.mark.parametrize("offset", ["9" * 5000, "99999999999999999999", "\u00b2", "-1", "0x10"])
async def test_a_tus_patch_with_an_unparseable_upload_offset_is_400_and_keeps_nothing(
    sqlite_server: LiveServer, offset: str
) -> None:
    async with sqlite_server.client() as client:
        created = await client.post("/files/", headers=TUS | {"Upload-Length": "3"})
        url = created.headers["Location"]
        headers = TUS | {"Upload-Offset": offset.encode("latin-1"), "Content-Type": OCTETS}
        response = await client.patch(url, headers=headers, content=b"abc")  # type: ignore[arg-type]
        after = await client.head(url, headers=TUS)
    assert response.status_code == 400 and "Upload-Offset" in response.text
    assert after.headers["Upload-Offset"] == "0"


@pytest.mark.parametrize("route", ["/api/files/upload", "/api/files/batch/upload"])
async def test_a_multipart_boundary_longer_than_rfc_2046_allows_is_400(sqlite_server: LiveServer, route: str) -> None:
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc\r\n--{boundary}--\r\n'
    creates = record_calls(sqlite_server.parts.store, "create")
    async with sqlite_server.client() as client:
        response = await client.post(
            route, content=body.encode(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert "boundary" in response.json()["message"]
    assert creates == []


@pytest.mark.parametrize("metadata", ["[" * 30_000, '{"a":' * 9 + "1" + "}" * 9])
async def test_metadata_json_nested_too_deep_is_400(sqlite_server: LiveServer, metadata: str) -> None:
    creates = record_calls(sqlite_server.parts.store, "create")
    async with sqlite_server.client() as client:
        response = await post_file(client, b"data", fields={"metadata": metadata})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_metadata")
    assert "deep" in response.json()["message"]
    assert creates == []


async def test_a_json_number_past_the_int_digit_limit_is_400_in_metadata_and_in_a_transfer_body(
    sqlite_server: LiveServer,
) -> None:
    number = "7" * 5000  # json.loads raises ValueError (not JSONDecodeError) past 4,300 digits
    async with sqlite_server.client() as client:
        metadata = await post_file(client, b"data", fields={"metadata": '{"n": ' + number + "}"})
        transfer = await client.post(
            f"/api/files/{uuid.uuid4()}/transfer",
            content='{"destination_storage_element_id": "local", "n": ' + number + "}",
            headers={"Content-Type": "application/json"},
        )
    assert (metadata.status_code, metadata.json()["error"]) == (400, "invalid_metadata")
    assert (transfer.status_code, transfer.json()["error"]) == (400, "invalid_request")


async def test_brackets_inside_metadata_strings_are_text_not_nesting(sqlite_server: LiveServer) -> None:
    metadata = json.dumps({"note": "[" * 1000 + "{" * 1000, "depth": {"a": {"b": {"c": [1, [2, [3]]]}}}})
    async with sqlite_server.client() as client:
        response = await post_file(client, b"data", fields={"metadata": metadata})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"destination_storage_element_id": "local", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b"[" * 60_000,
        b'{"destination_storage_element_id": "local", "x": "' + b"y" * (70 << 10) + b'"}',
    ],
)
async def test_a_transfer_body_too_deep_or_too_large_is_400(sqlite_server: LiveServer, body: bytes) -> None:
    async with sqlite_server.client() as client:
        response = await client.post(
            f"/api/files/{uuid.uuid4()}/transfer", content=body, headers={"Content-Type": "application/json"}
        )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


# --- truncated multipart bodies ---------------------------------------------------------------


def cut_before_closing_boundary(body: bytes) -> bytes:
    """The body as a client that stopped sending just before ``--boundary--`` leaves it."""
    return body[: body.rindex(b"\r\n--")]


async def test_a_truncated_one_shot_upload_is_400_and_keeps_nothing(sqlite_server: LiveServer) -> None:
    body, content_type = multipart(("file", "cut.bin", b"x" * 50_000))
    async with sqlite_server.client() as client:
        response = await client.post(
            "/api/files/upload", content=cut_before_closing_boundary(body), headers={"Content-Type": content_type}
        )
    assert (response.status_code, response.json()["error"]) == (400, "truncated_body")
    assert await sqlite_server.parts.saga_store.count_files() == 0
    assert await sqlite_server.parts.staging.list_upload_ids() == []


async def test_a_truncated_resumable_upload_keeps_what_arrived_and_does_not_complete(
    sqlite_server: LiveServer,
) -> None:
    session_id = "cut-" + secrets.token_hex(8)
    payload = b"y" * 80_000
    body, content_type = multipart(("file", "cut.bin", payload[:30_000]), fields={"total_size": str(len(payload))})
    headers = {"Content-Type": content_type, "X-Upload-Session-ID": session_id}
    async with sqlite_server.client() as client:
        cut = await client.post("/api/files/upload", content=cut_before_closing_boundary(body), headers=headers)
        status = await client.get(f"/api/files/upload/session/{session_id}")
        rest = await post_file(
            client,
            payload[30_000:],
            fields={"offset": "30000", "total_size": str(len(payload))},
            headers={"X-Upload-Session-ID": session_id},
        )
    assert (cut.status_code, cut.json()["error"], cut.json()["bytes_uploaded"]) == (400, "truncated_body", 30_000)
    assert (status.json()["status"], status.json()["bytes_uploaded"]) == ("in_progress", 30_000)
    assert rest.status_code == 201, rest.text
    assert rest.json()["size_bytes"] == len(payload)
    assert await sqlite_server.parts.saga_store.count_files() == 1


async def test_a_truncated_resumable_upload_with_every_byte_is_registered_only_once_resumed(
    sqlite_server: LiveServer,
) -> None:
    session_id = "whole-" + secrets.token_hex(8)
    body, content_type = multipart(("file", "cut.bin", b"z" * 1000), fields={"total_size": "1000"})
    headers = {"Content-Type": content_type, "X-Upload-Session-ID": session_id}
    async with sqlite_server.client() as client:
        cut = await client.post("/api/files/upload", content=cut_before_closing_boundary(body), headers=headers)
        files_after_cut = await sqlite_server.parts.saga_store.count_files()
        saga_after_cut = await sqlite_server.parts.saga_store.latest_saga("upload", session_id)
        resumed = await post_file(client, b"", fields={"offset": "1000"}, headers={"X-Upload-Session-ID": session_id})
    assert (cut.status_code, cut.json()["error"], cut.json()["bytes_uploaded"]) == (400, "truncated_body", 1000)
    assert (files_after_cut, saga_after_cut) == (0, None)
    assert resumed.status_code == 201, resumed.text
    assert resumed.json()["size_bytes"] == 1000


async def test_a_truncated_batch_keeps_nothing(sqlite_server: LiveServer) -> None:
    # The parts are named "files": since issue 11 a batch refuses other names with 400, which
    # would answer this request before its truncation is seen.
    body, content_type = multipart(("files", "a.bin", b"a" * 20_000), ("files", "b.bin", b"b" * 20_000))
    async with sqlite_server.client() as client:
        response = await client.post(
            "/api/files/batch/upload",
            content=cut_before_closing_boundary(body),
            headers={"Content-Type": content_type},
        )
    assert (response.status_code, response.json()["error"]) == (400, "truncated_body")
    assert await sqlite_server.parts.saga_store.count_files() == 0
    assert await sqlite_server.parts.staging.list_upload_ids() == []


# --- concatenation names only this server's uploads -------------------------------------------


async def partial(client: httpx.AsyncClient) -> str:
    response = await client.post(
        "/files/",
        headers=TUS | {"Upload-Concat": "partial", "Upload-Length": "1", "Content-Type": OCTETS},
        content=b"p",
    )
    assert response.status_code == 201, response.text
    return str(response.headers["Location"])


@pytest.mark.parametrize(
    "foreign", ["http://elsewhere.example/files/{id}", "//elsewhere.example/files/{id}", "https://{host}/files/{id}"]
)
async def test_a_final_naming_an_upload_on_another_host_is_400_and_creates_nothing(
    sqlite_server: LiveServer, foreign: str
) -> None:
    async with sqlite_server.client() as client:
        url = await partial(client)
        creates = record_calls(sqlite_server.parts.store, "create")
        host = httpx.URL(url).netloc.decode()
        named = foreign.format(id=url.rsplit("/", 1)[1], host=host)
        response = await client.post("/files/", headers=TUS | {"Upload-Concat": f"final;{url} {named}"})
    assert response.status_code == 400 and "not an upload of this server" in response.text
    assert creates == []


async def test_a_final_behind_a_trusted_proxy_accepts_the_public_host_and_refuses_the_internal_one(
    start_sqlite_server: ServerFactory,
) -> None:
    server = await start_sqlite_server(trust_proxy_headers=True)
    forwarded = {"X-Forwarded-Host": "uploads.example", "X-Forwarded-Proto": "https"}
    async with server.client() as client:
        created = await client.post(
            "/files/",
            headers=TUS | forwarded | {"Upload-Concat": "partial", "Upload-Length": "1", "Content-Type": OCTETS},
            content=b"p",
        )
        public = created.headers["Location"]
        internal = server.files_url + public.rsplit("/", 1)[1]
        accepted = await client.post("/files/", headers=TUS | forwarded | {"Upload-Concat": f"final;{public}"})
        refused = await client.post("/files/", headers=TUS | forwarded | {"Upload-Concat": f"final;{internal}"})
    assert public.startswith("https://uploads.example/files/")
    assert accepted.status_code == 201, accepted.text
    assert refused.status_code == 400 and "not an upload of this server" in refused.text
