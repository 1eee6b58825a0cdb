"""POST /api/files/{file_id}/transfer and GET /api/files/transfer/{id} over real components: a file uploaded over tus
moves (or is copied) between Storage Elements (moto S3 buckets, directories), is verified at the destination before
the registry follows it, and a transfer that fails leaves the source and the registry as they were and nothing at
the destination."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest

from tests.fixtures.rawhttp import eventually
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket, s3_client
from tests.fixtures.server import LiveServer, ServerFactory
from tests.integration.test_delete import directory_element, directory_files, s3_keys, uploaded
from tests.integration.test_finalise import element_file, text_payload
from tusingest.saga.records import FileRecord, SagaState

KiB = 1 << 10
MiB = 1 << 20


def s3_element(moto_server: MotoServer, element_id: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    variable = "ELEMENT_" + element_id.upper().replace("-", "_")
    monkeypatch.setenv(f"{variable}_AWS_ACCESS_KEY_ID", MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv(f"{variable}_AWS_SECRET_ACCESS_KEY", MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    bucket = create_bucket(moto_server.url)
    return {"element_id": element_id, "mode": mode, "endpoint": moto_server.url, "bucket": bucket, "prefix": "files"}


@pytest.fixture
def buckets(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Two edit elements in two buckets of one moto server, signed with the same keys: copies are server-side."""
    elements = [s3_element(moto_server, element_id, "edit", monkeypatch) for element_id in ("se-a", "se-b")]
    try:
        yield elements
    finally:
        for element in elements:
            remove_bucket(moto_server.url, element["bucket"])


def object_bytes(element: dict[str, Any], key: str) -> bytes:
    if element.get("backend") == "directory":
        return (Path(element["path"]) / key).read_bytes()
    client = s3_client(element["endpoint"])
    try:
        body: bytes = client.get_object(Bucket=element["bucket"], Key="files/" + key)["Body"].read()
        return body
    finally:
        client.close()


async def record_of(server: LiveServer, file_id: str) -> FileRecord:
    record = await server.parts.saga_store.get_file(file_id)
    assert record is not None
    return record


async def request_transfer(server: LiveServer, file_id: str, body: Any) -> httpx.Response:
    async with server.client() as client:
        if isinstance(body, bytes):
            return await client.post(f"/api/files/{file_id}/transfer", content=body)
        return await client.post(f"/api/files/{file_id}/transfer", json=body)


async def transfer_status(server: LiveServer, transfer_id: str) -> dict[str, Any]:
    async with server.client() as client:
        response = await client.get(f"/api/files/transfer/{transfer_id}")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    return status


async def transferred(server: LiveServer, file_id: str, **body: Any) -> dict[str, Any]:
    """Start a transfer and wait for it to finish; the final status."""
    started = await request_transfer(server, file_id, body)
    assert started.status_code == 202, started.text
    transfer_id = started.json()["transfer_id"]
    return await eventually(
        lambda: transfer_status(server, transfer_id),
        lambda status: status["status"] in ("completed", "failed"),
        timeout=30,
    )


async def undone(server: LiveServer, transfer_id: str) -> None:
    """Wait until a failed transfer has removed its copy (status says "failed" as soon as it is decided)."""

    async def state() -> SagaState | None:
        saga = await server.parts.saga_store.get_saga(transfer_id)
        return None if saga is None else saga.state

    await eventually(state, lambda current: current is SagaState.COMPENSATED)


# --- moving and copying ---------------------------------------------------------------------------------------


