"""The tus 1.0.0 core and the creation, creation-with-upload, creation-defer-length, expiration
and termination extensions, each status code and header rule, against a live server.

Every test runs against both session stores (SQLite and PostgreSQL).
"""

from __future__ import annotations

import base64
import email.utils
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, upload_bytes
from tusingest.sessions import UploadState


async def create(client: httpx.AsyncClient, length: int | None = 100, **headers: str) -> str:
    h = TUS | headers
    if length is not None:
        h["Upload-Length"] = str(length)
    response = await client.post("/files/", headers=h)
    assert response.status_code == 201, response.text
    return response.headers["Location"]


async def patch(client: httpx.AsyncClient, url: str, offset: int, body: bytes, **headers: str) -> httpx.Response:
    h = TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS} | headers
    return await client.patch(url, headers=h, content=body)


async def head(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.head(url, headers=TUS)


async def staged_dirs(server: LiveServer) -> list[str]:
    return await server.parts.staging.list_upload_ids()


# --- OPTIONS ---------------------------------------------------------------------------------------


async def test_options_advertises_version_max_size_and_enabled_extensions_without_tus_resumable(
    server: LiveServer,
) -> None:
    async with server.client() as client:
        response = await client.options("/files/")
    assert response.status_code == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Tus-Version"] == "1.0.0"
    assert response.headers["Tus-Max-Size"] == str(64 << 20)
    assert response.headers["Tus-Extension"].split(",") == [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "expiration",
        "termination",
        "checksum",
        "concatenation",
        "concatenation-unfinished",
    ]


async def test_options_lists_only_the_extensions_that_are_enabled(start_server: ServerFactory) -> None:
    server = await start_server(tus_extensions="creation,termination")
    async with server.client() as client:
        response = await client.options("/files/")
    assert response.headers["Tus-Extension"] == "creation,termination"


# --- Tus-Resumable -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0", "2.0.0"])
async def test_post_with_missing_or_unsupported_tus_resumable_gets_412_and_creates_nothing(
    server: LiveServer, version: str | None
) -> None:
    headers = {"Upload-Length": "10", "Content-Type": OCTETS}
    if version is not None:
        headers["Tus-Resumable"] = version
    async with server.client() as client:
        response = await client.post("/files/", headers=headers, content=b"0123456789")
    assert response.status_code == 412
    assert response.headers["Tus-Version"] == "1.0.0"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert await staged_dirs(server) == []


@pytest.mark.parametrize("method", ["HEAD", "PATCH", "DELETE"])
async def test_requests_on_an_upload_with_unsupported_tus_resumable_get_412_and_change_nothing(
    server: LiveServer, method: str
) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        headers = {"Tus-Resumable": "0.2.2", "Upload-Offset": "0", "Content-Type": OCTETS}
        response = await client.request(method, url, headers=headers, content=b"abc" if method == "PATCH" else None)
        assert response.status_code == 412
        assert response.headers["Tus-Version"] == "1.0.0"
        after = await head(client, url)
    assert after.status_code == 200
    assert after.headers["Upload-Offset"] == "0"


# --- creation ------------------------------------------------------------------------------------


async def test_creation_returns_201_with_absolute_location_and_unguessable_id(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": "100"})
    assert response.status_code == 201
    location = response.headers["Location"]
    assert location.startswith(server.files_url)
    upload_id = location.rsplit("/", 1)[1]
    assert len(upload_id) == 32 and int(upload_id, 16) >= 0  # 128 random bits, hex
    assert "Upload-Offset" not in response.headers


async def test_creation_accepts_the_collection_url_without_trailing_slash(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post("/files", headers=TUS | {"Upload-Length": "1"})
    assert response.status_code == 201


async def test_creation_ids_differ_for_every_upload(server: LiveServer) -> None:
    async with server.client() as client:
        urls = {await create(client, 1) for _ in range(20)}
    assert len(urls) == 20


async def test_creation_sends_upload_expires_a_ttl_from_now(start_server: ServerFactory) -> None:
    server = await start_server(upload_session_ttl_hours=2)
    before = datetime.now(UTC).replace(microsecond=0)
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": "100"})
    expires = email.utils.parsedate_to_datetime(response.headers["Upload-Expires"])
    assert before + timedelta(hours=2) <= expires <= datetime.now(UTC) + timedelta(hours=2)


async def test_creation_without_upload_length_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS)
    assert response.status_code == 400
    assert "Upload-Length" in response.text
    assert await staged_dirs(server) == []


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "1 2", "+5", "0x10", "", "99999999999999999999"])
async def test_creation_with_invalid_upload_length_is_400(server: LiveServer, value: str) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": value})
    assert response.status_code == 400


