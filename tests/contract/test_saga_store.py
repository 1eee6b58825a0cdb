"""The SagaStore contract: one behavioural suite that SQLite and PostgreSQL must both pass.

Time is passed in as ``now`` (T0 and offsets from it), so leases and due times expire without sleeping.
The PostgreSQL-only tests at the end cover the schema check in ``open`` and the 0002 migration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest
from alembic import command

from tusingest.app import open_database
from tusingest.saga import (
    DuplicateFile,
    DuplicateSaga,
    FileRecord,
    NewOutboxMessage,
    OutboxMessage,
    Saga,
    SagaNotFound,
    SagaOwnershipLost,
    SagaState,
    SagaStore,
)
from tusingest.saga.postgres import PostgresSagaStore
from tusingest.sessions import migrations
from tusingest.sessions.audit import Action, AuditEvent
from tusingest.sessions.model import Upload, new_upload_id
from tusingest.sessions.store import DatabaseNotMigrated, StoreError

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
EAST = timezone(timedelta(hours=2))
LEASE = 60.0
NODE_A, NODE_B = "node-a", "node-b"
FINISHED = [SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED]
UNFINISHED = [SagaState.RUNNING, SagaState.COMPENSATING]
AN_HOUR_LATER = T0 + timedelta(hours=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tusingest.db'}"
    # Looked up here, not declared, so the SQLite half runs without a PostgreSQL server.
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def open_store(database_url: str) -> AsyncIterator[Callable[[], Awaitable[SagaStore]]]:
    """Opens further stores on the same database, as further nodes (or processes) would; all closed at the end."""
    opened: list[SagaStore] = []

    async def open_one() -> SagaStore:
        saga_store = open_database(database_url).sagas
        await saga_store.open()
        opened.append(saga_store)
        return saga_store

    yield open_one
    for saga_store in opened:
        await saga_store.close()


@pytest.fixture
async def store(open_store: Callable[[], Awaitable[SagaStore]]) -> SagaStore:
    return await open_store()


async def started(
    store: SagaStore,
    subject_id: str | None = None,
    *,
    data: dict[str, Any] | None = None,
    owner: str = NODE_A,
    lease_seconds: float = LEASE,
    now: datetime = T0,
) -> Saga:
    return await store.create_saga(
        "upload", subject_id or new_upload_id(), data or {}, owner=owner, lease_seconds=lease_seconds, now=now
    )


async def in_state(store: SagaStore, state: SagaState, **changes: Any) -> Saga:
    saga = await started(store, **changes)
    if state is SagaState.RUNNING:
        return saga
    return await store.set_state(saga.saga_id, owner=saga.owner or NODE_A, state=state, now=saga.created_at)


def make_record(**changes: Any) -> FileRecord:
    record = FileRecord(
        file_id=new_upload_id(),
        upload_id=new_upload_id(),
        original_filename="Отчёт 2025 — 草稿 📄.pdf",
        storage_filename="Отчёт 2025 — 草稿 📄_alice_20250304T050607_f1.pdf",
        storage_element_id="se-01",
        storage_key="2025/03/04/05/Отчёт 2025 — 草稿 📄_alice_20250304T050607_f1.pdf",
        size_bytes=5 * 2**40,  # beyond 32 bits: sizes are 64-bit
        stored_size_bytes=3 * 2**32 + 7,
        content_type="application/pdf",
        content_encoding="br",
        md5="9e107d9d372bb6826bd81d3542a419d6",
        sha256="d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592",
        created_by_id="user-42",
        created_by_username="alice",
        retention_policy="permanent",
        description="quarterly report, draft",
        metadata={"project": "Ёлка", "tags": "a,b", "empty": ""},
        uploaded_at=datetime(2025, 3, 4, 7, 6, 8, 654321, tzinfo=EAST),
    )
    return dataclasses.replace(record, **changes)


def make_messages(file_id: str) -> list[NewOutboxMessage]:
    return [
        NewOutboxMessage("redis_stream", "file-events", {"event_type": "file:created", "file_id": file_id}),
        NewOutboxMessage("webhook", "https://hooks.example/artstore?x=1", {"file_id": file_id, "size": 5 * 2**40}),
    ]


async def registered(
    store: SagaStore, saga: Saga, record: FileRecord | None = None, *, step: str = "registered", now: datetime = T0
) -> tuple[Saga, FileRecord]:
    record = record or make_record(upload_id=saga.subject_id)
    saga = await store.register_file(
        saga.saga_id,
        owner=saga.owner or NODE_A,
        record=record,
        messages=make_messages(record.file_id),
        step=step,
        data_update={"file_id": record.file_id},
        lease_seconds=LEASE,
        now=now,
    )
    return saga, record


async def all_messages(store: SagaStore, now: datetime = AN_HOUR_LATER) -> list[OutboxMessage]:
    """Every undelivered message, claimed at ``now``: call it last, or where a claim does not matter."""
    return await store.claim_due_messages(now=now, limit=1000, lease_seconds=1)


async def release(database_url: str, saga_id: str) -> None:
    """What an operator does to hand a saga back: clear its owner, behind the store's back."""
    if database_url.startswith("sqlite"):
        async with aiosqlite.connect(database_url.removeprefix("sqlite:///")) as db:
            await db.execute("UPDATE sagas SET owner = NULL WHERE saga_id = ?", (saga_id,))
            await db.commit()
    else:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("UPDATE sagas SET owner = NULL WHERE saga_id = $1", saga_id)
        finally:
            await connection.close()


# --- the audit log: its row is written with the change, and never without it ----------------------


async def audit_rows(database_url: str) -> list[AuditEvent]:
    """The audit table, read through the session store (which owns list_audit) on the same database."""
    sessions = open_database(database_url).sessions
    await sessions.open()
    try:
        return await sessions.list_audit(T0 - timedelta(days=1))
    finally:
        await sessions.close()


