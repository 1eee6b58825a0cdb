"""A node dies after the last byte of an upload is committed but before its saga exists (SIGKILL at
the test-only failpoint ``completed``, or while the committing statement waits on the database).

The commit itself recorded that the upload's completion is owed (``Upload.completion_pending``), so
the next node's recovery, or the client's own HEAD or empty PATCH, starts the saga: the upload ends
as exactly one registered file with its attr.json, and nothing is left in staging.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.e2e.test_saga_recovery import serving
from tests.e2e.test_serve_cli import clean_env, free_port
from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import OCTETS, TUS
from tests.fixtures.tusnode import create_upload, kill, send_whole_patch
from tusingest.app import open_database
from tusingest.saga import SagaState
from tusingest.sessions import SessionStore, Upload, UploadState


def node_env(tmp_path: Path, database_url: str, **values: str) -> dict[str, str]:
    defaults = {
        "DATABASE_URL": database_url,
        "STAGING_DIR": str(tmp_path / "staging"),
        "DEFAULT_ELEMENT_DIR": str(tmp_path / "elements"),
        "SERVICE_DISCOVERY_CACHE_FILE": str(tmp_path / "storage_elements.json"),
        "SAGA_LEASE_SECONDS": "2",
        "FINALISE_WAIT_SECONDS": "30",
        "LOCK_TIMEOUT_SECONDS": "1",  # also recovery's grace for a completion owed: short here
    }
    return clean_env(**(defaults | values))


async def owed_without_saga(store: SessionStore, database_url: str, upload_id: str) -> Upload:
    """The stranded state this test is about: complete, completion owed, and no saga row."""
    upload = await store.get(upload_id)
    sagas = open_database(database_url).sagas
    await sagas.open()
    try:
        saga = await sagas.latest_saga("upload", upload_id)
    finally:
        await sagas.close()
    assert upload is not None and saga is None, (upload, saga)
    assert (upload.state, upload.completion_pending, upload.offset) == (UploadState.COMPLETE, True, upload.length)
    return upload


async def assert_registered_once(tmp_path: Path, database_url: str, upload_id: str, payload: bytes) -> None:
    sagas = open_database(database_url).sagas
    await sagas.open()
    try:

        async def state() -> SagaState | None:
            saga = await sagas.latest_saga("upload", upload_id)
            return None if saga is None else saga.state

        await eventually(state, lambda current: current is SagaState.COMPLETED, timeout=30)
        record = await sagas.file_for_upload(upload_id)
        for_upload = [s for s in await sagas.list_sagas() if s.subject_id == upload_id]
    finally:
        await sagas.close()
    assert record is not None and record.sha256 == hashlib.sha256(payload).hexdigest()
    assert [s.state for s in for_upload] == [SagaState.COMPLETED]
    elements = tmp_path / "elements"
    stored = sorted(str(p.relative_to(elements)) for p in elements.rglob("*") if p.is_file())
    assert stored == [record.storage_key, record.storage_key + ".attr.json"]
    assert (elements / record.storage_key).read_bytes() == payload
    staging = tmp_path / "staging"
    assert not (staging / upload_id).exists(), sorted(p.name for p in staging.iterdir())


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tusingest.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def open_store(database_url: str) -> SessionStore:
    store = open_database(database_url).sessions
    await store.open()
    return store


async def strand_at_failpoint(
    tmp_path: Path, env: dict[str, str], port: int, store: SessionStore, payload: bytes
) -> str:
    """Upload ``payload`` whole to a node that pauses at the failpoint ``completed`` (its last byte
    committed, no saga yet), and SIGKILL it there; returns the upload's URL."""
    async with serving(tmp_path, env | {"SAGA_FAILPOINTS": "completed=pause"}, port) as node:
        url = await create_upload(port, len(payload), metadata="filename b3dlZC5iaW4=")
        upload_id = url.rsplit("/", 1)[1]
        writer = await send_whole_patch(url, payload)

        async def pending() -> bool:
            upload = await store.get(upload_id)
            return upload is not None and upload.completion_pending

        await eventually(pending, bool, timeout=30)  # committed; the node now pauses before the saga
        await kill(node)
        writer.close()
    return url