async def test_creation_above_tus_max_size_is_413(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": str((64 << 20) + 1)})
    assert response.status_code == 413


async def test_creation_at_exactly_tus_max_size_is_accepted(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": str(64 << 20)})
    assert response.status_code == 201


async def test_creation_with_upload_length_zero_is_complete_at_once(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 0)
        response = await head(client, url)
    assert response.headers["Upload-Offset"] == "0"
    assert response.headers["Upload-Length"] == "0"
    upload = await server.parts.store.get(url.rsplit("/", 1)[1])
    assert upload is not None and upload.state is UploadState.COMPLETE


# --- Upload-Metadata -------------------------------------------------------------------------------


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


async def test_metadata_is_echoed_byte_exact_including_binary_values_and_keys_without_value(
    server: LiveServer,
) -> None:
    binary = bytes(range(256))
    metadata = f"filename {b64('résumé 📄.pdf'.encode())},blob {b64(binary)},is_confidential,empty"
    async with server.client() as client:
        url = await create(client, 10, **{"Upload-Metadata": metadata})
        response = await head(client, url)
    echoed = response.headers["Upload-Metadata"]
    assert echoed == metadata.strip()
    pairs = dict(item.split(" ", 1) if " " in item else (item, "") for item in echoed.split(","))
    assert base64.b64decode(pairs["blob"]) == binary
    assert base64.b64decode(pairs["filename"]).decode() == "résumé 📄.pdf"


async def test_head_omits_upload_metadata_when_none_was_sent(server: LiveServer) -> None:
    async with server.client() as client:
        response = await head(client, await create(client, 10))
    assert "Upload-Metadata" not in response.headers


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ("filename not*base64", "not base64"),
        ("filename aGVsbG8", "not base64"),  # missing padding
        ("filename aGVsbG8=,filename d29ybGQ=", "duplicate"),
        ("filename aGVsbG8=,,size MTA=", "empty key"),
        ("filename aGVs bG8=", "more than one value"),
    ],
)
async def test_creation_with_bad_metadata_is_400_and_creates_nothing(
    server: LiveServer, metadata: str, reason: str
) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": "10", "Upload-Metadata": metadata})
    assert response.status_code == 400
    assert reason in response.text
    assert await staged_dirs(server) == []


# --- creation-defer-length -------------------------------------------------------------------------


async def test_deferred_length_is_reported_by_head_then_fixed_by_a_patch(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, None, **{"Upload-Defer-Length": "1"})
        before = await head(client, url)
        first = await patch(client, url, 0, b"hello")
        second = await patch(client, url, 5, b" world", **{"Upload-Length": "11"})
        after = await head(client, url)
    assert before.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in before.headers
    assert first.status_code == 204 and second.status_code == 204
    assert after.headers["Upload-Length"] == "11" and after.headers["Upload-Offset"] == "11"
    assert "Upload-Defer-Length" not in after.headers


async def test_upload_length_cannot_change_once_set(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        response = await patch(client, url, 0, b"abc", **{"Upload-Length": "12"})
        after = await head(client, url)
    assert response.status_code == 400
    assert after.headers["Upload-Offset"] == "0" and after.headers["Upload-Length"] == "10"


async def test_deferred_length_below_the_offset_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, None, **{"Upload-Defer-Length": "1"})
        await patch(client, url, 0, b"hello")
        response = await patch(client, url, 5, b"", **{"Upload-Length": "3"})
    assert response.status_code == 400


@pytest.mark.parametrize("headers", [{"Upload-Defer-Length": "2"}, {"Upload-Defer-Length": "1", "Upload-Length": "5"}])
async def test_invalid_upload_defer_length_is_400(server: LiveServer, headers: dict[str, str]) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | headers)
    assert response.status_code == 400


async def test_deferred_upload_cannot_grow_past_tus_max_size(start_server: ServerFactory) -> None:
    server = await start_server(max_file_size_mb=1)
    async with server.client() as client:
        url = await create(client, None, **{"Upload-Defer-Length": "1"})
        response = await patch(client, url, 0, b"x" * ((1 << 20) + 1))
        after = await head(client, url)
    assert response.status_code == 413
    assert after.headers["Upload-Offset"] == "0"