async def test_register_file_writes_the_audit_row_once_with_the_registry_row(
    store: SagaStore, database_url: str
) -> None:
    saga = await started(store)
    record = make_record(upload_id=saga.subject_id)
    event = AuditEvent(Action.UPLOAD_COMPLETED, upload_id=saga.subject_id, file_id=record.file_id, at=T0)
    registration = dict(
        owner=NODE_A, record=record, messages=[], data_update={}, lease_seconds=LEASE, now=T0, audit=event
    )

    await store.register_file(saga.saga_id, step="registered", **registration)  # type: ignore[arg-type]
    await store.register_file(saga.saga_id, step="registered-again", **registration)  # type: ignore[arg-type]

    assert await audit_rows(database_url) == [event]


async def test_register_file_refused_writes_no_audit_row(store: SagaStore, database_url: str) -> None:
    _, record = await registered(store, await started(store))
    other = await started(store)
    event = AuditEvent(Action.UPLOAD_COMPLETED, upload_id=other.subject_id, file_id=record.file_id)

    with pytest.raises(DuplicateFile):
        await store.register_file(
            other.saga_id,
            owner=NODE_A,
            record=make_record(file_id=record.file_id, upload_id=other.subject_id),
            messages=[],
            step="registered",
            data_update={},
            lease_seconds=LEASE,
            audit=event,
        )

    assert await audit_rows(database_url) == []


async def test_set_state_writes_the_audit_row_with_the_state_and_not_when_refused(
    store: SagaStore, database_url: str
) -> None:
    saga = await started(store)
    event = AuditEvent(Action.FILE_DELETED, file_id="f" * 32, element_ids=("se-01",), at=T0)

    with pytest.raises(SagaOwnershipLost):
        await store.set_state(saga.saga_id, owner=NODE_B, state=SagaState.COMPLETED, audit=event)
    assert await audit_rows(database_url) == []

    await store.set_state(saga.saga_id, owner=NODE_A, state=SagaState.COMPLETED, audit=event)
    assert await audit_rows(database_url) == [event]


# --- create_saga / get_saga ----------------------------------------------------------------------------


async def test_created_saga_reads_back_with_every_field(store: SagaStore) -> None:
    data = {
        "element_id": "se-01",
        "object_key": "2025/03/04/05/Отчёт 📄.pdf",
        "size": 5 * 2**40,
        "hashes": {"md5": "9e10", "sha256": "d7a8"},
        "parts": [1, "two", None],
        "compressed": True,
        "ratio": 0.5,
        "nothing": None,
    }

    saga = await store.create_saga("upload", "u1", data, owner=NODE_A, lease_seconds=LEASE, now=T0.astimezone(EAST))

    assert re.fullmatch(r"[0-9a-f]{32}", saga.saga_id)
    assert saga == Saga(
        saga_id=saga.saga_id,
        kind="upload",
        subject_id="u1",
        state=SagaState.RUNNING,
        step=None,
        data=data,
        attempts=0,
        error_code=None,
        error=None,
        owner=NODE_A,
        lease_expires_at=at(LEASE),
        created_at=T0,
        updated_at=T0,
    )
    assert await store.get_saga(saga.saga_id) == saga


async def test_saga_timestamps_read_back_aware_in_utc_with_microseconds(store: SagaStore) -> None:
    saga = await started(store, now=T0.astimezone(EAST))

    got = await store.get_saga(saga.saga_id)

    assert got is not None
    for value in (got.created_at, got.updated_at, got.lease_expires_at):
        assert value is not None
        assert value.utcoffset() == timedelta(0)
    assert got.created_at.microsecond == 123456


async def test_create_saga_without_now_stamps_the_current_time(store: SagaStore) -> None:
    before = datetime.now(UTC)
    saga = await store.create_saga("delete", "f1", {}, owner=NODE_A, lease_seconds=LEASE)
    after = datetime.now(UTC)

    assert before <= saga.created_at == saga.updated_at <= after
    assert saga.lease_expires_at == saga.created_at + timedelta(seconds=LEASE)


async def test_every_saga_gets_its_own_id(store: SagaStore) -> None:
    sagas = [await started(store) for _ in range(5)]

    assert len({s.saga_id for s in sagas}) == 5


async def test_get_saga_of_an_unknown_id_returns_none(store: SagaStore) -> None:
    assert await store.get_saga("0" * 32) is None


@pytest.mark.parametrize("state", UNFINISHED)
async def test_second_saga_for_a_subject_with_an_unfinished_one_raises_duplicate_saga(
    store: SagaStore, state: SagaState
) -> None:
    first = await in_state(store, state, subject_id="u1")

    with pytest.raises(DuplicateSaga) as raised:
        await store.create_saga("upload", "u1", {}, owner=NODE_B, lease_seconds=LEASE, now=at(1))

    assert (raised.value.kind, raised.value.subject_id) == ("upload", "u1")
    assert await store.list_sagas() == [first]


@pytest.mark.parametrize("state", FINISHED)
async def test_a_new_saga_for_a_subject_may_start_once_the_previous_one_finished(
    store: SagaStore, state: SagaState
) -> None:
    await in_state(store, state, subject_id="u1")

    second = await store.create_saga("upload", "u1", {}, owner=NODE_B, lease_seconds=LEASE, now=at(1))

    assert second.state is SagaState.RUNNING


@pytest.mark.parametrize("state", [*UNFINISHED, *FINISHED])
async def test_a_first_saga_is_refused_when_the_subject_has_one_in_any_state_and_nothing_is_written(
    store: SagaStore, state: SagaState
) -> None:
    earlier = await in_state(store, state, subject_id="u1")

    with pytest.raises(DuplicateSaga) as raised:
        await store.create_saga("upload", "u1", {"n": 2}, owner=NODE_B, lease_seconds=LEASE, now=at(1), first=True)

    assert (raised.value.kind, raised.value.subject_id) == ("upload", "u1")
    assert await store.list_sagas() == [earlier]


