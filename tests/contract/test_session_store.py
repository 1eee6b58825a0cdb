"""The SessionStore contract: one behavioural suite that SQLite and PostgreSQL must both pass.

The PostgreSQL-only tests at the end cover the schema check in ``open`` and ``tusingest migrate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from tusingest.sessions import migrations
from tusingest.sessions.audit import Action, AuditEvent, Outcome
from tusingest.sessions.model import IdempotencyKey, Upload, UploadKind, UploadState, new_upload_id
from tusingest.sessions.pgprogress import PostgresProgressBus
from tusingest.sessions.postgres import PostgresSessionStore
from tusingest.sessions.progress import RESYNC, ProgressBus, ProgressEvent
from tusingest.sessions.sqlite import SQLiteSessionStore
from tusingest.sessions.store import DatabaseNotMigrated, SessionStore, StoreError

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
EAST = timezone(timedelta(hours=2))


def make_upload(**changes: object) -> Upload:
    upload = Upload(id=new_upload_id(), length=1000, created_at=T0, updated_at=T0, expires_at=T0 + timedelta(hours=1))
    return upload.evolve(**changes)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "sqlite":
        session_store: SessionStore = SQLiteSessionStore(f"sqlite:///{tmp_path / 'sessions.db'}")
    else:
        # Looked up here, not declared, so the SQLite half runs without a PostgreSQL server.
        session_store = PostgresSessionStore(request.getfixturevalue("postgres_url"))
    await session_store.open()
    yield session_store
    await session_store.close()


async def stored(store: SessionStore, **changes: object) -> Upload:
    upload = make_upload(**changes)
    await store.create(upload)
    return upload


# --- the audit log: its row is written with the change, and never without it ----------------------


def audit_event(action: str, upload_id: str, **changes: object) -> AuditEvent:
    event = AuditEvent(
        action=action, subject="user-7", subject_name="Ada", client_address="10.0.0.9", upload_id=upload_id
    )
    return dataclasses.replace(event, **changes)  # type: ignore[arg-type]


async def audit_rows(store: SessionStore) -> list[AuditEvent]:
    return await store.list_audit(T0 - timedelta(days=1))


async def test_create_with_an_audit_event_writes_its_row_with_every_field(store: SessionStore) -> None:
    upload = make_upload()
    event = audit_event(Action.UPLOAD_CREATED, upload.id, element_ids=("se-01", "se-02"), reason="why", at=T0)
    event = dataclasses.replace(event, request_id="req-1")

    await store.create(upload, audit=event)

    assert await audit_rows(store) == [event]
    assert await store.get(upload.id) is not None


async def test_create_that_fails_writes_no_audit_row(store: SessionStore) -> None:
    upload = await stored(store)

    with pytest.raises(StoreError):
        await store.create(upload, audit=audit_event(Action.UPLOAD_CREATED, upload.id))

    assert await audit_rows(store) == []


async def test_set_state_writes_the_audit_row_only_when_the_state_changes(store: SessionStore) -> None:
    upload = await stored(store)
    terminated = audit_event(Action.UPLOAD_TERMINATED, upload.id)

    assert (
        await store.set_state(upload.id, UploadState.TERMINATED, only_from=UploadState.COMPLETE, audit=terminated)
        is None
    )
    assert await audit_rows(store) == []
    assert await store.set_state(upload.id, UploadState.TERMINATED, only_from=UploadState.ACTIVE, audit=terminated)
    assert await audit_rows(store) == [terminated]


async def test_record_audit_writes_a_refusal_and_list_audit_filters_by_time_subject_and_upload(
    store: SessionStore,
) -> None:
    first = audit_event(Action.REFUSED, "a" * 32, outcome=Outcome.REFUSED, reason="not_owner", at=T0)
    second = audit_event(
        Action.REFUSED, "b" * 32, outcome=Outcome.REFUSED, subject="anonymous", at=T0 + timedelta(hours=1)
    )
    for event in (second, first):
        await store.record_audit(event)

    assert await audit_rows(store) == [first, second]
    assert await store.list_audit(T0 + timedelta(minutes=1)) == [second]
    assert await store.list_audit(T0 - timedelta(days=1), until=T0 + timedelta(minutes=1)) == [first]
    assert await store.list_audit(T0 - timedelta(days=1), subject="anonymous") == [second]
    assert await store.list_audit(T0 - timedelta(days=1), upload_id="a" * 32) == [first]
    assert await store.list_audit(T0 - timedelta(days=1), limit=1) == [first]


# --- create / get ---------------------------------------------------------------------------------


async def test_created_upload_reads_back_with_every_field(store: SessionStore) -> None:
    upload = make_upload(
        length=5 * 2**40,  # beyond 32 bits: lengths and offsets are 64-bit
        offset=3 * 2**32 + 7,
        metadata="filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential",
        state=UploadState.COMPLETE,
        kind=UploadKind.FINAL,
        parts=("b" * 32, "a" * 32, "c" * 32),
        created_at=T0,
        updated_at=T0 + timedelta(microseconds=1),
        expires_at=T0 + timedelta(days=1, microseconds=999999),
        owner_id="user-7",
        owner_name="Ada Lovelace",
    )
    await store.create(upload)

    assert await store.get(upload.id) == upload


async def test_an_upload_keeps_its_owner_through_commits_and_none_when_it_has_none(store: SessionStore) -> None:
    owned = await stored(store, length=10, owner_id="user-7", owner_name="Ada")
    unowned = await stored(store, length=10)

    committed = await store.commit_offset(owned.id, 0, 10, T0, None)

    assert committed is not None and (committed.owner_id, committed.owner_name) == ("user-7", "Ada")
    assert (await store.get_many([owned.id]))[owned.id].owner_id == "user-7"
    got = await store.get(unowned.id)
    assert got is not None and (got.owner_id, got.owner_name) == (None, None)


async def test_deferred_length_no_parts_and_no_expiry_read_back_as_none_and_empty(store: SessionStore) -> None:
    upload = await stored(store, length=None, metadata="", parts=(), expires_at=None)

    got = await store.get(upload.id)

    assert got is not None
    assert (got.length, got.metadata, got.parts, got.expires_at) == (None, "", (), None)


async def test_timestamps_read_back_aware_with_microseconds(store: SessionStore) -> None:
    upload = await stored(store)

    got = await store.get(upload.id)

    assert got is not None
    for value in (got.created_at, got.updated_at, got.expires_at):
        assert value is not None
        assert value.utcoffset() == timedelta(0)
    assert got.created_at.microsecond == 123456


async def test_timestamps_in_another_zone_read_back_as_the_same_instant(store: SessionStore) -> None:
    upload = await stored(store, created_at=T0.astimezone(EAST), expires_at=(T0 + timedelta(hours=1)).astimezone(EAST))

    got = await store.get(upload.id)

    assert got is not None
    assert (got.created_at, got.expires_at) == (T0, T0 + timedelta(hours=1))


async def test_creating_an_existing_id_raises_store_error_and_keeps_the_first(store: SessionStore) -> None:
    first = await stored(store, metadata="first")

    with pytest.raises(StoreError):
        await store.create(make_upload(id=first.id, metadata="second"))

    assert await store.get(first.id) == first


async def test_get_of_an_unknown_id_returns_none(store: SessionStore) -> None:
    assert await store.get(new_upload_id()) is None


async def test_get_many_returns_the_known_ids_keyed_by_id(store: SessionStore) -> None:
    a, b, _ = await stored(store), await stored(store), await stored(store)

    got = await store.get_many([b.id, new_upload_id(), a.id])

    assert got == {a.id: a, b.id: b}


async def test_get_many_of_no_ids_returns_an_empty_dict(store: SessionStore) -> None:
    await stored(store)

    assert await store.get_many([]) == {}


# --- commit_offset: the commit point -------------------------------------------------------------


async def test_commit_offset_at_the_expected_offset_moves_it_and_returns_the_updated_upload(
    store: SessionStore,
) -> None:
    upload = await stored(store, offset=100)
    later = T0 + timedelta(minutes=5, microseconds=42)

    committed = await store.commit_offset(upload.id, 100, 600, later, later + timedelta(hours=1))

    expected = upload.evolve(offset=600, updated_at=later, expires_at=later + timedelta(hours=1))
    assert committed == expected
    assert await store.get(upload.id) == expected


async def test_commit_offset_can_clear_the_expiry(store: SessionStore) -> None:
    upload = await stored(store)

    committed = await store.commit_offset(upload.id, 0, 1000, T0, None)

    assert committed is not None
    assert committed.expires_at is None


async def test_commit_offset_with_a_stale_expected_offset_returns_none_and_changes_nothing(
    store: SessionStore,
) -> None:
    upload = await stored(store, offset=100)

    result = await store.commit_offset(upload.id, 50, 600, T0 + timedelta(minutes=5), None)

    assert result is None
    assert await store.get(upload.id) == upload


@pytest.mark.parametrize("state", [UploadState.COMPLETE, UploadState.TERMINATED, UploadState.EXPIRED])
async def test_commit_offset_on_an_upload_that_is_not_active_returns_none_and_changes_nothing(
    store: SessionStore, state: UploadState
) -> None:
    upload = await stored(store, offset=100, state=state)

    result = await store.commit_offset(upload.id, 100, 600, T0 + timedelta(minutes=5), None)

    assert result is None
    assert await store.get(upload.id) == upload


async def test_commit_offset_of_an_unknown_upload_returns_none(store: SessionStore) -> None:
    assert await store.commit_offset(new_upload_id(), 0, 10, T0, None) is None


async def test_concurrent_commits_from_the_same_offset_let_exactly_one_writer_win(store: SessionStore) -> None:
    upload = await stored(store)

    results = await asyncio.gather(*(store.commit_offset(upload.id, 0, 10 * (i + 1), T0, None) for i in range(8)))

    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await store.get(upload.id) == winners[0]


# --- idempotency keys: one claim per (subject, key) until it expires ----------------------------------


def key_claim(upload_id: str, *, subject: str = "ada", key: str = "k-1", at: datetime = T0) -> IdempotencyKey:
    return IdempotencyKey(subject, key, "length=10", upload_id, at, at + timedelta(hours=2))


async def test_the_first_claim_of_a_key_wins_and_reads_back_with_every_field(store: SessionStore) -> None:
    first = key_claim("upload-a", at=datetime(2025, 3, 4, 7, 6, 7, 123456, tzinfo=EAST))

    holder = await store.claim_idempotency_key(first)

    assert holder == first
    assert await store.claim_idempotency_key(key_claim("upload-b")) == first


async def test_concurrent_claims_of_one_key_agree_on_one_holder(store: SessionStore) -> None:
    claims = [key_claim(f"upload-{i}") for i in range(8)]

    holders = await asyncio.gather(*(store.claim_idempotency_key(claim) for claim in claims))

    assert len({holder.upload_id for holder in holders}) == 1
    assert holders[0] in claims


async def test_keys_are_per_subject(store: SessionStore) -> None:
    ada = await store.claim_idempotency_key(key_claim("upload-a", subject="ada"))
    bob = await store.claim_idempotency_key(key_claim("upload-b", subject="bob"))

    assert (ada.upload_id, bob.upload_id) == ("upload-a", "upload-b")


async def test_an_expired_claim_is_taken_over_by_the_next(store: SessionStore) -> None:
    await store.claim_idempotency_key(key_claim("upload-a"))
    later = key_claim("upload-b", at=T0 + timedelta(hours=3))

    assert await store.claim_idempotency_key(later) == later


async def test_release_frees_the_key_only_for_the_upload_it_names(store: SessionStore) -> None:
    await store.claim_idempotency_key(key_claim("upload-a"))

    await store.release_idempotency_key("ada", "k-1", "upload-other")
    assert (await store.claim_idempotency_key(key_claim("upload-b"))).upload_id == "upload-a"
    await store.release_idempotency_key("ada", "k-1", "upload-a")
    assert (await store.claim_idempotency_key(key_claim("upload-b"))).upload_id == "upload-b"


async def test_forget_expired_deletes_only_the_expired_claims(store: SessionStore) -> None:
    await store.claim_idempotency_key(key_claim("upload-a", key="old"))
    await store.claim_idempotency_key(key_claim("upload-b", key="new", at=T0 + timedelta(hours=1)))

    assert await store.forget_expired_idempotency_keys(T0 + timedelta(hours=2)) == 1
    assert (await store.claim_idempotency_key(key_claim("upload-c", key="new"))).upload_id == "upload-b"
    assert (await store.claim_idempotency_key(key_claim("upload-c", key="old"))).upload_id == "upload-c"


# --- completion owed: recorded by the commit that reaches the length -----------------------------------


@pytest.mark.parametrize("kind", [UploadKind.SINGLE, UploadKind.FINAL])
async def test_commit_reaching_the_length_completes_and_records_the_completion_as_owed_in_one_write(
    store: SessionStore, kind: UploadKind
) -> None:
    upload = await stored(store, offset=400, kind=kind)

    committed = await store.commit_offset(upload.id, 400, 1000, T0, None)

    assert committed is not None
    assert (committed.state, committed.completion_pending) == (UploadState.COMPLETE, True)
    assert await store.get(upload.id) == committed


async def test_commit_short_of_the_length_owes_nothing_and_stays_active(store: SessionStore) -> None:
    upload = await stored(store)

    committed = await store.commit_offset(upload.id, 0, 999, T0, None)

    assert committed is not None
    assert (committed.state, committed.completion_pending) == (UploadState.ACTIVE, False)


async def test_a_partial_upload_reaching_its_length_is_complete_but_owes_no_completion(store: SessionStore) -> None:
    upload = await stored(store, kind=UploadKind.PARTIAL)

    committed = await store.commit_offset(upload.id, 0, 1000, T0, None)

    assert committed is not None
    assert (committed.state, committed.completion_pending) == (UploadState.COMPLETE, False)


async def test_a_deferred_upload_commit_owes_nothing_until_its_length_is_set_equal_to_the_offset(
    store: SessionStore,
) -> None:
    upload = await stored(store, length=None)
    committed = await store.commit_offset(upload.id, 0, 300, T0, None)
    assert committed is not None
    assert (committed.state, committed.completion_pending) == (UploadState.ACTIVE, False)

    declared = await store.set_length(upload.id, 300)

    assert declared is not None
    assert (declared.state, declared.completion_pending) == (UploadState.COMPLETE, True)


async def test_an_upload_created_with_all_its_bytes_is_stored_complete_and_owed(store: SessionStore) -> None:
    upload = make_upload(length=10, offset=10)

    await store.create(upload)

    got = await store.get(upload.id)
    assert got is not None
    assert (got.state, got.completion_pending) == (UploadState.COMPLETE, True)


async def test_completion_taken_over_clears_the_debt_and_keeps_the_upload_complete(store: SessionStore) -> None:
    upload = await stored(store)
    await store.commit_offset(upload.id, 0, 1000, T0, None)

    await store.completion_taken_over(upload.id)

    got = await store.get(upload.id)
    assert got is not None
    assert (got.state, got.completion_pending, got.offset) == (UploadState.COMPLETE, False, 1000)


async def test_list_completion_pending_returns_owed_uploads_touched_by_then_oldest_first(store: SessionStore) -> None:
    old, older, recent, paid, active = [await stored(store) for _ in range(5)]
    for upload, at in ((old, T0 + timedelta(seconds=2)), (older, T0 + timedelta(seconds=1)), (paid, T0)):
        await store.commit_offset(upload.id, 0, 1000, at, None)
    await store.commit_offset(recent.id, 0, 1000, T0 + timedelta(minutes=1), None)
    await store.commit_offset(active.id, 0, 10, T0, None)
    await store.completion_taken_over(paid.id)

    pending = await store.list_completion_pending(before=T0 + timedelta(seconds=30))

    assert [u.id for u in pending] == [older.id, old.id]
    assert [u.id for u in await store.list_completion_pending(before=T0 + timedelta(seconds=30), limit=1)] == [older.id]


async def test_list_expired_partials_returns_complete_partials_due_by_now_and_nothing_else(
    store: SessionStore,
) -> None:
    due = await stored(store, kind=UploadKind.PARTIAL, state=UploadState.COMPLETE, offset=1000)
    await stored(store, kind=UploadKind.PARTIAL, state=UploadState.COMPLETE, expires_at=T0 + timedelta(days=2))
    await stored(store, kind=UploadKind.PARTIAL)  # still receiving: the ordinary expiry's business
    await stored(store, state=UploadState.COMPLETE)  # a single upload
    await stored(store, kind=UploadKind.PARTIAL, state=UploadState.EXPIRED)

    expired = await store.list_expired_partials(T0 + timedelta(days=1))

    assert [u.id for u in expired] == [due.id]


# --- set_length ------------------------------------------------------------------------------------


async def test_set_length_fixes_a_deferred_length(store: SessionStore) -> None:
    upload = await stored(store, length=None, offset=100)

    result = await store.set_length(upload.id, 5000)

    assert result == upload.evolve(length=5000)
    assert await store.get(upload.id) == upload.evolve(length=5000)


async def test_set_length_equal_to_the_offset_is_accepted(store: SessionStore) -> None:
    upload = await stored(store, length=None, offset=100)

    result = await store.set_length(upload.id, 100)

    assert result is not None
    assert result.is_complete


async def test_set_length_a_second_time_returns_none_and_keeps_the_first(store: SessionStore) -> None:
    upload = await stored(store, length=None)
    await store.set_length(upload.id, 5000)

    result = await store.set_length(upload.id, 6000)

    assert result is None
    assert await store.get(upload.id) == upload.evolve(length=5000)


async def test_set_length_when_the_length_was_never_deferred_returns_none(store: SessionStore) -> None:
    upload = await stored(store, length=1000)

    assert await store.set_length(upload.id, 2000) is None
    assert await store.get(upload.id) == upload


async def test_set_length_below_the_offset_returns_none_and_keeps_it_deferred(store: SessionStore) -> None:
    upload = await stored(store, length=None, offset=100)

    result = await store.set_length(upload.id, 99)

    assert result is None
    assert await store.get(upload.id) == upload


async def test_set_length_of_an_unknown_upload_returns_none(store: SessionStore) -> None:
    assert await store.set_length(new_upload_id(), 10) is None


# --- set_state -------------------------------------------------------------------------------------


async def test_set_state_without_only_from_moves_from_any_state(store: SessionStore) -> None:
    upload = await stored(store, state=UploadState.COMPLETE)

    result = await store.set_state(upload.id, UploadState.TERMINATED)

    assert result == upload.evolve(state=UploadState.TERMINATED)
    assert await store.get(upload.id) == upload.evolve(state=UploadState.TERMINATED)


async def test_set_state_only_from_the_current_state_moves_it(store: SessionStore) -> None:
    upload = await stored(store)

    result = await store.set_state(upload.id, UploadState.EXPIRED, only_from=UploadState.ACTIVE)

    assert result == upload.evolve(state=UploadState.EXPIRED)


async def test_set_state_only_from_another_state_returns_none_and_changes_nothing(store: SessionStore) -> None:
    upload = await stored(store, state=UploadState.TERMINATED)

    result = await store.set_state(upload.id, UploadState.EXPIRED, only_from=UploadState.ACTIVE)

    assert result is None
    assert await store.get(upload.id) == upload


async def test_set_state_of_an_unknown_upload_returns_none(store: SessionStore) -> None:
    assert await store.set_state(new_upload_id(), UploadState.TERMINATED) is None


# --- list_expired ----------------------------------------------------------------------------------


async def test_list_expired_returns_active_uploads_due_by_now_soonest_first(store: SessionStore) -> None:
    now = T0 + timedelta(hours=10)
    at_now = await stored(store, expires_at=now)
    oldest = await stored(store, expires_at=now - timedelta(hours=3))
    middle = await stored(store, expires_at=now - timedelta(microseconds=1))
    await stored(store, expires_at=now + timedelta(microseconds=1))

    assert await store.list_expired(now) == [oldest, middle, at_now]


async def test_list_expired_returns_at_most_limit_uploads_the_soonest_due(store: SessionStore) -> None:
    now = T0 + timedelta(hours=10)
    due = [await stored(store, expires_at=now - timedelta(minutes=m)) for m in (5, 1, 4, 2, 3)]

    result = await store.list_expired(now, limit=2)

    assert result == sorted(due, key=lambda u: u.expires_at or now)[:2]


async def test_list_expired_leaves_out_uploads_that_are_not_active_or_never_expire(store: SessionStore) -> None:
    now = T0 + timedelta(hours=10)
    past = now - timedelta(hours=1)
    for state in (UploadState.COMPLETE, UploadState.TERMINATED, UploadState.EXPIRED):
        await stored(store, state=state, expires_at=past)
    await stored(store, expires_at=None)

    assert await store.list_expired(now) == []


async def test_list_expired_compares_instants_not_clock_readings_in_different_zones(store: SessionStore) -> None:
    # 06:30 UTC written as 08:30+02:00: past at 07:00 UTC although "08:30" > "07:00" on the clock face.
    due = await stored(store, expires_at=datetime(2025, 3, 4, 8, 30, tzinfo=EAST))
    await stored(store, expires_at=datetime(2025, 3, 4, 7, 30, tzinfo=UTC))

    result = await store.list_expired(datetime(2025, 3, 4, 7, 0, tzinfo=UTC))

    assert [u.id for u in result] == [due.id]


# --- list_final_uploads_with_part ------------------------------------------------------------------


async def test_list_final_uploads_with_part_returns_every_final_upload_that_refers_to_it(store: SessionStore) -> None:
    partial, other = await stored(store, kind=UploadKind.PARTIAL), await stored(store, kind=UploadKind.PARTIAL)
    first = await stored(store, kind=UploadKind.FINAL, parts=(partial.id, other.id))
    second = await stored(store, kind=UploadKind.FINAL, parts=(other.id, partial.id))
    await stored(store, kind=UploadKind.FINAL, parts=(other.id,))

    result = await store.list_final_uploads_with_part(partial.id)

    assert sorted(result, key=lambda u: u.id) == sorted([first, second], key=lambda u: u.id)


async def test_list_final_uploads_with_part_of_an_unreferenced_id_is_empty(store: SessionStore) -> None:
    await stored(store, kind=UploadKind.FINAL, parts=(new_upload_id(),))

    assert await store.list_final_uploads_with_part(new_upload_id()) == []


async def test_list_final_uploads_with_part_matches_whole_ids_only(store: SessionStore) -> None:
    partial_id = new_upload_id()
    await stored(store, kind=UploadKind.FINAL, parts=(partial_id + "x", partial_id[:-1]))

    assert await store.list_final_uploads_with_part(partial_id) == []


# --- the progress bus: told of each committed offset and each ending state --------------------------


@contextlib.asynccontextmanager
async def progress_bus(store: SessionStore) -> AsyncIterator[ProgressBus]:
    """The bus app.py would hand this store: in-process on SQLite, LISTEN/NOTIFY on PostgreSQL."""
    bus = PostgresProgressBus(store.database_url) if isinstance(store, PostgresSessionStore) else ProgressBus()
    await bus.open()
    store.progress = bus
    try:
        yield bus
    finally:
        await bus.close()


async def next_event(queue: asyncio.Queue[ProgressEvent | None]) -> ProgressEvent | None:
    async with asyncio.timeout(5):
        return await queue.get()


async def test_each_committed_offset_reaches_the_progress_bus_in_order_and_a_refused_commit_none(
    store: SessionStore,
) -> None:
    upload = await stored(store)
    async with progress_bus(store) as bus:
        with bus.subscribe(upload.id) as queue:
            for offset in (100, 200, 1000):
                await store.commit_offset(upload.id, offset - 100 if offset < 1000 else 200, offset, T0, None)
            assert await store.commit_offset(upload.id, 0, 50, T0, None) is None  # stale: changes nothing
            await store.set_state(upload.id, UploadState.TERMINATED)
            events = [await next_event(queue) for _ in range(4)]
    assert events == [
        ProgressEvent(upload.id, offset=100, length=1000),
        ProgressEvent(upload.id, offset=200, length=1000),
        ProgressEvent(upload.id, offset=1000, length=1000),
        ProgressEvent(upload.id, state="terminated"),
    ]
    assert bus.subscriptions == 0


async def test_the_progress_bus_delivers_only_to_the_uploads_own_subscribers(store: SessionStore) -> None:
    watched, other = await stored(store), await stored(store)
    async with progress_bus(store) as bus:
        with bus.subscribe(watched.id) as queue:
            await store.commit_offset(other.id, 0, 10, T0, None)
            await store.commit_offset(watched.id, 0, 20, T0, None)
            first = await next_event(queue)
            assert queue.empty()
    assert first == ProgressEvent(watched.id, offset=20, length=1000)


async def test_the_postgres_progress_bus_reconnects_after_losing_its_connection_and_asks_for_a_resync(
    postgres_url: str,
) -> None:
    store = PostgresSessionStore(postgres_url)
    await store.open()
    try:
        upload = await stored(store)
        async with progress_bus(store) as bus:
            with bus.subscribe(upload.id) as queue:
                killer = await asyncpg.connect(postgres_url)
                try:
                    killed = await killer.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                    )
                finally:
                    await killer.close()
                resync = await next_event(queue)  # reconnected: what was sent meanwhile may be lost
                await store.commit_offset(upload.id, 0, 10, T0, None)
                after = await next_event(queue)
    finally:
        await store.close()
    assert killed == 1
    assert resync is RESYNC
    assert after == ProgressEvent(upload.id, offset=10, length=1000)


# --- ping / close ----------------------------------------------------------------------------------


async def test_ping_of_an_open_store_is_true(store: SessionStore) -> None:
    assert await store.ping() is True


async def test_ping_after_close_is_false(store: SessionStore) -> None:
    await store.close()

    assert await store.ping() is False


async def test_close_twice_is_harmless(store: SessionStore) -> None:
    await store.close()
    await store.close()


# --- PostgreSQL: schema check and migrations -------------------------------------------------------


async def test_open_on_an_unmigrated_database_raises_database_not_migrated_naming_the_fix(
    empty_postgres_url: str,
) -> None:
    store = PostgresSessionStore(empty_postgres_url)

    with pytest.raises(DatabaseNotMigrated) as raised:
        await store.open()

    name = empty_postgres_url.rsplit("/", 1)[1]
    head = migrations.head_revision()
    assert str(raised.value) == f"database {name} is not migrated (at nothing, head is {head}): run `tusingest migrate`"
    assert await store.ping() is False


async def test_open_on_a_database_migrated_by_a_newer_version_says_so_rather_than_asking_to_migrate(
    postgres_url: str,
) -> None:
    connection = await asyncpg.connect(postgres_url)
    await connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    await connection.close()

    with pytest.raises(StoreError, match="newer version") as raised:
        await PostgresSessionStore(postgres_url).open()

    assert not isinstance(raised.value, DatabaseNotMigrated)


async def test_open_on_an_unreachable_server_raises_store_error_naming_host_and_database_but_not_password() -> None:
    store = PostgresSessionStore("postgresql://tusingest:s3cr3t@127.0.0.1:1/uploads", connect_timeout=5)

    with pytest.raises(StoreError) as raised:
        await store.open()

    message = str(raised.value)
    assert "127.0.0.1:1" in message
    assert "uploads" in message
    assert "s3cr3t" not in message


async def test_open_on_a_missing_database_raises_store_error_naming_it(postgres_admin_url: str) -> None:
    url = postgres_admin_url.rsplit("/", 1)[0] + "/tusingest_does_not_exist"

    with pytest.raises(StoreError, match="tusingest_does_not_exist"):
        await PostgresSessionStore(url).open()


async def test_postgres_scheme_alias_is_accepted(postgres_url: str) -> None:
    store = PostgresSessionStore(postgres_url.replace("postgresql://", "postgres://", 1))

    await store.open()
    try:
        assert await store.ping() is True
    finally:
        await store.close()


async def test_upgrade_brings_an_empty_database_to_head_and_running_it_again_changes_nothing(
    empty_postgres_url: str,
) -> None:
    assert await migrations.current_revision(empty_postgres_url) is None

    await migrations.upgrade_async(empty_postgres_url)
    await migrations.upgrade_async(empty_postgres_url)

    assert await migrations.current_revision(empty_postgres_url) == migrations.head_revision()
    store = PostgresSessionStore(empty_postgres_url)
    await store.open()
    await store.close()


async def test_concurrent_upgrades_in_one_process_both_succeed(empty_postgres_url: str) -> None:
    await asyncio.gather(migrations.upgrade_async(empty_postgres_url), migrations.upgrade_async(empty_postgres_url))

    assert await migrations.current_revision(empty_postgres_url) == migrations.head_revision()


async def test_migrate_started_by_several_nodes_at_once_succeeds_on_every_node(empty_postgres_url: str) -> None:
    code = "import sys; from tusingest.sessions.migrations import upgrade; upgrade(sys.argv[1])"
    nodes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, empty_postgres_url, cwd=migrations.REPO_ROOT, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]

    errors = [(await node.communicate())[1].decode() for node in nodes]

    assert [node.returncode for node in nodes] == [0, 0, 0], errors
    assert await migrations.current_revision(empty_postgres_url) == migrations.head_revision()


# --- SQLite only: files written by an older tusingest are upgraded in place --------------------------

SQLITE_VERSION_1 = """
CREATE TABLE uploads (
    id TEXT PRIMARY KEY, upload_length INTEGER, upload_offset INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'single',
    parts TEXT NOT NULL DEFAULT '[]', created_at TEXT NOT NULL, updated_at TEXT NOT NULL, expires_at TEXT
);
INSERT INTO uploads VALUES ('a', 10, 10, '', 'complete', 'single', '[]', '2025-01-01T00:00:00+00:00',
                            '2025-01-01T00:00:00+00:00', NULL);