# --- creation-with-upload -------------------------------------------------------------------------


async def test_creation_with_upload_stores_the_body_and_reports_the_offset(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "11", "Content-Type": OCTETS}, content=b"hello"
        )
        after = await head(client, response.headers["Location"])
    assert response.status_code == 201
    assert response.headers["Upload-Offset"] == "5"
    assert after.headers["Upload-Offset"] == "5"


async def test_creation_with_the_whole_body_completes_the_upload(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "5", "Content-Type": OCTETS}, content=b"hello"
        )
    upload = await server.parts.store.get(response.headers["Location"].rsplit("/", 1)[1])
    assert upload is not None and upload.state is UploadState.COMPLETE and upload.offset == 5


async def test_creation_with_a_body_longer_than_upload_length_is_413_and_creates_nothing(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "3", "Content-Type": OCTETS}, content=b"hello"
        )
    assert response.status_code == 413
    assert await staged_dirs(server) == []


async def test_creation_with_a_chunked_body_longer_than_upload_length_is_413_and_creates_nothing(
    server: LiveServer,
) -> None:
    async def body():  # type: ignore[no-untyped-def]
        yield b"hel"
        yield b"lo"

    async with server.client() as client:
        response = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "3", "Content-Type": OCTETS}, content=body()
        )
    assert response.status_code == 413
    assert await staged_dirs(server) == []


async def test_creation_with_a_body_of_another_content_type_is_415(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "5", "Content-Type": "text/plain"}, content=b"hello"
        )
    assert response.status_code == 415


# --- PATCH ---------------------------------------------------------------------------------------


async def test_patch_appends_and_answers_204_with_offset_and_expiry(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 11)
        first = await patch(client, url, 0, b"hello")
        second = await patch(client, url, 5, b" world")
    assert first.status_code == 204 and first.headers["Upload-Offset"] == "5"
    assert second.status_code == 204 and second.headers["Upload-Offset"] == "11"
    assert "Upload-Expires" in first.headers
    data = await upload_bytes(server, url.rsplit("/", 1)[1], 11)
    assert data == b"hello world"


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain"])
async def test_patch_without_offset_octet_stream_content_type_is_415_and_keeps_data(
    server: LiveServer, content_type: str | None
) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        headers = TUS | {"Upload-Offset": "0"}
        if content_type:
            headers["Content-Type"] = content_type
        response = await client.patch(url, headers=headers, content=b"abc")
        after = await head(client, url)
    assert response.status_code == 415
    assert after.headers["Upload-Offset"] == "0"


async def test_patch_content_type_with_parameters_is_accepted(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 3)
        response = await patch(client, url, 0, b"abc", **{"Content-Type": OCTETS + "; charset=binary"})
    assert response.status_code == 204


@pytest.mark.parametrize("offset", [None, "-1", "abc", "1.0", ""])
async def test_patch_with_missing_or_invalid_upload_offset_is_400(server: LiveServer, offset: str | None) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        headers = TUS | {"Content-Type": OCTETS}
        if offset is not None:
            headers["Upload-Offset"] = offset
        response = await client.patch(url, headers=headers, content=b"abc")
    assert response.status_code == 400
    assert "Upload-Offset" in response.text