async def test_a_first_saga_starts_when_only_other_kinds_or_subjects_have_sagas(store: SagaStore) -> None:
    await in_state(store, SagaState.COMPLETED, subject_id="u2")
    await store.create_saga("delete", "u1", {}, owner=NODE_A, lease_seconds=LEASE, now=T0)

    saga = await store.create_saga("upload", "u1", {"n": 1}, owner=NODE_B, lease_seconds=LEASE, now=at(1), first=True)

    assert (saga.kind, saga.subject_id, saga.state, saga.owner, saga.data) == (
        "upload",
        "u1",
        SagaState.RUNNING,
        NODE_B,
        {"n": 1},
    )
    assert await store.get_saga(saga.saga_id) == saga


async def test_unfinished_sagas_of_another_kind_or_subject_do_not_conflict(store: SagaStore) -> None:
    await store.create_saga("upload", "x1", {}, owner=NODE_A, lease_seconds=LEASE, now=T0)

    await store.create_saga("delete", "x1", {}, owner=NODE_A, lease_seconds=LEASE, now=T0)
    await store.create_saga("transfer", "x1", {}, owner=NODE_A, lease_seconds=LEASE, now=T0)
    await store.create_saga("upload", "x2", {}, owner=NODE_A, lease_seconds=LEASE, now=T0)

    assert len(await store.list_sagas()) == 4


@pytest.mark.parametrize("first", [False, True], ids=["any", "first"])
async def test_concurrent_creates_for_one_subject_from_two_stores_start_exactly_one_saga(
    store: SagaStore, open_store: Callable[[], Awaitable[SagaStore]], first: bool
) -> None:
    other = await open_store()

    results = await asyncio.gather(
        *(
            s.create_saga("upload", "u1", {}, owner=f"node-{i}", lease_seconds=LEASE, now=T0, first=first)
            for i, s in enumerate([store, other] * 4)
        ),
        return_exceptions=True,
    )

    started_sagas = [r for r in results if isinstance(r, Saga)]
    assert len(started_sagas) == 1
    assert all(isinstance(r, DuplicateSaga) for r in results if not isinstance(r, Saga))
    assert await store.list_sagas() == started_sagas


# --- latest_saga -------------------------------------------------------------------------------------------


async def test_latest_saga_returns_the_most_recently_created_one_in_any_state(store: SagaStore) -> None:
    await in_state(store, SagaState.COMPENSATED, subject_id="u1", now=at(0))
    newest = await in_state(store, SagaState.COMPLETED, subject_id="u1", now=at(20))
    await in_state(store, SagaState.FAILED, subject_id="u1", now=at(10))
    await started(store, "u2", now=at(30))

    assert await store.latest_saga("upload", "u1") == newest


async def test_latest_saga_looks_at_the_given_kind_only(store: SagaStore) -> None:
    upload = await started(store, "x1", now=at(0))
    await store.create_saga("delete", "x1", {}, owner=NODE_A, lease_seconds=LEASE, now=at(10))

    assert await store.latest_saga("upload", "x1") == upload
    assert await store.latest_saga("transfer", "x1") is None


# --- advance -----------------------------------------------------------------------------------------------


async def test_advance_records_the_step_merges_data_shallowly_and_renews_the_lease(store: SagaStore) -> None:
    saga = await started(store, data={"element_id": "se-01", "hashes": {"md5": "a", "sha256": "b"}, "keep": 1})

    advanced = await store.advance(
        saga.saga_id,
        owner=NODE_A,
        step="stored",
        data_update={"hashes": {"md5": "c"}, "object_key": "k", "element_id": None},
        lease_seconds=30,
        now=at(5),
    )

    expected = dataclasses.replace(
        saga,
        step="stored",
        data={"element_id": None, "hashes": {"md5": "c"}, "keep": 1, "object_key": "k"},
        lease_expires_at=at(35),
        updated_at=at(5),
    )
    assert advanced == expected
    assert await store.get_saga(saga.saga_id) == expected


async def test_advance_with_no_data_update_keeps_the_data(store: SagaStore) -> None:
    saga = await started(store, data={"a": 1})

    advanced = await store.advance(saga.saga_id, owner=NODE_A, step="s1", data_update={}, lease_seconds=LEASE)

    assert advanced.data == {"a": 1}


async def test_advance_by_another_owner_raises_ownership_lost_and_changes_nothing(store: SagaStore) -> None:
    saga = await started(store)

    with pytest.raises(SagaOwnershipLost) as raised:
        await store.advance(saga.saga_id, owner=NODE_B, step="s1", data_update={"x": 1}, lease_seconds=LEASE)

    assert (raised.value.saga_id, raised.value.owner, raised.value.current_owner) == (saga.saga_id, NODE_B, NODE_A)
    assert await store.get_saga(saga.saga_id) == saga


async def test_advance_of_an_unknown_saga_raises_saga_not_found(store: SagaStore) -> None:
    with pytest.raises(SagaNotFound):
        await store.advance("0" * 32, owner=NODE_A, step="s1", data_update={}, lease_seconds=LEASE)


# --- set_state / bump_attempts -------------------------------------------------------------------------------


async def test_set_state_to_compensating_records_the_error_and_keeps_the_lease(store: SagaStore) -> None:
    saga = await started(store)

    moved = await store.set_state(
        saga.saga_id,
        owner=NODE_A,
        state=SagaState.COMPENSATING,
        error_code="checksum_mismatch",
        error="sha256 differs: 👀",
        now=at(7),
    )

    expected = dataclasses.replace(
        saga,
        state=SagaState.COMPENSATING,
        error_code="checksum_mismatch",
        error="sha256 differs: 👀",
        updated_at=at(7),
    )
    assert moved == expected
    assert await store.get_saga(saga.saga_id) == expected


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
@pytest.mark.parametrize("state", FINISHED)
async def test_set_state_to_a_finished_state_drops_the_lease_and_keeps_the_owner(
    store: SagaStore, state: SagaState, durable: bool
) -> None:
    saga = await started(store)

    moved = await store.set_state(saga.saga_id, owner=NODE_A, state=state, now=at(1), durable=durable)

    assert (moved.state, moved.lease_expires_at, moved.owner) == (state, None, NODE_A)
    assert await store.get_saga(saga.saga_id) == moved


