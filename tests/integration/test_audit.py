"""The audit log over real servers: a scripted session (create, complete, a refused type, terminate, transfer,
delete, a second user's refused HEAD) leaves exactly one audit_events row per operation, with the right subject,
ids and outcome, on SQLite and PostgreSQL; the rows also reach the tusingest.audit log as JSON lines and the
artstore:audit Redis stream; `tusingest audit --json --since` reads them back."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.fixtures.jwt import rsa_key, token, write_pem
from tests.fixtures.rawhttp import eventually
from tests.fixtures.redis import RedisServer
from tests.fixtures.server import LiveServer, ServerFactory
from tests.integration.test_delete import directory_element, stream
from tests.integration.test_finalise import TUS, element_file, text_payload, upload
from tusingest.sessions.audit import Action, AuditEvent, Auditor
from tusingest.sessions.expiry import expire_uploads

KiB = 1 << 10
PDF = b"%PDF-1.4\n" + os.urandom(64 * KiB)
ALICE, BOB = "alice-sub", "bob-sub"


def bearer(subject: str, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(rsa_key(), sub=subject, name=name, role='USER', scope='files:transfer')}"}


async def keyed(start_server: ServerFactory, tmp_path: Path, **overrides: object) -> LiveServer:
    elements = [directory_element(tmp_path, element_id, "edit") for element_id in ("se-a", "se-b")]
    return await start_server(
        jwt_public_key_path=str(write_pem(tmp_path / "jwt.pem", rsa_key())),
        service_discovery_fallback_config=element_file(tmp_path, *elements),
        allowed_mime_types="application/pdf",
        **overrides,
    )


def upload_id_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


async def audit_rows(server: LiveServer, since: datetime, count: int) -> list[AuditEvent]:
    """The audit rows since ``since`` once there are ``count`` of them (saga-side rows land a moment later)."""
    return await eventually(lambda: server.parts.store.list_audit(since), lambda rows: len(rows) >= count)


async def test_a_scripted_session_leaves_one_audit_row_per_operation(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await keyed(start_server, tmp_path)
    since = datetime.now(UTC) - timedelta(seconds=1)
    alice, bob = bearer(ALICE, "Alice"), bearer(BOB, "Bob")

    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=alice) as client:
        completed_url, last = await upload(client, PDF, "report.pdf")
        assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed", last.headers
        file_id = last.headers["ArtStore-File-Id"]
        refused_url, refused = await upload(client, text_payload(64 * KiB), "notes.txt")
        assert refused.status_code == 415, refused.text
        created = await client.post("/files/", headers=TUS | {"Upload-Length": "10"})
        terminated_url = created.headers["Location"]
        assert (await client.delete(terminated_url, headers=TUS)).status_code == 204
        moved = await client.post(f"/api/files/{file_id}/transfer", json={"destination_storage_element_id": "se-b"})
        assert moved.status_code == 202, moved.text
        transfer_id = moved.json()["transfer_id"]
        status = await eventually(
            lambda: client.get(f"/api/files/transfer/{transfer_id}"),
            lambda response: response.json()["status"] in ("completed", "failed"),
        )
        assert status.json()["status"] == "completed", status.text
        assert (await client.delete(f"/api/files/{file_id}")).status_code == 204
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=bob) as client:
        assert (await client.head(completed_url, headers=TUS)).status_code == 404

    rows = await audit_rows(server, since, 9)
    completed, failed, terminated = map(upload_id_of, (completed_url, refused_url, terminated_url))
    seen = {(row.action, row.upload_id or row.file_id): row for row in rows}
    assert len(rows) == len(seen) == 9, rows
    assert set(seen) == {
        ("upload.created", completed),
        ("upload.completed", completed),
        ("upload.created", failed),
        ("upload.failed", failed),
        ("upload.created", terminated),
        ("upload.terminated", terminated),
        ("file.transferred", file_id),
        ("file.deleted", file_id),
        ("authorization.refused", completed),
    }
    for row in rows:
        owner = row.action != "authorization.refused"
        assert (row.subject, row.subject_name) == ((ALICE, "Alice") if owner else (BOB, "Bob")), row
        assert row.outcome == {"upload.failed": "failed", "authorization.refused": "refused"}.get(row.action, "ok")
    # The saga-side rows of the upload (completed, failed) run on no request: no address. The rest have it.
    assert {r.action for r in rows if r.client_address != "127.0.0.1"} == {"upload.completed", "upload.failed"}
    assert all(r.client_address is None for r in rows if r.action in ("upload.completed", "upload.failed"))
    assert seen["upload.completed", completed].file_id == file_id
    assert seen["upload.completed", completed].element_ids == ("se-a",)
    assert seen["upload.failed", failed].reason == "mime_type_not_allowed"
    assert seen["file.transferred", file_id].element_ids == ("se-a", "se-b")
    assert seen["file.deleted", file_id].element_ids == ("se-b",)
    assert seen["authorization.refused", completed].reason == "not_owner"


async def test_a_missing_token_is_recorded_as_an_anonymous_refusal(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await keyed(start_server, tmp_path)
    since = datetime.now(UTC) - timedelta(seconds=1)

    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Length": "10", "Authorization": "Bearer x.y.z"})

    assert response.status_code == 401
    (row,) = await audit_rows(server, since, 1)
    assert (row.action, row.outcome, row.subject, row.client_address) == (
        "authorization.refused",
        "refused",
        "anonymous",
        "127.0.0.1",
    )
    assert row.reason is not None and row.reason.startswith("401 invalid_token") and "x.y.z" not in row.reason


async def test_an_audit_row_carries_the_trace_id_of_the_request_that_made_it(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await keyed(start_server, tmp_path)
    since = datetime.now(UTC) - timedelta(seconds=1)
    trace_id = os.urandom(16).hex()
    traceparent = f"00-{trace_id}-{os.urandom(8).hex()}-01"

    async with server.client() as client:
        created = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "10", "traceparent": traceparent} | bearer(ALICE, "Alice")
        )

    assert created.status_code == 201, created.text
    (row,) = await audit_rows(server, since, 1)
    assert (row.action, row.request_id) == ("upload.created", trace_id)


async def test_an_expired_upload_is_recorded_as_terminated_under_its_owner(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await keyed(start_server, tmp_path)
    since = datetime.now(UTC) - timedelta(seconds=1)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=bearer(ALICE, "Alice")) as client:
        created = await client.post("/files/", headers=TUS | {"Upload-Length": "10"})
    upload_id = upload_id_of(created.headers["Location"])
    parts = server.parts

    report = await expire_uploads(parts.store, parts.staging, parts.locker, now=datetime.now(UTC) + timedelta(days=2))

    assert report.expired == 1
    created_row, expired_row = await audit_rows(server, since, 2)
    assert (created_row.action, expired_row.action) == ("upload.created", "upload.terminated")
    assert (expired_row.upload_id, expired_row.subject, expired_row.reason) == (upload_id, ALICE, "expired")


# --- store-independent: the log line, the Redis stream and the CLI (on SQLite only) -------------------


async def test_events_reach_the_log_as_json_and_the_redis_stream_and_the_cli_reads_them(
    start_sqlite_server: ServerFactory,
    sqlite_url: str,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await keyed(start_sqlite_server, tmp_path, redis_url=redis_server.url)
    since = datetime.now(UTC) - timedelta(seconds=1)

    with caplog.at_level(logging.INFO, logger="tusingest.audit"):
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=bearer(ALICE, "Alice")) as client:
            url, last = await upload(client, PDF, "report.pdf")
        assert last.headers["ArtStore-Upload-Status"] == "completed"
        rows = await audit_rows(server, since, 2)

    logged = [json.loads(record.getMessage()) for record in caplog.records if record.name == "tusingest.audit"]
    assert logged == [row.fields() for row in rows]
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        streamed = [json.loads(entry["event"]) for entry in await stream(client, "artstore:audit")]
    finally:
        await client.aclose()
    assert streamed == logged
    assert [entry["action"] for entry in streamed] == ["upload.created", "upload.completed"]

    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tusingest",
        "audit",
        "--json",
        "--since",
        "1h",
        "--upload",
        upload_id_of(url),
        env=os.environ | {"DATABASE_URL": sqlite_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(cli.communicate(), timeout=60)
    assert cli.returncode == 0, err.decode()
    printed: list[dict[str, Any]] = [json.loads(line) for line in out.decode().splitlines()]
    assert printed == logged


async def test_the_cli_refuses_a_since_it_cannot_read(sqlite_url: str) -> None:
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tusingest",
        "audit",
        "--since",
        "yesterday-ish",
        env=os.environ | {"DATABASE_URL": sqlite_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(cli.communicate(), timeout=60)
    assert cli.returncode == 2 and "neither an ISO 8601 time" in err.decode()


async def test_an_unreachable_redis_costs_a_warning_not_the_event(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as closed:  # a port nobody listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        auditor = Auditor(f"redis://127.0.0.1:{closed.getsockname()[1]}/0")
        event = AuditEvent(Action.UPLOAD_CREATED, upload_id="a" * 32)
        with caplog.at_level(logging.INFO):
            await auditor.published(event)  # does not raise
        await auditor.aclose()

    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tusingest.audit"]
    assert logged == [event.fields()]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert event.id in warning.getMessage() and "artstore:audit" in warning.getMessage()


async def test_a_second_users_delete_and_transfer_of_a_file_are_recorded_as_refused(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await keyed(start_server, tmp_path)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=bearer(ALICE, "Alice")) as client:
        _, last = await upload(client, PDF, "report.pdf")
    file_id = last.headers["ArtStore-File-Id"]
    since = datetime.now(UTC)

    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=bearer(BOB, "Bob")) as client:
        assert (await client.delete(f"/api/files/{file_id}")).status_code == 404
        moved = await client.post(f"/api/files/{file_id}/transfer", json={"destination_storage_element_id": "se-b"})
        assert moved.status_code == 404

    rows = await audit_rows(server, since, 2)
    assert [(r.action, r.outcome, r.subject, r.file_id, r.reason, r.client_address) for r in rows] == [
        ("authorization.refused", "refused", BOB, file_id, "not_owner", "127.0.0.1")
    ] * 2
    assert await server.parts.saga_store.get_file(file_id) is not None