PRAGMA user_version = 1;
"""


async def test_sqlite_file_of_schema_version_1_is_upgraded_and_keeps_its_uploads(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.executescript(SQLITE_VERSION_1)
    store = SQLiteSessionStore(f"sqlite:///{path}")

    await store.open()
    try:
        kept = await store.get("a")
        upload = await stored(store)
        committed = await store.commit_offset(upload.id, 0, 1000, T0, None)
    finally:
        await store.close()

    assert kept is not None and (kept.offset, kept.completion_pending) == (10, False)
    assert committed is not None and committed.completion_pending
    # The version lives in alembic_version now (the same scripts build SQLite and PostgreSQL), not in
    # PRAGMA user_version, which only the stores' old hand-written DDL kept.
    with contextlib.closing(sqlite3.connect(path)) as upgraded:
        assert migrations.read_sqlite_revision(upgraded) == migrations.head_revision()


async def test_sqlite_file_of_a_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    # A newer tusingest records its revision in alembic_version (formerly: a higher PRAGMA user_version).
    with contextlib.closing(sqlite3.connect(path)) as newer, newer:
        newer.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        newer.execute("INSERT INTO alembic_version VALUES ('9999')")
    store = SQLiteSessionStore(f"sqlite:///{path}")

    with pytest.raises(StoreError, match="schema revision 9999"):
        await store.open()