async def test_set_state_without_an_error_clears_the_previous_one(store: SagaStore) -> None:
    saga = await started(store)
    await store.set_state(saga.saga_id, owner=NODE_A, state=SagaState.COMPENSATING, error_code="e", error="boom")

    moved = await store.set_state(saga.saga_id, owner=NODE_A, state=SagaState.COMPENSATED)

    assert (moved.error_code, moved.error) == (None, None)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
async def test_set_state_by_another_owner_raises_ownership_lost_and_changes_nothing(
    store: SagaStore, durable: bool
) -> None:
    saga = await started(store)

    with pytest.raises(SagaOwnershipLost):
        await store.set_state(saga.saga_id, owner=NODE_B, state=SagaState.COMPLETED, durable=durable)

    assert await store.get_saga(saga.saga_id) == saga


async def test_set_state_back_to_running_beside_another_unfinished_saga_raises_duplicate_saga(
    store: SagaStore,
) -> None:
    finished = await in_state(store, SagaState.FAILED, subject_id="u1")
    await started(store, "u1", now=at(1))

    with pytest.raises(DuplicateSaga):
        await store.set_state(finished.saga_id, owner=NODE_A, state=SagaState.RUNNING, now=at(2))

    assert await store.get_saga(finished.saga_id) == finished


async def test_set_state_of_an_unknown_saga_raises_saga_not_found(store: SagaStore) -> None:
    with pytest.raises(SagaNotFound):
        await store.set_state("0" * 32, owner=NODE_A, state=SagaState.COMPLETED)


async def test_bump_attempts_counts_one_more_attempt_each_time(store: SagaStore) -> None:
    saga = await started(store)

    await store.bump_attempts(saga.saga_id, owner=NODE_A, now=at(1))
    bumped = await store.bump_attempts(saga.saga_id, owner=NODE_A, now=at(2))

    assert bumped == dataclasses.replace(saga, attempts=2, updated_at=at(2))
    assert await store.get_saga(saga.saga_id) == bumped


async def test_bump_attempts_by_another_owner_raises_ownership_lost_and_changes_nothing(store: SagaStore) -> None:
    saga = await started(store)

    with pytest.raises(SagaOwnershipLost):
        await store.bump_attempts(saga.saga_id, owner=NODE_B)

    assert await store.get_saga(saga.saga_id) == saga


async def test_bump_attempts_of_an_unknown_saga_raises_saga_not_found(store: SagaStore) -> None:
    with pytest.raises(SagaNotFound):
        await store.bump_attempts("0" * 32, owner=NODE_A)


# --- renew_lease -----------------------------------------------------------------------------------------------


async def test_renew_lease_by_the_owner_extends_it_from_now(store: SagaStore) -> None:
    saga = await started(store)

    assert await store.renew_lease(saga.saga_id, owner=NODE_A, lease_seconds=90, now=at(50)) is True

    assert await store.get_saga(saga.saga_id) == dataclasses.replace(saga, lease_expires_at=at(140), updated_at=at(50))


async def test_renew_lease_by_another_owner_returns_false_and_changes_nothing(store: SagaStore) -> None:
    saga = await started(store)

    assert await store.renew_lease(saga.saga_id, owner=NODE_B, lease_seconds=90, now=at(50)) is False

    assert await store.get_saga(saga.saga_id) == saga


@pytest.mark.parametrize("state", FINISHED)
async def test_renew_lease_of_a_finished_saga_returns_false_and_leaves_it_without_a_lease(
    store: SagaStore, state: SagaState
) -> None:
    saga = await in_state(store, state)

    assert await store.renew_lease(saga.saga_id, owner=NODE_A, lease_seconds=90, now=at(50)) is False

    assert await store.get_saga(saga.saga_id) == saga


async def test_renew_lease_of_an_unknown_saga_returns_false(store: SagaStore) -> None:
    assert await store.renew_lease("0" * 32, owner=NODE_A, lease_seconds=90) is False


# --- claim_stale and fencing -----------------------------------------------------------------------------------


async def test_claim_stale_takes_over_unfinished_sagas_whose_lease_ran_out_by_now(store: SagaStore) -> None:
    now = at(100)
    running = await started(store, lease_seconds=10)
    compensating = await in_state(store, SagaState.COMPENSATING, lease_seconds=20)
    expires_now = await started(store, lease_seconds=100)
    await started(store, lease_seconds=100.000001)

    claimed = await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=now)

    expected = [
        dataclasses.replace(s, owner=NODE_B, lease_expires_at=at(130), updated_at=now)
        for s in (running, compensating, expires_now)
    ]
    assert sorted(claimed, key=lambda s: s.saga_id) == sorted(expected, key=lambda s: s.saga_id)
    for saga in expected:
        assert await store.get_saga(saga.saga_id) == saga


async def test_a_lease_of_zero_seconds_is_stale_at_once(store: SagaStore) -> None:
    saga = await started(store, lease_seconds=0)

    claimed = await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=T0)

    assert [s.saga_id for s in claimed] == [saga.saga_id]


@pytest.mark.parametrize("state", FINISHED)
async def test_claim_stale_never_takes_a_finished_saga(store: SagaStore, state: SagaState) -> None:
    saga = await in_state(store, state, lease_seconds=0)

    assert await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=at(3600)) == []

    assert await store.get_saga(saga.saga_id) == saga


async def test_claim_stale_takes_an_unfinished_saga_that_has_no_owner(store: SagaStore, database_url: str) -> None:
    saga = await started(store, lease_seconds=3600)
    await release(database_url, saga.saga_id)

    claimed = await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=at(1))

    assert claimed == [dataclasses.replace(saga, owner=NODE_B, lease_expires_at=at(31), updated_at=at(1))]


