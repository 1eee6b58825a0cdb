"""The REST facade's uploads: POST /api/files/upload (one-shot and resumable) and
POST /api/files/batch/upload, over a live server, ending in the same finaliser as tus."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

import httpx

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import LiveServer, ServerFactory, upload_bytes

MiB = 1 << 20
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + os.urandom(4000)


def multipart(
    *files: tuple[str, str, bytes], fields: dict[str, str] | None = None, name: str = "file"
) -> tuple[bytes, str]:
    """A multipart/form-data body: fields first, then the file parts."""
    boundary = "----tusingest" + secrets.token_hex(8)
    body = bytearray()
    for key, value in (fields or {}).items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    for part_name, filename, data in files:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{part_name or name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


async def post_file(
    client: httpx.AsyncClient,
    data: bytes,
    filename: str = "data.bin",
    fields: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body, content_type = multipart(("file", filename, data), fields=fields)
    return await client.post(
        "/api/files/upload", content=body, headers={"Content-Type": content_type} | (headers or {})
    )


async def test_a_file_posted_to_the_facade_becomes_a_registered_file(server: LiveServer) -> None:
    payload = os.urandom(3 * MiB + 5)
    async with server.client() as client:
        response = await post_file(
            client,
            payload,
            "Field Notes.bin",
            fields={"metadata": json.dumps({"project": "atlas", "username": "dora"}), "description": "notes"},
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["size_bytes"] == len(payload)
    assert body["sha256_hash"] == hashlib.sha256(payload).hexdigest()
    assert body["md5_hash"] == hashlib.md5(payload).hexdigest()
    assert body["storage_element_id"] == "local" and body["compression"] is None
    assert body["storage_filename"].startswith("Field_Notes_dora_") and body["storage_filename"].endswith(".bin")
    assert body["uploaded_at"].endswith("Z")
    record = await server.parts.saga_store.get_file(body["file_id"])
    assert record is not None and record.metadata["project"] == "atlas" and record.description == "notes"
    assert record.upload_id is not None and await upload_bytes(server, record.upload_id) == payload


async def test_a_text_file_posted_to_the_facade_is_compressed_like_a_tus_upload(server: LiveServer) -> None:
    payload = b"".join(b"%08d the same line of a log, again and again\n" % n for n in range(60_000))
    async with server.client() as client:
        response = await post_file(client, payload, "app.log")
    assert response.status_code == 201
    assert response.json()["compression"] == {"algorithm": "brotli"}


async def test_a_resumable_upload_cut_mid_body_continues_from_what_arrived(server: LiveServer) -> None:
    payload = os.urandom(4 * MiB)
    session = "facade-" + secrets.token_hex(6)
    body, content_type = multipart(("file", "big.bin", payload))
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "X-Upload-Session-ID": session,
        "Content-Range": f"bytes 0-{len(payload) - 1}/{len(payload)}",
    }
    # Send a little over half of the body, then the network drops.
    _, writer = await open_request(server.url + "/api/files/upload", "POST", headers)
    writer.write(body[: 2 * MiB + 1000])
    await writer.drain()
    async with server.client() as client:

        async def status() -> dict[str, object]:
            return dict((await client.get(f"/api/files/upload/session/{session}")).json())

        writer.close()
        await writer.wait_closed()
        # The server notices the drop and commits what arrived; the session tells how much.
        current = await eventually(status, lambda now: int(str(now.get("bytes_uploaded") or 0)) > 0)
        received = int(str(current["bytes_uploaded"]))
        assert 0 < received < len(payload) and current["bytes_total"] == len(payload)

        rest = await post_file(
            client,
            payload[received:],
            "big.bin",
            headers={
                "X-Upload-Session-ID": session,
                "Content-Range": f"bytes {received}-{len(payload) - 1}/{len(payload)}",
            },
        )
        final = await status()
    assert rest.status_code == 201, rest.text
    assert rest.json()["sha256_hash"] == hashlib.sha256(payload).hexdigest()
    assert final["status"] == "completed"


async def test_a_resumable_upload_in_two_requests_answers_202_then_201(server: LiveServer) -> None:
    payload = os.urandom(300_000)
    session = "two-parts-0001"
    async with server.client() as client:
        first = await post_file(
            client, payload[:100_000], fields={"offset": "0", "total_size": str(len(payload))},
            headers={"X-Upload-Session-ID": session},
        )  # fmt: skip
        wrong = await post_file(
            client, payload[50_000:], fields={"offset": "50000"}, headers={"X-Upload-Session-ID": session}
        )
        second = await post_file(
            client, payload[100_000:], fields={"offset": "100000"}, headers={"X-Upload-Session-ID": session}
        )
    assert first.status_code == 202
    assert first.json() == {
        "upload_session_id": session,
        "bytes_uploaded": 100_000,
        "bytes_total": 300_000,
        "percent_complete": 33.33,
    }
    assert wrong.status_code == 409 and wrong.json()["error"] == "offset_mismatch"
    assert wrong.json()["bytes_uploaded"] == 100_000
    assert second.status_code == 201 and second.json()["size_bytes"] == len(payload)


async def test_bad_requests_get_json_errors(server: LiveServer) -> None:
    async with server.client() as client:
        not_multipart = await client.post("/api/files/upload", content=b"hello", headers={"Content-Type": "text/plain"})
        fields_only, fields_type = multipart(fields={"a": "b"})
        no_file = await client.post("/api/files/upload", content=fields_only, headers={"Content-Type": fields_type})
        bad_metadata = await post_file(client, b"x", fields={"metadata": "[1, 2]"})
        bad_session = await post_file(client, b"x", headers={"X-Upload-Session-ID": "no/slashes"})
        bad_range = await post_file(client, b"x", headers={"Content-Range": "bytes 5-1/10"})
    assert (not_multipart.status_code, not_multipart.json()["error"]) == (400, "invalid_request")
    assert no_file.status_code == 400 and "file" in no_file.json()["message"]
    assert (bad_metadata.status_code, bad_metadata.json()["error"]) == (400, "invalid_metadata")
    assert (bad_session.status_code, bad_session.json()["error"]) == (400, "invalid_session_id")
    assert (bad_range.status_code, bad_range.json()["error"]) == (400, "invalid_content_range")


async def test_a_refused_type_is_refused_with_415_and_nothing_kept(start_server: ServerFactory) -> None:
    server = await start_server(allowed_mime_types="image/*")
    async with server.client() as client:
        refused = await post_file(client, b"just some text\n" * 10_000, "notes.txt")
        accepted = await post_file(client, PNG, "pixel.png")
    assert refused.status_code == 415 and refused.json()["error"] == "mime_type_not_allowed"
    assert accepted.status_code == 201
    assert await server.parts.saga_store.count_files() == 1


async def test_a_file_over_the_size_limit_is_refused_with_413(start_server: ServerFactory) -> None:
    server = await start_server(max_file_size_mb=1)
    async with server.client() as client:
        response = await post_file(client, os.urandom(MiB + 1))
    assert response.status_code == 413 and response.json()["error"] == "file_too_large"
    assert await server.parts.saga_store.count_files() == 0


# --- batch ---------------------------------------------------------------------------------------


async def test_a_batch_stores_the_good_files_and_reports_the_bad_ones(start_server: ServerFactory) -> None:
    server = await start_server(max_file_size_mb=1, allowed_mime_types="image/*")
    # PNGs, so that libmagic's verdict does not depend on random bytes.
    files = [("files", f"f{n}.png", PNG + os.urandom(10_000 + n)) for n in range(8)]
    files.insert(3, ("files", "too-big.png", PNG + os.urandom(MiB + 10)))
    files.insert(6, ("files", "letter.txt", b"Dear reader,\n" * 500))
    body, content_type = multipart(*files, fields={"metadata": json.dumps({"batch": "b-1"})})
    async with server.client() as client:
        response = await client.post("/api/files/batch/upload", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 207, response.text
    report = response.json()
    failures = [r for r in report["results"] if r["status"] == "failed"]
    assert report["summary"] == {"total": 10, "succeeded": 8, "failed": 2}, failures
    by_name = {result["filename"]: result for result in report["results"]}
    assert by_name["too-big.png"]["status"] == "failed"
    assert by_name["too-big.png"]["error"]["error"] == "file_too_large"
    assert by_name["letter.txt"]["error"]["error"] == "mime_type_not_allowed"
    for _, name, data in files:
        if name.startswith("f"):
            assert by_name[name]["status"] == "success"
            assert by_name[name]["sha256_hash"] == hashlib.sha256(data).hexdigest()
            assert by_name[name]["size_bytes"] == len(data)
    assert await server.parts.saga_store.count_files() == 8


async def test_a_batch_with_too_many_files_is_refused_with_413_and_keeps_nothing(start_server: ServerFactory) -> None:
    server = await start_server(max_batch_files=3)
    body, content_type = multipart(*[("files", f"{n}.bin", os.urandom(100)) for n in range(4)])
    async with server.client() as client:
        response = await client.post("/api/files/batch/upload", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 413 and response.json()["error"] == "too_many_files"
    assert await server.parts.saga_store.count_files() == 0
    assert not [p for p in Path(server.settings.staging_dir).iterdir() if p.is_dir() and any(p.iterdir())]


async def test_a_batch_announced_larger_than_the_limit_is_refused_before_reading(start_server: ServerFactory) -> None:
    server = await start_server(max_batch_size_mb=1)
    headers = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(50 * MiB)}
    reader, writer = await open_request(server.url + "/api/files/batch/upload", "POST", headers)
    writer.write(b"--x\r\n")
    await writer.drain()
    status, _ = await read_response(reader)
    writer.close()
    assert status == 413