async def test_a_move_between_buckets_copies_server_side_verifies_and_deletes_the_source(
    start_server: ServerFactory, tmp_path: Path, buckets: list[dict[str, Any]]
) -> None:
    source, destination = buckets
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, *buckets))
    payload = os.urandom(3 * MiB)
    file_id = await uploaded(server, payload)
    before = await record_of(server, file_id)
    assert before.storage_element_id == "se-a"  # the first of equals by id

    async with server.client() as client:
        started = await client.post(
            f"/api/files/{file_id}/transfer",
            json={"destination_storage_element_id": "se-b", "delete_source": True, "verify_checksum": True},
        )
    assert started.status_code == 202, started.text
    assert started.json()["status"] == "queued" and started.json()["estimated_time_seconds"] >= 1
    transfer_id = started.json()["transfer_id"]
    status = await eventually(
        lambda: transfer_status(server, transfer_id), lambda s: s["status"] in ("completed", "failed")
    )

    assert status | {"started_at": None, "completed_at": None, "transfer_rate_mbps": None} == {
        "transfer_id": transfer_id,
        "file_id": file_id,
        "status": "completed",
        "bytes_transferred": len(payload),
        "bytes_total": len(payload),
        "transfer_rate_mbps": None,
        "started_at": None,
        "completed_at": None,
        "error": None,
        "source_storage_element_id": "se-a",
        "destination_storage_element_id": "se-b",
    }
    assert status["started_at"] <= status["completed_at"] and status["transfer_rate_mbps"] > 0
    after = await record_of(server, file_id)
    assert (after.storage_element_id, after.storage_key) == ("se-b", before.storage_key)
    assert s3_keys(source) == []
    assert s3_keys(destination) == ["files/" + before.storage_key, "files/" + before.storage_key + ".attr.json"]
    assert object_bytes(destination, before.storage_key) == payload
    saga = await server.parts.saga_store.get_saga(transfer_id)
    assert saga is not None and saga.data["copy"] == "server_side"


async def test_a_copy_keeps_the_source_and_points_the_registry_at_the_destination(
    start_server: ServerFactory, tmp_path: Path, buckets: list[dict[str, Any]]
) -> None:
    source, destination = buckets
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, *buckets))
    payload = os.urandom(200 * KiB)
    file_id = await uploaded(server, payload)
    key = (await record_of(server, file_id)).storage_key

    status = await transferred(server, file_id, destination_storage_element_id="se-b")

    assert status["status"] == "completed", status
    assert (await record_of(server, file_id)).storage_element_id == "se-b"
    expected = ["files/" + key, "files/" + key + ".attr.json"]
    assert s3_keys(source) == expected and s3_keys(destination) == expected
    assert object_bytes(source, key) == object_bytes(destination, key) == payload


async def test_a_move_from_s3_to_a_directory_streams_the_object_and_its_sidecar(
    start_server: ServerFactory, tmp_path: Path, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = s3_element(moto_server, "se-s3", "edit", monkeypatch)
    destination = directory_element(tmp_path, "se-dir", "rw") | {"priority": 200}
    try:
        server = await start_server(service_discovery_fallback_config=element_file(tmp_path, source, destination))
        payload = os.urandom(2 * MiB + 17)
        file_id = await uploaded(server, payload)
        key = (await record_of(server, file_id)).storage_key
        sidecar = object_bytes(source, key + ".attr.json")

        status = await transferred(server, file_id, destination_storage_element_id="se-dir", delete_source=True)

        assert status["status"] == "completed", status
        assert status["bytes_transferred"] == len(payload)
        assert s3_keys(source) == []
        assert directory_files(tmp_path / "se-dir") == [key, key + ".attr.json"]
        assert object_bytes(destination, key) == payload
        assert object_bytes(destination, key + ".attr.json") == sidecar
        assert (await record_of(server, file_id)).storage_element_id == "se-dir"
        saga = await server.parts.saga_store.get_saga(status["transfer_id"])
        assert saga is not None and saga.data["copy"] == "streamed"
    finally:
        remove_bucket(moto_server.url, source["bucket"])


async def test_a_brotli_compressed_file_is_verified_against_its_original_sha256(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    source = directory_element(tmp_path, "se-1", "edit")
    destination = directory_element(tmp_path, "se-2", "edit") | {"priority": 200}
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, source, destination))
    payload = text_payload(3 * MiB)
    file_id = await uploaded(server, payload, "server.log")
    record = await record_of(server, file_id)
    assert record.content_encoding == "br" and record.stored_size_bytes < len(payload) // 2

    status = await transferred(
        server, file_id, destination_storage_element_id="se-2", delete_source=True, verify_checksum=True
    )

    assert status["status"] == "completed", status
    assert status["bytes_total"] == record.stored_size_bytes
    stored = object_bytes(destination, record.storage_key)
    assert hashlib.sha256(brotli.decompress(stored)).hexdigest() == record.sha256
    assert directory_files(tmp_path / "se-1") == []