async def test_claim_stale_takes_at_most_limit_sagas_the_longest_expired_first(store: SagaStore) -> None:
    sagas = {lease: await started(store, lease_seconds=lease) for lease in (40, 10, 30, 20, 50)}

    claimed = await store.claim_stale(NODE_B, lease_seconds=30, limit=2, now=at(100))

    assert {s.saga_id for s in claimed} == {sagas[10].saga_id, sagas[20].saga_id}


async def test_claimed_sagas_are_not_claimed_again_while_the_new_lease_lasts(store: SagaStore) -> None:
    await started(store, lease_seconds=0)
    await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=at(1))

    assert await store.claim_stale("node-c", lease_seconds=30, limit=10, now=at(30)) == []
    assert len(await store.claim_stale("node-c", lease_seconds=30, limit=10, now=at(31))) == 1


async def test_claim_stale_with_kinds_takes_only_sagas_of_those_kinds(store: SagaStore) -> None:
    upload = await started(store, lease_seconds=0)
    delete = await store.create_saga("delete", "file-1", {}, owner=NODE_A, lease_seconds=0, now=T0)
    transfer = await store.create_saga("transfer", "file-2", {}, owner=NODE_A, lease_seconds=0, now=T0)

    claimed = await store.claim_stale(NODE_B, lease_seconds=30, limit=10, kinds=("delete", "transfer"), now=at(1))

    assert sorted(s.saga_id for s in claimed) == sorted([delete.saga_id, transfer.saga_id])
    assert await store.get_saga(upload.saga_id) == upload
    assert [s.saga_id for s in await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=at(1))] == [
        upload.saga_id
    ]


async def test_claim_stale_with_nothing_stale_returns_an_empty_list(store: SagaStore) -> None:
    await started(store)

    assert await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=T0) == []


async def test_after_a_takeover_the_previous_owner_is_fenced_out_and_the_new_owner_carries_on(
    store: SagaStore,
) -> None:
    saga = await started(store, lease_seconds=10)
    await store.claim_stale(NODE_B, lease_seconds=30, limit=10, now=at(20))
    record = make_record(upload_id=saga.subject_id)

    with pytest.raises(SagaOwnershipLost) as raised:
        await store.advance(saga.saga_id, owner=NODE_A, step="stored", data_update={}, lease_seconds=LEASE)
    with pytest.raises(SagaOwnershipLost):
        await store.set_state(saga.saga_id, owner=NODE_A, state=SagaState.COMPENSATING)
    with pytest.raises(SagaOwnershipLost):
        await store.bump_attempts(saga.saga_id, owner=NODE_A)
    with pytest.raises(SagaOwnershipLost):
        await store.register_file(
            saga.saga_id,
            owner=NODE_A,
            record=record,
            messages=make_messages(record.file_id),
            step="registered",
            data_update={},
            lease_seconds=LEASE,
        )
    assert await store.renew_lease(saga.saga_id, owner=NODE_A, lease_seconds=LEASE) is False

    assert raised.value.current_owner == NODE_B
    assert await store.get_file(record.file_id) is None
    assert await all_messages(store) == []
    advanced = await store.advance(saga.saga_id, owner=NODE_B, step="stored", data_update={}, lease_seconds=LEASE)
    assert (advanced.owner, advanced.step) == (NODE_B, "stored")


async def test_concurrent_claims_from_two_stores_hand_each_stale_saga_to_exactly_one_claimer(
    store: SagaStore, open_store: Callable[[], Awaitable[SagaStore]]
) -> None:
    sagas = [await started(store, f"u{i}") for i in range(60)]
    other = await open_store()
    claims: dict[str, list[str]] = {}

    async def claim_until_none_left(claimer: SagaStore, owner: str) -> None:
        while claimed := await claimer.claim_stale(owner, lease_seconds=LEASE, limit=3, now=at(2 * LEASE)):
            claims.setdefault(owner, []).extend(s.saga_id for s in claimed)

    await asyncio.gather(
        *(claim_until_none_left(s, f"{name}-{i}") for name, s in (("a", store), ("b", other)) for i in range(3))
    )

    claimed_ids = [saga_id for ids in claims.values() for saga_id in ids]
    assert sorted(claimed_ids) == sorted(s.saga_id for s in sagas)
    owners = {saga_id: owner for owner, ids in claims.items() for saga_id in ids}
    assert {s.saga_id: s.owner for s in await store.list_sagas()} == owners


# --- register_file and the files registry ------------------------------------------------------------------------


async def test_register_file_writes_the_row_queues_the_messages_and_advances_the_saga(store: SagaStore) -> None:
    saga = await started(store, data={"element_id": "se-01"})
    record = make_record(upload_id=saga.subject_id)

    advanced = await store.register_file(
        saga.saga_id,
        owner=NODE_A,
        record=record,
        messages=make_messages(record.file_id),
        step="registered",
        data_update={"file_id": record.file_id},
        lease_seconds=30,
        now=at(5),
    )

    assert advanced == dataclasses.replace(
        saga,
        step="registered",
        data={"element_id": "se-01", "file_id": record.file_id},
        lease_expires_at=at(35),
        updated_at=at(5),
    )
    assert await store.get_saga(saga.saga_id) == advanced
    assert await store.get_file(record.file_id) == record
    messages = await store.claim_due_messages(now=at(5), limit=10, lease_seconds=30)
    assert [(m.kind, m.destination, m.payload) for m in messages] == [
        (n.kind, n.destination, n.payload) for n in make_messages(record.file_id)
    ]
    assert [(m.attempts, m.created_at, m.delivered_at, m.last_error) for m in messages] == [(0, at(5), None, None)] * 2


async def test_file_record_reads_back_with_every_optional_field_empty(store: SagaStore) -> None:
    saga = await started(store)
    record = make_record(
        upload_id=None,
        content_encoding=None,
        created_by_id=None,
        retention_policy=None,
        description=None,
        metadata={},
        size_bytes=0,
        stored_size_bytes=0,
    )

    await registered(store, saga, record)

    assert await store.get_file(record.file_id) == record


