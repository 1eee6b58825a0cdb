"""DELETE /api/files/{file_id} over real components: a file uploaded over tus is removed from its edit Storage
Element (moto S3 or a directory), object and attr.json and registry row, and a file:deleted event says so; files on
elements that do not allow deletes stay untouched; a repeated delete answers the same."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.fixtures.jwt import rsa_key, token, write_pem
from tests.fixtures.rawhttp import eventually
from tests.fixtures.redis import RedisServer
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket, s3_client
from tests.fixtures.server import LiveServer, ServerFactory
from tests.integration.test_finalise import element_file, upload
from tusingest.saga.records import SagaState

KiB = 1 << 10


def s3_keys(element: dict[str, Any]) -> list[str]:
    client = s3_client(element["endpoint"])
    try:
        return sorted(entry["Key"] for entry in client.list_objects_v2(Bucket=element["bucket"]).get("Contents", []))
    finally:
        client.close()


def directory_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest.fixture
def edit_s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    bucket = create_bucket(moto_server.url)
    monkeypatch.setenv("ELEMENT_SE_EDIT_AWS_ACCESS_KEY_ID", MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("ELEMENT_SE_EDIT_AWS_SECRET_ACCESS_KEY", MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    element = {
        "element_id": "se-edit",
        "mode": "edit",
        "backend": "s3",
        "endpoint": moto_server.url,
        "bucket": bucket,
        "prefix": "files",
    }
    try:
        yield element
    finally:
        remove_bucket(moto_server.url, bucket)


def directory_element(tmp_path: Path, element_id: str, mode: str) -> dict[str, Any]:
    return {"element_id": element_id, "mode": mode, "backend": "directory", "path": str(tmp_path / element_id)}


async def uploaded(
    server: LiveServer, payload: bytes, filename: str = "report.bin", headers: dict[str, str] | None = None
) -> str:
    """Upload over tus and return the new file's id."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers) as client:
        _, last = await upload(client, payload, filename, username="alice")
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed", last.headers
    return last.headers["ArtStore-File-Id"]


async def delete(server: LiveServer, file_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with server.client() as client:
        return await client.delete(f"/api/files/{file_id}", headers=headers or {})


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def stream(redis_client: Redis, name: str) -> list[dict[str, str]]:
    entries: list[tuple[str, dict[str, str]]] = await redis_client.xrange(name)  # type: ignore[assignment]
    return [fields for _, fields in entries]


async def test_a_file_on_an_edit_element_is_deleted_with_its_sidecar_row_and_a_file_deleted_event(
    start_server: ServerFactory,
    edit_s3: dict[str, Any],
    redis_server: RedisServer,
    redis_client: Redis,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    await redis_client.set("artstore:storage_elements", json.dumps({"version": 1, "storage_elements": [edit_s3]}))
    keys = write_pem(tmp_path / "jwt.pem", rsa_key())
    server = await start_server(
        redis_url=redis_server.url, outbox_poll_interval_seconds=0.2, jwt_public_key_path=str(keys)
    )
    bob = {"Authorization": f"Bearer {token(rsa_key(), sub='bob', role='USER')}"}
    file_id = await uploaded(server, os.urandom(300 * KiB), headers=bob)
    assert len(s3_keys(edit_s3)) == 2

    with caplog.at_level(logging.INFO, logger="tusingest.audit"):
        # The actor is the token's subject; a header claiming somebody else is not listened to.
        response = await delete(server, file_id, headers=bob | {"X-ArtStore-User": "mallory"})

    assert response.status_code == 204, response.text
    assert s3_keys(edit_s3) == []
    assert await server.parts.saga_store.get_file(file_id) is None
    events = await eventually(
        lambda: stream(redis_client, "file-events"),
        lambda entries: any(e["event_type"] == "file:deleted" for e in entries),
    )
    (deleted,) = [e for e in events if e["event_type"] == "file:deleted"]
    assert deleted["file_id"] == file_id and deleted["storage_element_id"] == "se-edit"
    assert deleted["deleted_by"] == "bob"
    entries = await eventually(
        lambda: stream(redis_client, "artstore:audit"), lambda found: any("file.deleted" in e["event"] for e in found)
    )
    (deleted_entry,) = [json.loads(e["event"]) for e in entries if "file.deleted" in e["event"]]
    assert deleted_entry["file_id"] == file_id and deleted_entry["subject"] == "bob"
    assert deleted_entry["element_ids"] == ["se-edit"] and deleted_entry["outcome"] == "ok"
    (line,) = [record for record in caplog.records if record.name == "tusingest.audit"]
    assert json.loads(line.getMessage()) == deleted_entry


async def test_a_file_on_an_rw_element_is_not_deleted_and_nothing_is_removed(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    element = directory_element(tmp_path, "se-rw", "rw")
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, element))
    file_id = await uploaded(server, os.urandom(10 * KiB))
    before = directory_files(tmp_path / "se-rw")

    response = await delete(server, file_id)

    assert response.status_code == 400
    assert response.json()["error"] == "file_in_readonly_storage"
    assert "mode rw" in response.json()["message"]
    assert directory_files(tmp_path / "se-rw") == before and len(before) == 2
    assert await server.parts.saga_store.get_file(file_id) is not None
    assert await server.parts.saga_store.latest_saga("delete", file_id) is None


async def test_a_repeated_delete_answers_204_again(start_server: ServerFactory, tmp_path: Path) -> None:
    element = directory_element(tmp_path, "se-edit", "edit")
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, element))
    file_id = await uploaded(server, os.urandom(10 * KiB))

    first = await delete(server, file_id)
    second = await delete(server, file_id)

    assert (first.status_code, second.status_code) == (204, 204)
    assert directory_files(tmp_path / "se-edit") == []
    sagas = [s for s in await server.parts.saga_store.list_sagas() if s.kind == "delete"]
    assert [(s.subject_id, s.state) for s in sagas] == [(file_id, SagaState.COMPLETED)]