async def test_patch_with_stale_offset_returns_409_and_keeps_data(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        await patch(client, url, 0, b"abcde")
        response = await patch(client, url, 2, b"XYZ")
        after = await head(client, url)
    assert response.status_code == 409
    assert after.headers["Upload-Offset"] == "5"
    data = await upload_bytes(server, url.rsplit("/", 1)[1], 5)
    assert data == b"abcde"


async def test_patch_on_unknown_upload_is_404(server: LiveServer) -> None:
    async with server.client() as client:
        response = await patch(client, "/files/" + "0" * 32, 0, b"abc")
    assert response.status_code == 404


async def test_patch_running_past_upload_length_is_413_and_offset_unchanged(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        await patch(client, url, 0, b"abcde")
        response = await patch(client, url, 5, b"123456")
        after = await head(client, url)
    assert response.status_code == 413
    assert after.headers["Upload-Offset"] == "5"


async def test_chunked_patch_running_past_upload_length_is_413_and_offset_unchanged(server: LiveServer) -> None:
    async def body():  # type: ignore[no-untyped-def]
        yield b"123"
        yield b"456"

    async with server.client() as client:
        url = await create(client, 10)
        await patch(client, url, 0, b"abcde")
        response = await client.patch(url, headers=TUS | {"Upload-Offset": "5", "Content-Type": OCTETS}, content=body())
        after = await head(client, url)
        good = await patch(client, url, 5, b"12345")
    assert response.status_code == 413
    assert after.headers["Upload-Offset"] == "5"
    assert good.status_code == 204
    data = await upload_bytes(server, url.rsplit("/", 1)[1], 10)
    assert data == b"abcde12345"


async def test_empty_patch_on_a_complete_upload_is_204(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 3)
        await patch(client, url, 0, b"abc")
        response = await patch(client, url, 3, b"")
    assert response.status_code == 204
    assert response.headers["Upload-Offset"] == "3"


async def test_last_patch_completes_the_upload(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 3)
        await patch(client, url, 0, b"abc")
    upload = await server.parts.store.get(url.rsplit("/", 1)[1])
    assert upload is not None and upload.state is UploadState.COMPLETE


# --- X-HTTP-Method-Override ------------------------------------------------------------------------


async def test_post_with_method_override_patch_appends(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 5)
        headers = TUS | {"X-HTTP-Method-Override": "PATCH", "Upload-Offset": "0", "Content-Type": OCTETS}
        response = await client.post(url, headers=headers, content=b"hello")
    assert response.status_code == 204
    assert response.headers["Upload-Offset"] == "5"


async def test_post_with_method_override_head_reports_the_offset(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 5)
        await patch(client, url, 0, b"he")
        response = await client.post(url, headers=TUS | {"X-HTTP-Method-Override": "HEAD"})
    assert response.status_code == 200
    assert response.headers["Upload-Offset"] == "2"
    assert response.headers["Cache-Control"] == "no-store"


async def test_post_with_method_override_delete_terminates(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 5)
        response = await client.post(url, headers=TUS | {"X-HTTP-Method-Override": "DELETE"})
        after = await head(client, url)
    assert response.status_code == 204
    assert after.status_code == 410


async def test_post_with_an_unknown_method_override_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 5)
        response = await client.post(url, headers=TUS | {"X-HTTP-Method-Override": "PUT"})
    assert response.status_code == 400


# --- HEAD ----------------------------------------------------------------------------------------


async def test_head_reports_offset_length_and_forbids_caching(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        await patch(client, url, 0, b"abc")
        response = await head(client, url)
    assert response.status_code == 200
    assert response.headers["Upload-Offset"] == "3"
    assert response.headers["Upload-Length"] == "10"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert "Upload-Expires" in response.headers


async def test_head_on_unknown_upload_is_404(server: LiveServer) -> None:
    async with server.client() as client:
        response = await head(client, "/files/" + "f" * 32)
    assert response.status_code == 404
    assert response.headers["Tus-Resumable"] == "1.0.0"


async def test_put_on_an_upload_is_405_with_tus_headers_and_the_allowed_methods(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.put(await create(client, 5), headers=TUS)
    assert response.status_code == 405
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Allow"] == "GET, HEAD, PATCH, DELETE, OPTIONS"  # GET: a download (test_download.py)


# --- termination --------------------------------------------------------------------------------


async def test_delete_terminates_removes_staged_bytes_and_later_requests_get_410(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        await patch(client, url, 0, b"abc")
        response = await client.delete(url, headers=TUS)
        after_head = await head(client, url)
        after_patch = await patch(client, url, 3, b"def")
        again = await client.delete(url, headers=TUS)
    assert response.status_code == 204
    assert after_head.status_code == 410
    assert after_patch.status_code == 410
    assert again.status_code == 410
    assert await staged_dirs(server) == []


async def test_delete_of_unknown_upload_is_404(server: LiveServer) -> None:
    async with server.client() as client:
        response = await client.delete("/files/" + "a" * 32, headers=TUS)
    assert response.status_code == 404


async def test_delete_when_termination_is_disabled_is_405_and_keeps_the_upload(start_server: ServerFactory) -> None:
    server = await start_server(tus_extensions="creation")
    async with server.client() as client:
        url = await create(client, 10)
        response = await client.delete(url, headers=TUS)
        after = await head(client, url)
    assert response.status_code == 405
    assert after.status_code == 200


# --- expiration ---------------------------------------------------------------------------------


async def test_expired_upload_answers_410_even_before_the_sweep(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create(client, 10)
        upload_id = url.rsplit("/", 1)[1]
        past = datetime.now(UTC) - timedelta(seconds=1)
        await server.parts.store.commit_offset(upload_id, 0, 0, past, past)
        head_response = await head(client, url)
        patch_response = await patch(client, url, 0, b"abc")
    assert head_response.status_code == 410
    assert patch_response.status_code == 410


async def test_patch_extends_the_expiry_from_the_last_activity(start_server: ServerFactory) -> None:
    server = await start_server(upload_session_ttl_hours=1)
    async with server.client() as client:
        url = await create(client, 10)
        upload_id = url.rsplit("/", 1)[1]
        soon = datetime.now(UTC) + timedelta(seconds=30)
        await server.parts.store.commit_offset(upload_id, 0, 0, datetime.now(UTC), soon)
        response = await patch(client, url, 0, b"abc")
    expires = email.utils.parsedate_to_datetime(response.headers["Upload-Expires"])
    assert expires > datetime.now(UTC) + timedelta(minutes=59)


# --- Location and proxies ---------------------------------------------------------------------------


async def test_location_ignores_forwarded_headers_by_default(server: LiveServer) -> None:
    headers = TUS | {"Upload-Length": "1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    async with server.client() as client:
        response = await client.post("/files/", headers=headers)
    assert response.headers["Location"].startswith(server.files_url)


async def test_location_honours_forwarded_headers_when_trusted(start_server: ServerFactory) -> None:
    server = await start_server(trust_proxy_headers=True)
    headers = TUS | {"Upload-Length": "1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "up.example.org"}
    async with server.client() as client:
        response = await client.post("/files/", headers=headers)
    assert response.headers["Location"].startswith("https://up.example.org/files/")


async def test_base_path_is_configurable(start_server: ServerFactory) -> None:
    server = await start_server(tus_base_path="/uploads/tus")
    async with server.client() as client:
        response = await client.post("/uploads/tus/", headers=TUS | {"Upload-Length": "3"})
        url = response.headers["Location"]
        patched = await patch(client, url, 0, b"abc")
    assert url.startswith(server.url + "/uploads/tus/")
    assert patched.status_code == 204


# --- CORS --------------------------------------------------------------------------------------------


async def test_cors_preflight_allows_tus_methods_and_headers(server: LiveServer) -> None:
    headers = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type,authorization",
    }
    async with server.client() as client:
        response = await client.options("/files/" + "a" * 32, headers=headers)
    assert response.status_code == 200
    assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert all(h in allowed for h in ("tus-resumable", "upload-offset", "authorization"))


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Upload-Length": "10"}, 201),
        ({"Upload-Length": "10", "Tus-Resumable": "0.1.0"}, 412),
        ({"Upload-Length": "ten"}, 400),
        ({"Upload-Length": str(1 << 40)}, 413),
    ],
)
async def test_cors_exposes_tus_headers_also_on_early_errors(
    server: LiveServer, headers: dict[str, str], status: int
) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Origin": "https://app.example"} | headers)
    assert response.status_code == status
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"location", "upload-offset", "upload-length", "tus-resumable", "tus-version", "upload-expires"} <= exposed
    assert "upload-metadata" in exposed


async def test_cors_allows_only_configured_origins(start_server: ServerFactory) -> None:
    server = await start_server(cors_allowed_origins="https://good.example")
    async with server.client() as client:
        good = await client.post("/files/", headers=TUS | {"Upload-Length": "1", "Origin": "https://good.example"})
        bad = await client.post("/files/", headers=TUS | {"Upload-Length": "1", "Origin": "https://bad.example"})
    assert good.headers["Access-Control-Allow-Origin"] == "https://good.example"
    assert "Access-Control-Allow-Origin" not in bad.headers


# --- health ---------------------------------------------------------------------------------------


async def test_health_live_and_ready(server: LiveServer) -> None:
    async with server.client() as client:
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")
    assert live.status_code == 200
    checks = ready.json()["checks"]
    assert ready.status_code == 200 and set(checks) == {
        "session_store",
        "saga_store",
        "staging",
        "writable_storage_element",
    }
    assert all(check["ok"] for check in checks.values())


async def test_health_ready_fails_when_staging_is_not_writable(server: LiveServer) -> None:
    staging = server.parts.staging.root
    staging.rename(staging.with_name("staging.moved"))
    staging.write_bytes(b"")  # a file where the directory should be: nothing can be written below it
    async with server.client() as client:
        response = await client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["staging"]["ok"] is False