async def test_register_file_twice_leaves_one_row_and_one_set_of_messages(store: SagaStore) -> None:
    saga = await started(store)
    first, record = await registered(store, saga, now=at(1))

    again, _ = await registered(store, saga, record, now=at(2))

    assert again == first
    assert await store.count_files() == 1
    assert len(await all_messages(store)) == 2


async def test_a_second_saga_registering_a_file_already_registered_for_its_upload_writes_nothing_new(
    store: SagaStore,
) -> None:
    first = await started(store, "u1")
    _, record = await registered(store, first)
    await store.set_state(first.saga_id, owner=NODE_A, state=SagaState.COMPLETED)
    second = await started(store, "u1", owner=NODE_B, now=at(10))

    advanced, _ = await registered(store, second, record, now=at(11))

    assert (advanced.step, advanced.data) == ("registered", {"file_id": record.file_id})
    assert await store.get_file(record.file_id) == record
    assert len(await all_messages(store)) == 2


async def test_register_file_with_an_id_registered_for_another_upload_raises_duplicate_file_and_writes_nothing(
    store: SagaStore,
) -> None:
    _, record = await registered(store, await started(store, "u1"))
    saga = await started(store, "u2")

    with pytest.raises(DuplicateFile) as raised:
        await registered(store, saga, dataclasses.replace(record, upload_id="u2", original_filename="other.pdf"))

    assert raised.value.file_id == record.file_id
    assert await store.get_saga(saga.saga_id) == saga
    assert await store.get_file(record.file_id) == record
    assert len(await all_messages(store)) == 2


async def test_register_file_that_fails_half_way_writes_nothing(store: SagaStore) -> None:
    saga = await started(store)
    record = make_record(upload_id=saga.subject_id)
    # The file row goes in first; the second message then breaks a NOT NULL column, so all must roll back.
    broken = NewOutboxMessage("webhook", None, {})  # type: ignore[arg-type]

    with pytest.raises((sqlite3.IntegrityError, asyncpg.NotNullViolationError)):
        await store.register_file(
            saga.saga_id,
            owner=NODE_A,
            record=record,
            messages=[*make_messages(record.file_id), broken],
            step="registered",
            data_update={"file_id": record.file_id},
            lease_seconds=LEASE,
        )

    assert await store.get_saga(saga.saga_id) == saga
    assert await store.get_file(record.file_id) is None
    assert await all_messages(store) == []
    assert (await registered(store, saga, record))[0].step == "registered", "the store should still be usable"


async def test_register_file_with_a_payload_that_is_not_json_raises_type_error_and_writes_nothing(
    store: SagaStore,
) -> None:
    saga = await started(store)
    record = make_record(upload_id=saga.subject_id)

    with pytest.raises(TypeError):
        await store.register_file(
            saga.saga_id,
            owner=NODE_A,
            record=record,
            messages=[NewOutboxMessage("webhook", "https://h.example", {"when": T0})],
            step="registered",
            data_update={},
            lease_seconds=LEASE,
        )

    assert await store.get_file(record.file_id) is None
    assert await store.get_saga(saga.saga_id) == saga


async def test_register_file_of_an_unknown_saga_raises_saga_not_found_and_writes_nothing(store: SagaStore) -> None:
    record = make_record()

    with pytest.raises(SagaNotFound):
        await store.register_file(
            "0" * 32,
            owner=NODE_A,
            record=record,
            messages=make_messages(record.file_id),
            step="registered",
            data_update={},
            lease_seconds=LEASE,
        )

    assert await store.count_files() == 0


async def test_get_file_of_an_unknown_id_returns_none(store: SagaStore) -> None:
    assert await store.get_file("nope") is None


async def test_file_for_upload_returns_the_file_registered_for_that_upload(store: SagaStore) -> None:
    _, record = await registered(store, await started(store, "u1"))
    await registered(store, await started(store, "u2"))

    assert await store.file_for_upload("u1") == record
    assert await store.file_for_upload("u3") is None


async def test_delete_file_removes_the_row_once(store: SagaStore) -> None:
    _, record = await registered(store, await started(store))

    assert await store.delete_file(record.file_id) is True
    assert await store.delete_file(record.file_id) is False

    assert await store.get_file(record.file_id) is None
    assert await store.count_files() == 0


async def test_update_file_location_points_the_file_at_the_new_element_and_key_only(store: SagaStore) -> None:
    _, record = await registered(store, await started(store))

    moved = await store.update_file_location(record.file_id, storage_element_id="se-02", storage_key="new/käy.pdf")

    expected = dataclasses.replace(record, storage_element_id="se-02", storage_key="new/käy.pdf")
    assert moved == expected
    assert await store.get_file(record.file_id) == expected


async def test_update_file_location_of_an_unknown_file_returns_none(store: SagaStore) -> None:
    assert await store.update_file_location("nope", storage_element_id="se-02", storage_key="k") is None
    assert await store.count_files() == 0


async def test_count_files_counts_registered_files(store: SagaStore) -> None:
    for _ in range(3):
        await registered(store, await started(store))

    assert await store.count_files() == 3


# --- the outbox -------------------------------------------------------------------------------------------------


async def test_claim_due_messages_hands_out_due_messages_and_moves_them_out_by_the_lease(store: SagaStore) -> None:
    await registered(store, await started(store), now=T0)

    claimed = await store.claim_due_messages(now=at(1), limit=10, lease_seconds=30)

    assert [m.next_attempt_at for m in claimed] == [at(31), at(31)]
    assert claimed[0].message_id < claimed[1].message_id
    assert await store.claim_due_messages(now=at(1), limit=10, lease_seconds=30) == []


async def test_claimed_messages_come_back_when_the_claim_lease_runs_out(store: SagaStore) -> None:
    await registered(store, await started(store), now=T0)
    claimed = await store.claim_due_messages(now=T0, limit=10, lease_seconds=30)

    assert await store.claim_due_messages(now=at(29.999999), limit=10, lease_seconds=30) == []
    again = await store.claim_due_messages(now=at(30), limit=10, lease_seconds=30)

    assert [m.message_id for m in again] == [m.message_id for m in claimed]
    assert [m.attempts for m in again] == [0, 0]


