"""Expiry: idle uploads lose their staged bytes and answer 410; busy ones are left alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tusingest.sessions import UploadState
from tusingest.sessions.expiry import expire_uploads


async def create_with_bytes(server: LiveServer) -> str:
    async with server.client() as client:
        response = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "10", "Content-Type": OCTETS}, content=b"abc"
        )
    return response.headers["Location"].rsplit("/", 1)[1]


async def test_sweep_marks_expired_uploads_and_removes_their_staged_bytes(server: LiveServer) -> None:
    parts = server.parts
    stale, fresh = await create_with_bytes(server), await create_with_bytes(server)
    past = datetime.now(UTC) - timedelta(minutes=1)
    await parts.store.commit_offset(stale, 3, 3, past, past)

    report = await expire_uploads(parts.store, parts.staging, parts.locker)

    assert report.expired == 1 and report.skipped_busy == 0
    expired = await parts.store.get(stale)
    assert expired is not None and expired.state is UploadState.EXPIRED
    assert await parts.staging.list_upload_ids() == [fresh]
    async with server.client() as client:
        assert (await client.head(f"/files/{stale}", headers=TUS)).status_code == 410
        assert (await client.head(f"/files/{fresh}", headers=TUS)).status_code == 200


async def test_sweep_leaves_an_upload_that_is_being_written(server: LiveServer) -> None:
    parts = server.parts
    upload_id = await create_with_bytes(server)
    past = datetime.now(UTC) - timedelta(minutes=1)
    await parts.store.commit_offset(upload_id, 3, 3, past, past)
    async with parts.locker.lock(upload_id):
        report = await expire_uploads(parts.store, parts.staging, parts.locker)
    assert report.expired == 0 and report.skipped_busy == 1
    assert await parts.staging.list_upload_ids() == [upload_id]


async def test_the_background_task_expires_idle_uploads(start_server: ServerFactory) -> None:
    server = await start_server(upload_session_ttl_hours=0.0002, upload_session_cleanup_interval_hours=0.0001)
    upload_id = await create_with_bytes(server)

    async def state_and_staging() -> tuple[UploadState | None, list[str]]:
        upload = await server.parts.store.get(upload_id)
        return (None if upload is None else upload.state), await server.parts.staging.list_upload_ids()

    # The sweep marks the upload EXPIRED, then removes its bytes: wait for both, not only the first.
    await eventually(state_and_staging, lambda seen: seen == (UploadState.EXPIRED, []), timeout=15)