# --- failures -------------------------------------------------------------------------------------------------


async def test_a_destination_that_cannot_be_written_fails_the_transfer_and_changes_nothing(
    start_server: ServerFactory, tmp_path: Path, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = s3_element(moto_server, "se-s3", "edit", monkeypatch)
    destination = directory_element(tmp_path, "se-dir", "edit") | {"priority": 200}
    try:
        server = await start_server(service_discovery_fallback_config=element_file(tmp_path, source, destination))
        payload = os.urandom(1 * MiB)
        file_id = await uploaded(server, payload)
        before = await record_of(server, file_id)
        # The element's root becomes a file: every write under it fails, for good (even for root).
        root = tmp_path / "se-dir"
        root.mkdir(exist_ok=True)
        root.rmdir()
        root.write_bytes(b"not a directory")

        failed = await transferred(server, file_id, destination_storage_element_id="se-dir", delete_source=True)
        await undone(server, failed["transfer_id"])
        status = await transfer_status(server, failed["transfer_id"])

        assert status["status"] == "failed"
        assert status["error"]["error"] == "storage_element_unavailable"
        assert "se-dir" in status["error"]["message"] and "Not a directory" in status["error"]["message"]
        assert status["completed_at"] is not None
        assert await record_of(server, file_id) == before
        assert s3_keys(source) == ["files/" + before.storage_key, "files/" + before.storage_key + ".attr.json"]
        assert object_bytes(source, before.storage_key) == payload
        assert root.read_bytes() == b"not a directory"
    finally:
        remove_bucket(moto_server.url, source["bucket"])


async def test_a_destination_that_fails_mid_copy_leaves_the_source_intact_and_no_partial_object(
    start_server: ServerFactory,
    tmp_path: Path,
    moto_server: MotoServer,
    private_moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two S3 endpoints: the copy streams through the node as a multipart upload of 5 MiB parts.
    source = s3_element(moto_server, "se-src", "edit", monkeypatch)
    destination = s3_element(private_moto_server, "se-far", "rw", monkeypatch) | {"priority": 200}
    try:
        server = await start_server(
            service_discovery_fallback_config=element_file(tmp_path, source, destination),
            chunk_size_mb=5,
            max_file_size_mb=64,
            saga_failpoints="transfer_midstream=fail@se-far",
        )
        payload = os.urandom(24 * MiB)
        file_id = await uploaded(server, payload)
        before = await record_of(server, file_id)

        failed = await transferred(server, file_id, destination_storage_element_id="se-far", delete_source=True)
        await undone(server, failed["transfer_id"])
        status = await transfer_status(server, failed["transfer_id"])

        assert status["status"] == "failed", status
        assert status["bytes_transferred"] < len(payload)
        assert await record_of(server, file_id) == before
        assert object_bytes(source, before.storage_key) == payload
        assert s3_keys(destination) == []
        client = s3_client(private_moto_server.url)
        try:
            uploads = client.list_multipart_uploads(Bucket=destination["bucket"]).get("Uploads", [])
        finally:
            client.close()
        assert uploads == []  # the half-sent multipart upload was aborted
    finally:
        remove_bucket(moto_server.url, source["bucket"])


async def test_a_copy_that_does_not_match_the_registry_checksum_is_removed_and_the_transfer_fails(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    source = directory_element(tmp_path, "se-1", "edit")
    destination = directory_element(tmp_path, "se-2", "edit") | {"priority": 200}
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, source, destination))
    payload = os.urandom(64 * KiB)
    file_id = await uploaded(server, payload)
    before = await record_of(server, file_id)
    # Bit rot on the source: same size, other bytes.
    (tmp_path / "se-1" / before.storage_key).write_bytes(os.urandom(len(payload)))

    status = await transferred(server, file_id, destination_storage_element_id="se-2", verify_checksum=True)
    await undone(server, status["transfer_id"])

    assert status["status"] == "failed"
    assert status["error"]["error"] == "checksum_mismatch"
    assert directory_files(tmp_path / "se-2") == []
    assert await record_of(server, file_id) == before


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.fixture
async def refusing_server(start_server: ServerFactory, tmp_path: Path) -> tuple[LiveServer, str]:
    """Elements of every kind a transfer can be refused for, and a file on the rw element ``se-rw``."""
    elements = [
        directory_element(tmp_path, "se-rw", "rw") | {"priority": 1},
        directory_element(tmp_path, "se-edit", "edit"),
        directory_element(tmp_path, "se-ro", "ro"),
        directory_element(tmp_path, "se-full", "edit") | {"capacity_bytes": 1000, "used_bytes": 900},
        directory_element(tmp_path, "se-away", "edit") | {"status": "maintenance"},
    ]
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, *elements))
    file_id = await uploaded(server, os.urandom(10 * KiB))
    assert (await record_of(server, file_id)).storage_element_id == "se-rw"
    return server, file_id


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"destination_storage_element_id": "se-nowhere"}, 400, "unknown_storage_element"),
        ({"destination_storage_element_id": "se-rw"}, 400, "same_storage_element"),
        ({"destination_storage_element_id": "se-ro"}, 400, "destination_not_writable"),
        ({"destination_storage_element_id": "se-away"}, 400, "destination_not_writable"),
        ({"destination_storage_element_id": "se-full"}, 400, "insufficient_space"),
        ({"destination_storage_element_id": "se-edit", "delete_source": True}, 400, "source_not_deletable"),
        ({"destination_storage_element_id": "se-edit", "delete_source": "yes"}, 400, "invalid_request"),
        ({"delete_source": True}, 400, "invalid_request"),
        (b"{not json", 400, "invalid_request"),
        (b"", 400, "invalid_request"),
    ],
)
async def test_a_transfer_that_cannot_be_made_is_refused_and_starts_nothing(
    refusing_server: tuple[LiveServer, str], body: Any, status: int, code: str
) -> None:
    server, file_id = refusing_server

    response = await request_transfer(server, file_id, body)

    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert response.json()["message"]
    assert await server.parts.saga_store.latest_saga("transfer", file_id) is None