async def test_enqueued_messages_are_handed_out_like_registered_ones(store: SagaStore) -> None:
    failed = NewOutboxMessage("webhook", "https://h.example/failed", {"type": "upload.failed", "upload_id": "u1"})
    await store.enqueue([failed], now=T0)
    await store.enqueue([], now=T0)  # nothing to add is not an error

    (claimed,) = await store.claim_due_messages(now=at(1), limit=10, lease_seconds=30)

    assert (claimed.kind, claimed.destination, claimed.payload) == ("webhook", failed.destination, failed.payload)
    assert claimed.attempts == 0 and claimed.delivered_at is None


async def test_purge_delivered_removes_only_messages_delivered_before_the_cutoff(store: SagaStore) -> None:
    await store.enqueue([NewOutboxMessage("webhook", f"https://h.example/{n}", {"n": n}) for n in range(3)], now=T0)
    first, second, third = await store.claim_due_messages(now=at(1), limit=10, lease_seconds=30)
    await store.mark_delivered(first.message_id, now=at(10))
    await store.mark_delivered(second.message_id, now=at(20))

    purged = await store.purge_delivered(delivered_before=at(15))
    due = await store.claim_due_messages(now=at(100), limit=10, lease_seconds=30)

    assert purged == 1
    assert [m.message_id for m in due] == [third.message_id]  # undelivered messages always stay
    assert await store.purge_delivered(delivered_before=at(15)) == 0
    assert await store.purge_delivered(delivered_before=at(25)) == 1


async def test_a_write_cancelled_at_any_point_ends_cancelled_and_leaves_the_store_usable(store: SagaStore) -> None:
    # Shutdown cancels the sweeper mid-transaction; if the cancellation were turned into another error,
    # the task would live on and shutdown would hang (seen as a lifespan timeout in CI).
    outcomes = set()
    for spins in range(40):
        task = asyncio.create_task(store.purge_delivered(delivered_before=T0))
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            outcomes.add("cancelled")
        else:
            outcomes.add("finished")
    assert "cancelled" in outcomes
    assert await store.purge_delivered(delivered_before=T0) == 0


async def test_claim_due_messages_leaves_out_messages_not_yet_due(store: SagaStore) -> None:
    await registered(store, await started(store), now=T0)

    assert await store.claim_due_messages(now=at(-0.000001), limit=10, lease_seconds=30) == []


async def test_claim_due_messages_takes_at_most_limit_messages_the_longest_due_first(store: SagaStore) -> None:
    for _ in range(3):
        await registered(store, await started(store), now=T0)
    messages = await all_messages(store, now=T0)
    due_in = [50, 10, 40, 20, 60, 30]
    for message, seconds in zip(messages, due_in, strict=True):
        await store.reschedule(message.message_id, next_attempt_at=at(seconds), error="retry")

    claimed = await store.claim_due_messages(now=at(100), limit=3, lease_seconds=30)

    soonest = sorted(zip(due_in, messages, strict=True), key=lambda pair: pair[0])[:3]
    assert [m.message_id for m in claimed] == sorted(m.message_id for _, m in soonest)


async def test_a_delivered_message_is_never_handed_out_again_and_a_second_mark_returns_false(store: SagaStore) -> None:
    await registered(store, await started(store), now=T0)
    first, second = await store.claim_due_messages(now=T0, limit=10, lease_seconds=30)

    assert await store.mark_delivered(first.message_id, now=at(1)) is True
    assert await store.mark_delivered(first.message_id, now=at(2)) is False

    assert [m.message_id for m in await all_messages(store)] == [second.message_id]


async def test_mark_delivered_of_an_unknown_message_returns_false(store: SagaStore) -> None:
    assert await store.mark_delivered(123456789) is False


async def test_reschedule_counts_the_attempt_keeps_the_error_and_sets_the_next_attempt(store: SagaStore) -> None:
    await registered(store, await started(store), now=T0)
    message, _ = await store.claim_due_messages(now=T0, limit=10, lease_seconds=30)

    assert await store.reschedule(message.message_id, next_attempt_at=at(10), error="HTTP 503") is True
    assert await store.reschedule(message.message_id, next_attempt_at=at(20), error="timeout ⏱") is True

    assert await store.claim_due_messages(now=at(19), limit=10, lease_seconds=30) == []
    (again,) = await store.claim_due_messages(now=at(20), limit=10, lease_seconds=30)
    assert again == dataclasses.replace(message, attempts=2, last_error="timeout ⏱", next_attempt_at=at(50))


async def test_reschedule_of_a_delivered_or_unknown_message_returns_false_and_changes_nothing(
    store: SagaStore,
) -> None:
    await registered(store, await started(store), now=T0)
    message, _ = await store.claim_due_messages(now=T0, limit=10, lease_seconds=30)
    await store.mark_delivered(message.message_id, now=at(1))

    assert await store.reschedule(message.message_id, next_attempt_at=at(10), error="late") is False
    assert await store.reschedule(123456789, next_attempt_at=at(10), error="late") is False

    assert message.message_id not in [m.message_id for m in await all_messages(store)]


async def test_concurrent_message_claims_from_two_stores_hand_each_message_to_exactly_one_claimer(
    store: SagaStore, open_store: Callable[[], Awaitable[SagaStore]]
) -> None:
    for _ in range(30):
        await registered(store, await started(store), now=T0)
    other = await open_store()
    claims: dict[str, list[int]] = {}

    async def claim_until_none_left(claimer: SagaStore, name: str) -> None:
        while claimed := await claimer.claim_due_messages(now=at(1), limit=3, lease_seconds=LEASE):
            claims.setdefault(name, []).extend(m.message_id for m in claimed)

    await asyncio.gather(
        *(claim_until_none_left(s, f"{name}-{i}") for name, s in (("a", store), ("b", other)) for i in range(3))
    )

    claimed_ids = sorted(message_id for ids in claims.values() for message_id in ids)
    assert claimed_ids == sorted(m.message_id for m in await all_messages(store))
    assert len(claimed_ids) == len(set(claimed_ids)) == 60