async def test_deleting_an_unknown_file_answers_404(start_server: ServerFactory) -> None:
    server = await start_server()

    response = await delete(server, "0b7f3c1e-0000-4000-8000-000000000000")

    assert response.status_code == 404
    assert response.json()["error"] == "file_not_found"


async def test_a_file_on_an_element_that_left_the_list_answers_409(start_server: ServerFactory, tmp_path: Path) -> None:
    from tusingest.elements.model import ElementList

    element = directory_element(tmp_path, "se-edit", "edit")
    other = directory_element(tmp_path, "se-other", "edit")
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, element))
    file_id = await uploaded(server, os.urandom(10 * KiB))
    server.parts.elements.pool.apply(ElementList.model_validate({"version": 2, "storage_elements": [other]}))

    response = await delete(server, file_id)

    assert response.status_code == 409
    assert response.json()["error"] == "storage_element_unknown"
    assert len(directory_files(tmp_path / "se-edit")) == 2


async def test_a_delete_while_the_element_is_down_answers_503_and_finishes_once_it_is_back(
    start_server: ServerFactory, tmp_path: Path, private_moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = create_bucket(private_moto_server.url)
    monkeypatch.setenv("ELEMENT_SE_EDIT_AWS_ACCESS_KEY_ID", MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("ELEMENT_SE_EDIT_AWS_SECRET_ACCESS_KEY", MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    element = {"element_id": "se-edit", "mode": "edit", "endpoint": private_moto_server.url, "bucket": bucket}
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, element),
        storage_retry_base_delay_seconds=0.01,
        circuit_breaker_timeout_seconds=0.2,
        saga_retry_base_delay_seconds=0.05,
        saga_recovery_interval_seconds=0.2,
        s3_connect_timeout_seconds=1.0,
    )
    file_id = await uploaded(server, os.urandom(10 * KiB))
    private_moto_server.stop()

    refused = await delete(server, file_id)

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "storage_element_unavailable"
    saga = await server.parts.saga_store.latest_saga("delete", file_id)
    assert saga is not None and saga.state is SagaState.RUNNING
    assert await server.parts.saga_store.get_file(file_id) is not None

    private_moto_server.start()
    create_bucket(private_moto_server.url, bucket)  # a restarted moto is empty: the bucket comes back bare

    async def row() -> object:
        return await server.parts.saga_store.get_file(file_id)

    await eventually(row, lambda record: record is None, timeout=20)
    assert (await delete(server, file_id)).status_code == 204


async def test_concurrent_deletes_of_one_file_share_one_saga_and_both_answer_204(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    element = directory_element(tmp_path, "se-edit", "edit")
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, element))
    file_id = await uploaded(server, os.urandom(10 * KiB))

    responses = await asyncio.gather(*(delete(server, file_id) for _ in range(4)))

    assert [r.status_code for r in responses] == [204] * 4
    assert len([s for s in await server.parts.saga_store.list_sagas() if s.kind == "delete"]) == 1
    assert directory_files(tmp_path / "se-edit") == []


async def test_a_delete_that_does_not_finish_in_time_answers_503_and_a_repeat_joins_it(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    element = directory_element(tmp_path, "se-edit", "edit")
    server = await start_server(
        service_discovery_fallback_config=element_file(tmp_path, element), saga_failpoints="delete_object_deleted=pause"
    )
    server.parts.files_api.delete_wait_seconds = 0.3
    file_id = await uploaded(server, os.urandom(10 * KiB))

    first = await delete(server, file_id)
    again = await delete(server, file_id)

    for response in (first, again):
        assert response.status_code == 503
        assert response.json()["error"] == "delete_in_progress"
        assert response.headers["Retry-After"]
    sagas = [s for s in await server.parts.saga_store.list_sagas() if s.kind == "delete"]
    assert [(s.state, s.step) for s in sagas] == [(SagaState.RUNNING, "object_deleted")]
    assert await server.parts.saga_store.get_file(file_id) is not None