async def test_a_transfer_of_an_unknown_file_answers_404(refusing_server: tuple[LiveServer, str]) -> None:
    server, _ = refusing_server

    response = await request_transfer(server, "no-such-file", {"destination_storage_element_id": "se-edit"})

    assert (response.status_code, response.json()["error"]) == (404, "file_not_found")


async def test_the_status_of_an_unknown_transfer_answers_404(start_server: ServerFactory) -> None:
    server = await start_server()

    async with server.client() as client:
        response = await client.get("/api/files/transfer/0123456789abcdef0123456789abcdef")

    assert (response.status_code, response.json()["error"]) == (404, "transfer_not_found")


async def test_a_second_transfer_while_one_runs_answers_409_and_deleting_the_file_too(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    elements = [directory_element(tmp_path, "se-1", "edit"), directory_element(tmp_path, "se-2", "edit")]
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, *elements), saga_failpoints="transfer_copied=pause"
    )
    file_id = await uploaded(server, os.urandom(10 * KiB))
    first = await request_transfer(server, file_id, {"destination_storage_element_id": "se-2"})
    transfer_id = first.json()["transfer_id"]
    # Copied, held at the failpoint before verification.
    await eventually(lambda: transfer_status(server, transfer_id), lambda s: s["status"] == "verifying")

    second = await request_transfer(server, file_id, {"destination_storage_element_id": "se-2"})
    async with server.client() as client:
        deleting = await client.delete(f"/api/files/{file_id}")

    assert (second.status_code, second.json()["error"]) == (409, "transfer_in_progress")
    assert transfer_id in second.json()["message"]
    assert (deleting.status_code, deleting.json()["error"]) == (409, "transfer_in_progress")
    assert (await transfer_status(server, transfer_id))["status"] == "verifying"
    assert await server.parts.saga_store.latest_saga("delete", file_id) is None