# --- list_sagas ---------------------------------------------------------------------------------------------------


async def test_list_sagas_returns_the_sagas_in_the_given_states_oldest_first(store: SagaStore) -> None:
    compensating = await in_state(store, SagaState.COMPENSATING, now=at(3))
    await in_state(store, SagaState.COMPLETED, now=at(2))
    running = await started(store, now=at(1))
    failed = await in_state(store, SagaState.FAILED, now=at(4))

    assert await store.list_sagas([SagaState.RUNNING, SagaState.COMPENSATING]) == [running, compensating]
    assert await store.list_sagas([SagaState.FAILED]) == [failed]
    assert await store.list_sagas([]) == []
    assert len(await store.list_sagas()) == 4


# --- lifecycle ----------------------------------------------------------------------------------------------------


async def test_ping_of_an_open_store_is_true(store: SagaStore) -> None:
    assert await store.ping() is True


async def test_ping_after_close_is_false(store: SagaStore) -> None:
    await store.close()

    assert await store.ping() is False


async def test_close_twice_is_harmless(store: SagaStore) -> None:
    await store.close()
    await store.close()


async def test_a_call_on_a_closed_store_raises_store_error(store: SagaStore) -> None:
    await store.close()

    with pytest.raises(StoreError, match="not open"):
        await store.get_saga("0" * 32)


async def test_the_saga_store_shares_its_database_with_the_session_store(store: SagaStore, database_url: str) -> None:
    sessions = open_database(database_url).sessions
    await sessions.open()
    try:
        upload = Upload(id=new_upload_id(), length=10)
        await sessions.create(upload)
        saga = await started(store, upload.id)

        assert await sessions.get(upload.id) == upload
        assert await store.latest_saga("upload", upload.id) == saga
    finally:
        await sessions.close()


# --- PostgreSQL: schema check and the 0002 migration --------------------------------------------------------------


async def test_open_on_an_unmigrated_database_raises_database_not_migrated_naming_the_fix(
    empty_postgres_url: str,
) -> None:
    store = PostgresSagaStore(empty_postgres_url)

    head = migrations.HEAD_REVISION
    with pytest.raises(DatabaseNotMigrated, match=rf"\(at nothing, head is {head}\): run `tusingest migrate`"):
        await store.open()

    assert await store.ping() is False


async def test_open_on_a_database_still_at_0001_asks_for_migrate(empty_postgres_url: str) -> None:
    await migrations.upgrade_async(empty_postgres_url, "0001")

    with pytest.raises(DatabaseNotMigrated, match=rf"\(at 0001, head is {migrations.HEAD_REVISION}\)"):
        await PostgresSagaStore(empty_postgres_url).open()


async def test_open_on_a_database_migrated_by_a_newer_version_says_so(postgres_url: str) -> None:
    connection = await asyncpg.connect(postgres_url)
    await connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    await connection.close()

    with pytest.raises(StoreError, match="newer version") as raised:
        await PostgresSagaStore(postgres_url).open()

    assert not isinstance(raised.value, DatabaseNotMigrated)


async def test_open_on_an_unreachable_server_raises_store_error_without_the_password() -> None:
    store = PostgresSagaStore("postgresql://tusingest:s3cr3t@127.0.0.1:1/uploads", connect_timeout=5)

    with pytest.raises(StoreError) as raised:
        await store.open()

    assert "127.0.0.1:1" in str(raised.value)
    assert "s3cr3t" not in str(raised.value)


async def test_downgrade_to_0001_drops_the_saga_tables_and_upgrade_brings_them_back(postgres_url: str) -> None:
    def downgrade() -> None:
        command.downgrade(migrations.alembic_config(postgres_url), "0001")

    await asyncio.to_thread(downgrade)
    connection = await asyncpg.connect(postgres_url)
    try:
        tables = "SELECT to_regclass('sagas') IS NULL, to_regclass('files') IS NULL, to_regclass('outbox') IS NULL"
        assert tuple(await connection.fetchrow(tables) or ()) == (True, True, True)

        await migrations.upgrade_async(postgres_url)

        assert tuple(await connection.fetchrow(tables) or ()) == (False, False, False)
    finally:
        await connection.close()
    store = PostgresSagaStore(postgres_url)
    await store.open()
    await store.close()


async def test_claim_stale_skips_a_saga_another_node_is_claiming_rather_than_waiting_for_it(postgres_url: str) -> None:
    store = PostgresSagaStore(postgres_url)
    await store.open()
    locked, free = await started(store, lease_seconds=0), await started(store, lease_seconds=0)
    node = await asyncpg.connect(postgres_url)
    try:
        async with node.transaction():
            await node.execute("SELECT 1 FROM sagas WHERE saga_id = $1 FOR UPDATE", locked.saga_id)
            # Waiting on the lock would wait for this very test: the timeout turns that into a failure.
            async with asyncio.timeout(5):
                claimed = await store.claim_stale(NODE_B, lease_seconds=LEASE, limit=10, now=at(1))
    finally:
        await node.close()
        await store.close()

    assert [s.saga_id for s in claimed] == [free.saga_id]


async def test_claim_due_messages_skips_a_message_another_node_is_claiming_rather_than_waiting_for_it(
    postgres_url: str,
) -> None:
    store = PostgresSagaStore(postgres_url)
    await store.open()
    await registered(store, await started(store), now=T0)
    first, second = await store.claim_due_messages(now=T0, limit=10, lease_seconds=0)
    node = await asyncpg.connect(postgres_url)
    try:
        async with node.transaction():
            await node.execute("SELECT 1 FROM outbox WHERE message_id = $1 FOR UPDATE", first.message_id)
            async with asyncio.timeout(5):
                claimed = await store.claim_due_messages(now=at(1), limit=10, lease_seconds=LEASE)
    finally:
        await node.close()
        await store.close()

    assert [m.message_id for m in claimed] == [second.message_id]
