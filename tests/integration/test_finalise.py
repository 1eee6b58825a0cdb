"""Finalisation over real components: a tus upload becomes a verified, registered file on a Storage
Element (moto S3 or a directory), scanned by a real clamd, compressed when worth it, or is refused
with nothing left behind."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest

from tests.fixtures.clamd import EICAR, Clamd
from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket, s3_client
from tests.fixtures.server import OCTETS, TUS, ServerFactory
from tusingest.saga.records import SagaState

MiB = 1 << 20


def metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items())


async def upload(
    client: httpx.AsyncClient, payload: bytes, filename: str = "file.bin", chunk: int = 4 * MiB, **meta: str
) -> tuple[str, httpx.Response]:
    created = await client.post(
        "/files/",
        headers=TUS | {"Upload-Length": str(len(payload)), "Upload-Metadata": metadata(filename=filename, **meta)},
    )
    assert created.status_code == 201, created.text
    url = created.headers["Location"]
    offset = 0
    response = created
    while offset < len(payload) or not payload:
        body = payload[offset : offset + chunk]
        response = await client.patch(
            url, headers=TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS}, content=body
        )
        if response.status_code != 204:
            break
        offset += len(body)
        if not payload:
            break
    return url, response


def session_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def text_payload(size: int) -> bytes:
    lines = []
    total = 0
    index = 0
    while total < size:
        line = f"2026-11-28T12:00:{index % 60:02d}Z INFO request id={index} path=/files/{index * 7919 % 10007} ok\n"
        lines.append(line)
        total += len(line)
        index += 1
    return "".join(lines).encode()[:size]


def jpeg_payload(size: int) -> bytes:
    # A JPEG header (libmagic reads the SOI/APP0 markers) followed by incompressible bytes.
    header = bytes.fromhex("ffd8ffe000104a46494600010101004800480000")
    return header + os.urandom(size - len(header))


@pytest.fixture
def s3_element(moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    bucket = create_bucket(moto_server.url)
    monkeypatch.setenv("ELEMENT_SE_S3_AWS_ACCESS_KEY_ID", MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("ELEMENT_SE_S3_AWS_SECRET_ACCESS_KEY", MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    element = {
        "element_id": "se-s3",
        "mode": "rw",
        "backend": "s3",
        "endpoint": moto_server.url,
        "bucket": bucket,
        "prefix": "files",
        "priority": 10,
    }
    try:
        yield element
    finally:
        remove_bucket(moto_server.url, bucket)


def element_file(tmp_path: Path, *elements: dict[str, Any]) -> str:
    path = tmp_path / "elements.json"
    path.write_text(json.dumps({"version": 1, "storage_elements": list(elements)}))
    return str(path)


def bucket_objects(element: dict[str, Any]) -> dict[str, dict[str, Any]]:
    client = s3_client(element["endpoint"])
    try:
        listing = client.list_objects_v2(Bucket=element["bucket"])
        objects = {}
        for entry in listing.get("Contents", []):
            head = client.head_object(Bucket=element["bucket"], Key=entry["Key"])
            body = client.get_object(Bucket=element["bucket"], Key=entry["Key"])["Body"].read()
            objects[entry["Key"]] = {"head": head, "body": body}
        return objects
    finally:
        client.close()


def split_stored(objects: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (key,) = [k for k in objects if not k.endswith(".attr.json")]
    return objects[key], json.loads(objects[key + ".attr.json"]["body"])


# --- the happy path, compression ----------------------------------------------------------------


async def test_a_text_file_is_stored_brotli_compressed_with_its_attr_json(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, s3_element), max_file_size_mb=64
    )
    payload = text_payload(12 * MiB)
    async with server.client() as client:
        url, last = await upload(client, payload, "server.log", username="alice")
        status = (await client.get(f"/api/files/upload/session/{session_id(url)}")).json()
    assert last.status_code == 204
    assert last.headers["ArtStore-Upload-Status"] == "completed"
    assert last.headers["ArtStore-Sha256"] == hashlib.sha256(payload).hexdigest()
    assert last.headers["ArtStore-Storage-Element-Id"] == "se-s3"
    stored, attr = split_stored(bucket_objects(s3_element))
    assert stored["head"]["ContentEncoding"] == "br"
    assert hashlib.sha256(brotli.decompress(stored["body"])).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert attr["compression"] == {
        "algorithm": "brotli",
        "original_size": len(payload),
        "stored_size": len(stored["body"]),
    }
    assert len(stored["body"]) < 0.5 * len(payload)
    assert attr["file_id"] == last.headers["ArtStore-File-Id"] == status["file"]["file_id"]
    assert attr["content_type"].startswith("text/")
    assert attr["md5"] == hashlib.md5(payload).hexdigest()
    assert attr["created_by"]["username"] == "alice"
    assert attr["storage_filename"].startswith("server_alice_") and attr["storage_filename"].endswith(".log")
    assert status["status"] == "completed" and status["file"]["compression"] == {"algorithm": "brotli"}
    assert status["file"]["size_bytes"] == len(payload)
    assert await server.parts.staging.last_written(session_id(url)) is None


@pytest.mark.parametrize("kind", ["random", "jpeg"])
async def test_incompressible_files_are_stored_as_received(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], kind: str
) -> None:
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, s3_element))
    payload = os.urandom(12 * MiB) if kind == "random" else jpeg_payload(12 * MiB)
    async with server.client() as client:
        _, last = await upload(client, payload, f"picture.{'bin' if kind == 'random' else 'jpg'}")
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed"
    stored, attr = split_stored(bucket_objects(s3_element))
    assert "ContentEncoding" not in stored["head"]
    assert stored["body"] == payload
    assert attr["compression"] is None
    assert attr["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_a_text_file_that_does_not_shrink_enough_is_stored_as_received(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    # Base64 of random bytes: detected as text, compresses by only ~25 %, so with a 30 % bar it stays raw.
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, s3_element), compression_min_saving=0.30
    )
    payload = base64.b64encode(os.urandom(2 * MiB))
    async with server.client() as client:
        _, last = await upload(client, payload, "noise.txt")
    assert last.status_code == 204
    stored, attr = split_stored(bucket_objects(s3_element))
    assert stored["body"] == payload and attr["compression"] is None


async def test_gzip_can_be_chosen_instead_of_brotli(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, s3_element), compression_algorithm="gzip"
    )
    payload = text_payload(2 * MiB)
    async with server.client() as client:
        _, last = await upload(client, payload, "a.csv")
    assert last.status_code == 204
    stored, attr = split_stored(bucket_objects(s3_element))
    assert stored["head"]["ContentEncoding"] == "gzip"
    assert zlib.decompress(stored["body"], wbits=31) == payload
    assert attr["compression"]["algorithm"] == "gzip"


# --- virus scanning ------------------------------------------------------------------------------


async def test_an_eicar_upload_is_refused_with_422_and_nothing_reaches_an_element(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, s3_element),
        virus_scan_enabled=True,
        clamd_url=clamd.tcp_url,
    )
    payload = os.urandom(3 * MiB) + EICAR + os.urandom(1000)
    async with server.client() as client:
        url, last = await upload(client, payload, "innocent.bin")
        head = await client.head(url, headers=TUS)
        status = (await client.get(f"/api/files/upload/session/{session_id(url)}")).json()
        again = await client.patch(
            url, headers=TUS | {"Upload-Offset": str(len(payload)), "Content-Type": OCTETS}, content=b""
        )
    assert last.status_code == 422
    assert "Eicar" in last.text and last.headers["ArtStore-Error"] == "virus_detected"
    assert bucket_objects(s3_element) == {}
    assert await server.parts.saga_store.count_files() == 0
    assert head.status_code == 200 and head.headers["ArtStore-Upload-Status"] == "failed"
    assert status["status"] == "failed" and status["error"]["error"] == "virus_detected"
    assert again.status_code == 422
    assert await server.parts.staging.last_written(session_id(url)) is None


async def test_a_clean_upload_passes_the_scan(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, s3_element),
        virus_scan_enabled=True,
        clamd_url=clamd.unix_url,
    )
    payload = os.urandom(3 * MiB)
    async with server.client() as client:
        _, last = await upload(client, payload)
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed"
    stored, _ = split_stored(bucket_objects(s3_element))
    assert stored["body"] == payload


async def test_an_unreachable_scanner_fails_closed(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_server(
        virus_scan_enabled=True,
        clamd_url="tcp://127.0.0.1:1",
        saga_retry_max_attempts=2,
        saga_retry_base_delay_seconds=0.0,
    )
    async with server.client() as client:
        _, last = await upload(client, b"hello world")
    assert last.status_code == 503 and last.headers["ArtStore-Error"] == "scanner_unavailable"
    assert await server.parts.saga_store.count_files() == 0


async def test_an_unreachable_scanner_lets_files_through_when_fail_open(start_server: ServerFactory) -> None:
    server = await start_server(virus_scan_enabled=True, clamd_url="tcp://127.0.0.1:1", virus_scan_fail_open=True)
    async with server.client() as client:
        _, last = await upload(client, b"hello world")
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed"


# --- MIME types, size, checksums ----------------------------------------------------------------


async def test_a_refused_mime_type_is_refused_on_the_first_patch(start_server: ServerFactory) -> None:
    server = await start_server(allowed_mime_types="image/*,application/pdf")
    payload = text_payload(10 * MiB)
    async with server.client() as client:
        created = await client.post(
            "/files/", headers=TUS | {"Upload-Length": str(len(payload)), "Upload-Metadata": metadata(filename="a.txt")}
        )
        url = created.headers["Location"]
        # Send only the first 256 KiB of a body announced as 10 MiB: the answer must come before the rest.
        headers = TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Content-Length": str(len(payload))}
        reader, writer = await open_request(url, "PATCH", headers)
        writer.write(payload[: 256 << 10])
        await writer.drain()
        status, response_headers = await read_response(reader)
        writer.close()
        head = await client.head(url, headers=TUS)
        session = (await client.get(f"/api/files/upload/session/{session_id(url)}")).json()
    assert status == 415
    assert response_headers["artstore-error"] == "mime_type_not_allowed"
    assert head.headers["Upload-Offset"] == "0" and head.headers["ArtStore-Upload-Status"] == "failed"
    assert session["status"] == "failed" and session["error"]["error"] == "mime_type_not_allowed"


async def test_an_allowed_mime_type_passes_the_early_check(
    start_server: ServerFactory, s3_element: dict[str, Any], tmp_path: Path
) -> None:
    server = await start_server(
        allowed_mime_types="image/*", service_discovery_fallback_config=element_file(tmp_path, s3_element)
    )
    payload = jpeg_payload(1 * MiB)
    async with server.client() as client:
        _, last = await upload(client, payload, "photo.jpg", chunk=100_000)
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed"


async def test_a_declared_sha256_that_does_not_match_is_refused(start_server: ServerFactory) -> None:
    server = await start_server()
    async with server.client() as client:
        _, last = await upload(client, b"the real bytes", sha256=hashlib.sha256(b"other bytes").hexdigest())
    assert last.status_code == 422 and last.headers["ArtStore-Error"] == "checksum_mismatch"
    assert await server.parts.saga_store.count_files() == 0
    # Checked against the digests taken as the bytes were committed, before anything was placed.
    (saga,) = await server.parts.saga_store.list_sagas()
    assert saga.step == "created"  # a small file's begin names its element; nothing was put there
    element = Path(server.settings.default_element_dir)
    assert not [p for p in element.rglob("*") if p.is_file()]


async def test_a_declared_sha256_that_matches_is_accepted(start_server: ServerFactory) -> None:
    server = await start_server()
    payload = b"the real bytes"
    async with server.client() as client:
        _, last = await upload(client, payload, sha256=hashlib.sha256(payload).hexdigest())
    assert last.status_code == 204 and last.headers["ArtStore-Sha256"] == hashlib.sha256(payload).hexdigest()


# --- the saga: element failures and rollback ------------------------------------------------------


async def test_a_sidecar_failure_removes_the_object_and_places_the_file_on_another_element(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    local = {"element_id": "local-b", "mode": "rw", "backend": "directory", "path": str(tmp_path / "b"), "priority": 20}
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, s3_element, local),
        saga_failpoints="sidecar=fail@se-s3",
    )
    payload = os.urandom(2 * MiB)
    async with server.client() as client:
        url, last = await upload(client, payload)
    assert last.status_code == 204 and last.headers["ArtStore-Storage-Element-Id"] == "local-b"
    assert bucket_objects(s3_element) == {}  # the object written to se-s3 was removed again
    record = await server.parts.saga_store.file_for_upload(session_id(url))
    assert record is not None and record.storage_element_id == "local-b"
    assert (tmp_path / "b" / record.storage_key).read_bytes() == payload
    assert (tmp_path / "b" / (record.storage_key + ".attr.json")).exists()


async def test_a_sidecar_failure_with_no_other_element_fails_the_upload_and_leaves_nothing(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, s3_element), saga_failpoints="sidecar=fail@se-s3"
    )
    async with server.client() as client:
        url, last = await upload(client, os.urandom(MiB))
        status = (await client.get(f"/api/files/upload/session/{session_id(url)}")).json()
    assert last.status_code == 503 and last.headers["ArtStore-Error"] == "storage_unavailable"
    assert bucket_objects(s3_element) == {}
    assert await server.parts.saga_store.count_files() == 0
    assert status["status"] == "failed"
    (saga,) = await server.parts.saga_store.list_sagas()
    assert saga.state is SagaState.COMPENSATED


async def test_a_final_upload_of_a_concatenation_is_finalised_into_one_file(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await start_server()
    parts = [os.urandom(300_000), os.urandom(200_000)]
    async with server.client() as client:
        urls = []
        for part in parts:
            created = await client.post(
                "/files/", headers=TUS | {"Upload-Length": str(len(part)), "Upload-Concat": "partial"}
            )
            await client.patch(
                created.headers["Location"], headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS}, content=part
            )
            urls.append(httpx.URL(created.headers["Location"]).path)
        final = await client.post("/files/", headers=TUS | {"Upload-Concat": "final;" + " ".join(urls)})
    assert final.status_code == 201 and final.headers["ArtStore-Upload-Status"] == "completed"
    record = await server.parts.saga_store.file_for_upload(session_id(final.headers["Location"]))
    assert record is not None and record.sha256 == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_session_status_reports_in_progress_with_byte_counts(start_server: ServerFactory) -> None:
    server = await start_server()
    async with server.client() as client:
        created = await client.post("/files/", headers=TUS | {"Upload-Length": "100"})
        url = created.headers["Location"]
        await client.patch(url, headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS}, content=b"x" * 40)
        status = await client.get(f"/api/files/upload/session/{session_id(url)}")
        missing = await client.get("/api/files/upload/session/nope")
    body = status.json()
    assert status.status_code == 200
    assert (body["status"], body["bytes_uploaded"], body["bytes_total"]) == ("in_progress", 40, 100)
    assert body["expires_at"] and body["created_at"] and body["file"] is None
    assert missing.status_code == 404 and missing.json()["error"] == "session_not_found"


async def test_an_upload_larger_than_the_limit_never_gets_to_finalisation(start_server: ServerFactory) -> None:
    server = await start_server(max_file_size_mb=1)
    async with server.client() as client:
        created = await client.post("/files/", headers=TUS | {"Upload-Length": str(2 * MiB)})
    assert created.status_code == 413


async def test_an_upload_being_finalised_cannot_be_terminated(start_server: ServerFactory) -> None:
    server = await start_server(finalise_wait_seconds=0, saga_failpoints="inspected=pause")
    async with server.client() as client:
        url, last = await upload(client, os.urandom(5000))
        deleted = await client.delete(url, headers=TUS)
        status = (await client.get(f"/api/files/upload/session/{session_id(url)}")).json()
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "finalizing"
    assert deleted.status_code == 423 and "finalised" in deleted.text and deleted.headers["Retry-After"]
    assert status["status"] == "finalizing"
    assert await server.parts.staging.last_written(session_id(url)) is not None  # the saga still has its bytes


async def test_head_answers_at_once_while_the_completing_patch_waits_for_its_saga(start_server: ServerFactory) -> None:
    # The completing PATCH waits up to FINALISE_WAIT_SECONDS for the saga, which is held at a
    # failpoint: that wait must not hold the upload's lock, or HEAD would wait and get 423.
    server = await start_server(finalise_wait_seconds=30, saga_failpoints="inspected=pause", lock_timeout_seconds=1)
    payload = os.urandom(5000)
    async with server.client() as client:
        created = await client.post("/files/", headers=TUS | {"Upload-Length": str(len(payload))})
        url = created.headers["Location"]
        completing = asyncio.create_task(
            client.patch(url, headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS}, content=payload)
        )

        # A small file's steps are held in memory, not in the saga log: ask the failpoint itself.
        async def held() -> bool:
            return "inspected" in server.parts.sagas.failpoints.reached

        await eventually(held, bool, timeout=10)
        head = await client.head(url, headers=TUS)
        deleted = await client.delete(url, headers=TUS)
        still_waiting = not completing.done()
        completing.cancel()
    assert still_waiting
    assert head.status_code == 200 and head.headers["Upload-Offset"] == str(len(payload))
    assert head.headers["ArtStore-Upload-Status"] == "finalizing"
    assert deleted.status_code == 423 and deleted.headers["Retry-After"]


async def test_a_finalised_upload_can_be_terminated_and_its_file_stays(start_server: ServerFactory) -> None:
    server = await start_server()
    async with server.client() as client:
        url, last = await upload(client, os.urandom(5000))
        deleted = await client.delete(url, headers=TUS)
        gone = await client.head(url, headers=TUS)
    assert last.headers["ArtStore-Upload-Status"] == "completed"
    assert deleted.status_code == 204 and gone.status_code == 410
    assert await server.parts.saga_store.get_file(last.headers["ArtStore-File-Id"]) is not None


async def test_the_sweep_purges_outbox_messages_delivered_before_the_retention(start_server: ServerFactory) -> None:
    from tusingest.app import purge_outbox
    from tusingest.saga.records import NewOutboxMessage

    server = await start_server(outbox_retention_days=0)
    # The test alone handles these messages: the node's relay would claim (and lease) them, and the
    # node's own expiry sweep (running in this event loop, so stopped here) would purge them too.
    await server.parts.relay.close()
    for task in asyncio.all_tasks():
        if task.get_name() == "upload-expiry":
            task.cancel()
    store = server.parts.saga_store
    await store.enqueue([NewOutboxMessage("webhook", "https://h.example/a", {"n": n}) for n in range(2)])
    delivered, pending = await store.claim_due_messages(limit=10, lease_seconds=0)
    await store.mark_delivered(delivered.message_id)

    assert await purge_outbox(server.parts) == 1
    (left,) = await store.claim_due_messages(limit=10, lease_seconds=0)
    assert left.message_id == pending.message_id