async def test_a_node_killed_between_the_last_commit_and_the_saga_row_has_the_upload_finished_by_recovery(
    tmp_path: Path, database_url: str
) -> None:
    env = node_env(tmp_path, database_url, SAGA_RECOVERY_INTERVAL_SECONDS="0.3")
    payload = os.urandom(1 << 20)
    port = free_port()
    store = await open_store(database_url)
    try:
        url = await strand_at_failpoint(tmp_path, env, port, store, payload)
        upload_id = url.rsplit("/", 1)[1]
        await owed_without_saga(store, database_url, upload_id)

        async with serving(tmp_path, env, port):
            await assert_registered_once(tmp_path, database_url, upload_id, payload)
            async with httpx.AsyncClient() as client:
                head = await client.head(url, headers=TUS)
        after = await store.get(upload_id)
    finally:
        await store.close()
    assert head.status_code == 200
    assert head.headers["ArtStore-Upload-Status"] == "completed"
    assert after is not None and not after.completion_pending


@pytest.mark.parametrize("ask", ["HEAD", "PATCH"])
async def test_the_clients_head_or_empty_patch_on_an_owed_upload_starts_its_finalisation_and_tells_the_status(
    tmp_path: Path, sqlite_url: str, ask: str
) -> None:
    # Recovery leaves a debt younger than the lock timeout to the request that made it, and runs again
    # only after its interval: both made too long to matter, so the client's own request pays the debt.
    env = node_env(tmp_path, sqlite_url, SAGA_RECOVERY_INTERVAL_SECONDS="3600", LOCK_TIMEOUT_SECONDS="600")
    payload = os.urandom(300_000)
    port = free_port()
    store = await open_store(sqlite_url)
    try:
        url = await strand_at_failpoint(tmp_path, env, port, store, payload)
        upload_id = url.rsplit("/", 1)[1]
        await owed_without_saga(store, sqlite_url, upload_id)

        async with serving(tmp_path, env, port):
            async with httpx.AsyncClient(timeout=30) as client:
                if ask == "HEAD":
                    answer = await client.head(url, headers=TUS)
                else:
                    answer = await client.patch(
                        url, headers=TUS | {"Upload-Offset": str(len(payload)), "Content-Type": OCTETS}
                    )
            await assert_registered_once(tmp_path, sqlite_url, upload_id, payload)
    finally:
        await store.close()
    assert answer.status_code == (200 if ask == "HEAD" else 204)
    assert answer.headers["Upload-Offset"] == str(len(payload))
    # Never a silent answer: HEAD says the saga runs (or has ended); the PATCH waits for its result.
    expected = ("finalizing", "completed") if ask == "HEAD" else ("completed",)
    assert answer.headers["ArtStore-Upload-Status"] in expected
    if ask == "PATCH":
        assert answer.headers["ArtStore-Sha256"] == hashlib.sha256(payload).hexdigest()


async def test_a_node_killed_while_its_completing_commit_waits_on_the_database_strands_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    """The committing UPDATE is held by a row lock; the node dies while it waits; PostgreSQL runs the
    UPDATE once the lock goes, with nobody left to hear the answer. The commit alone owes the completion."""
    env = node_env(tmp_path, postgres_url, SAGA_RECOVERY_INTERVAL_SECONDS="0.3")
    payload = os.urandom(1 << 20)
    port = free_port()
    store = await open_store(postgres_url)
    blocker = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    try:
        async with serving(tmp_path, env, port) as first:
            url = await create_upload(port, len(payload), metadata="filename b3dlZC5iaW4=")
            upload_id = url.rsplit("/", 1)[1]
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute("SELECT 1 FROM uploads WHERE id = $1 FOR UPDATE", upload_id)
            writer = await send_whole_patch(url, payload)

            async def commit_waiting() -> int:
                # Not on `blocker`: inside its transaction pg_stat_activity is a snapshot taken once.
                count: int = await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%UPDATE uploads SET upload_offset%'"  # alone, or in the WITH that NOTIFYs
                )
                return count

            await eventually(commit_waiting, lambda waiting: waiting == 1, timeout=30)
            await kill(first)
            writer.close()
            await holding.commit()  # the dead node's UPDATE now runs to its end

            async def committed() -> int:
                upload = await store.get(upload_id)
                return 0 if upload is None else upload.offset

            await eventually(committed, lambda offset: offset == len(payload), timeout=30)
        await owed_without_saga(store, postgres_url, upload_id)

        async with serving(tmp_path, env, port):
            await assert_registered_once(tmp_path, postgres_url, upload_id, payload)
    finally:
        await watcher.close()
        await blocker.close()
        await store.close()
