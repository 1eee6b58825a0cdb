"""SagaStore on SQLite: the saga log, files registry and outbox of the embedded single-process setup.

Its tables live in the session store's file, built by the same alembic scripts; app.py hands both stores
one SQLiteDatabase, so one connection serves both.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aiosqlite

from tusingest.saga.records import (
    FileRecord,
    NewOutboxMessage,
    OutboxKind,
    OutboxMessage,
    Saga,
    SagaKind,
    SagaState,
    new_saga_id,
)
from tusingest.saga.store import DuplicateFile, DuplicateSaga, SagaNotFound, SagaOwnershipLost
from tusingest.sessions import audit as audit_rows
from tusingest.sessions.audit import LOG_ONLY, AuditEvent, Auditor
from tusingest.sessions.sqlitedb import SQLiteDatabase
from tusingest.sessions.store import StoreError

_SAGA_COLUMNS = (
    "saga_id, kind, subject_id, state, step, data, attempts, error_code, error, owner, lease_expires_at, "
    "created_at, updated_at"
)
_FILE_COLUMNS = (
    "file_id, upload_id, original_filename, storage_filename, storage_element_id, storage_key, size_bytes, "
    "stored_size_bytes, content_type, content_encoding, md5, sha256, created_by_id, created_by_username, "
    "retention_policy, description, metadata, uploaded_at"
)
_OUTBOX_COLUMNS = (
    "message_id, kind, destination, payload, attempts, next_attempt_at, created_at, delivered_at, last_error"
)
_UNFINISHED_SQL = "('running', 'compensating')"


def _ts(value: datetime) -> str:
    # Always UTC and always with microseconds: lease and due-time queries compare these strings, and text
    # order is time order only in one zone and one format.
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now


def _opt_ts(value: datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _time(value: Any) -> datetime:
    return datetime.fromisoformat(str(value))


def _opt_time(value: Any) -> datetime | None:
    return None if value is None else _time(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value))


def _row_to_saga(row: Sequence[Any]) -> Saga:
    (saga_id, kind, subject, state, step, data, attempts, error_code, error, owner, lease, created, updated) = row
    return Saga(
        saga_id=str(saga_id),
        kind=cast(SagaKind, str(kind)),
        subject_id=str(subject),
        state=SagaState(str(state)),
        step=_opt_str(step),
        data=json.loads(str(data)),
        attempts=int(attempts),
        error_code=_opt_str(error_code),
        error=_opt_str(error),
        owner=_opt_str(owner),
        lease_expires_at=_opt_time(lease),
        created_at=_time(created),
        updated_at=_time(updated),
    )


def _row_to_file(row: Sequence[Any]) -> FileRecord:
    return FileRecord(
        file_id=str(row[0]),
        upload_id=_opt_str(row[1]),
        original_filename=str(row[2]),
        storage_filename=str(row[3]),
        storage_element_id=str(row[4]),
        storage_key=str(row[5]),
        size_bytes=int(row[6]),
        stored_size_bytes=int(row[7]),
        content_type=str(row[8]),
        content_encoding=_opt_str(row[9]),
        md5=str(row[10]),
        sha256=str(row[11]),
        created_by_id=_opt_str(row[12]),
        created_by_username=str(row[13]),
        retention_policy=_opt_str(row[14]),
        description=_opt_str(row[15]),
        metadata=json.loads(str(row[16])),
        uploaded_at=_time(row[17]),
    )


def _file_params(record: FileRecord) -> tuple[object, ...]:
    return (
        record.file_id,
        record.upload_id,
        record.original_filename,
        record.storage_filename,
        record.storage_element_id,
        record.storage_key,
        record.size_bytes,
        record.stored_size_bytes,
        record.content_type,
        record.content_encoding,
        record.md5,
        record.sha256,
        record.created_by_id,
        record.created_by_username,
        record.retention_policy,
        record.description,
        _json(record.metadata),
        _ts(record.uploaded_at),
    )


def _row_to_message(row: Sequence[Any]) -> OutboxMessage:
    (message_id, kind, destination, payload, attempts, next_attempt, created, delivered, last_error) = row
    return OutboxMessage(
        message_id=int(message_id),
        kind=cast(OutboxKind, str(kind)),
        destination=str(destination),
        payload=json.loads(str(payload)),
        attempts=int(attempts),
        next_attempt_at=_time(next_attempt),
        created_at=_time(created),
        delivered_at=_opt_time(delivered),
        last_error=_opt_str(last_error),
    )


def _is_unfinished_saga_conflict(exc: sqlite3.IntegrityError) -> bool:
    return "sagas.kind, sagas.subject_id" in str(exc)


# --- statements, run in aiosqlite's thread (SQLiteDatabase.run and .transaction) ----------------------


def _row(db: sqlite3.Connection, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
    rows = db.execute(sql, tuple(params)).fetchall()  # to its end: a pending statement would hold COMMIT up
    return rows[0] if rows else None


def _saga_row(db: sqlite3.Connection, saga_id: str) -> Saga | None:
    row = _row(db, f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE saga_id = ?", (saga_id,))
    return None if row is None else _row_to_saga(row)


def _owned(db: sqlite3.Connection, saga_id: str, owner: str) -> Saga:
    """The saga, when ``owner`` owns it; call inside a transaction."""
    saga = _saga_row(db, saga_id)
    if saga is None:
        raise SagaNotFound(saga_id)
    if saga.owner != owner:
        raise SagaOwnershipLost(saga_id, owner, saga.owner)
    return saga


def _refusal(db: sqlite3.Connection, saga_id: str, owner: str) -> Exception:
    """Why a fenced update changed no row: the saga is gone, or another owner has it."""
    saga = _saga_row(db, saga_id)
    return SagaNotFound(saga_id) if saga is None else SagaOwnershipLost(saga_id, owner, saga.owner)


def _fenced_update(
    db: sqlite3.Connection, saga_id: str, owner: str, assignments: str, params: Sequence[object]
) -> Saga:
    """``UPDATE sagas SET <assignments>`` of the saga ``owner`` owns, in one statement; refused otherwise."""
    row = _row(
        db,
        f"UPDATE sagas SET {assignments} WHERE saga_id = ? AND owner = ? RETURNING {_SAGA_COLUMNS}",
        (*params, saga_id, owner),
    )
    if row is None:
        raise _refusal(db, saga_id, owner)
    return _row_to_saga(row)


def _advance(
    db: sqlite3.Connection, saga: Saga, step: str, data_update: Mapping[str, Any], lease_seconds: float, now: datetime
) -> Saga:
    # SQLite's json_patch merges nested objects too; the contract is a shallow merge, so do it here.
    row = _row(
        db,
        f"UPDATE sagas SET step = ?, data = ?, lease_expires_at = ?, updated_at = ? WHERE saga_id = ? "
        f"RETURNING {_SAGA_COLUMNS}",
        (
            step,
            _json({**saga.data, **data_update}),
            _ts(now + timedelta(seconds=lease_seconds)),
            _ts(now),
            saga.saga_id,
        ),
    )
    if row is None:
        raise SagaNotFound(saga.saga_id)
    return _row_to_saga(row)


_INSERT_OUTBOX = "INSERT INTO outbox (kind, destination, payload, next_attempt_at, created_at) VALUES (?,?,?,?,?)"


class SQLiteSagaStore:
    """The saga log, files registry and outbox of an SQLite file; on ``database``, the session store's
    connection when app.py shares one (see sessions/sqlitedb.py)."""

    def __init__(self, database: str | SQLiteDatabase) -> None:
        self.database = SQLiteDatabase(database) if isinstance(database, str) else database
        self._open = False
        self.auditor: Auditor = LOG_ONLY  # app.py hands over the one it built
        # The database's lock, held by every statement: one issued while another coroutine's BEGIN IMMEDIATE
        # is open would silently join (and roll back with) that transaction.
        self._lock = self.database.lock

    @property
    def db(self) -> aiosqlite.Connection:
        db = self.database.connection
        if not self._open or db is None:
            raise StoreError("the SQLite saga store is not open")
        return db

    async def open(self) -> None:
        if not self._open:
            await self.database.open()
            self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self.database.close()

    async def ping(self) -> bool:
        try:
            async with self._lock:
                await self.db.execute("SELECT 1")
        except (sqlite3.Error, StoreError):
            return False
        return True

    # --- plumbing ----------------------------------------------------------------------------------

    # One hop to aiosqlite's thread per statement (execute, fetch and close together), not three.

    async def _fetchone(self, sql: str, params: Iterable[object] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _fetchall(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        return list(await self.db.execute_fetchall(sql, tuple(params)))

    def _statement(self) -> asyncio.Lock:
        """A write of one statement: atomic by itself, so the lock suffices (no BEGIN, no COMMIT, two hops fewer)."""
        return self._lock

    async def _run[T](self, statements: Callable[[sqlite3.Connection], T]) -> T:
        """Statements that each commit by themselves, in one hop (see SQLiteDatabase.run)."""
        return await self.database.run(lambda: self.db, statements)

    async def _transaction[T](self, body: Callable[[sqlite3.Connection], T]) -> T:
        """A write transaction in one hop (BEGIN IMMEDIATE; see SQLiteDatabase.transaction)."""
        return await self.database.transaction(lambda: self.db, body)

    # --- the saga log --------------------------------------------------------------------------------

    async def create_saga(
        self,
        kind: SagaKind,
        subject_id: str,
        data: Mapping[str, Any],
        *,
        owner: str,
        lease_seconds: float,
        now: datetime | None = None,
        first: bool = False,
    ) -> Saga:
        now = _now(now)
        params = (
            new_saga_id(),
            kind,
            subject_id,
            SagaState.RUNNING.value,
            _json(data),
            owner,
            _ts(now + timedelta(seconds=lease_seconds)),
            _ts(now),
            _ts(now),
        )
        insert = (
            "INSERT INTO sagas (saga_id, kind, subject_id, state, data, owner, lease_expires_at, created_at, "
            "updated_at) SELECT ?,?,?,?,?,?,?,?,? "
            + ("WHERE NOT EXISTS (SELECT 1 FROM sagas WHERE kind = ? AND subject_id = ?) " if first else "")
            + f"RETURNING {_SAGA_COLUMNS}"
        )
        async with self._statement():
            try:
                row = await self._fetchone(insert, (*params, kind, subject_id) if first else params)
            except sqlite3.IntegrityError as exc:
                if _is_unfinished_saga_conflict(exc):
                    raise DuplicateSaga(kind, subject_id) from exc
                raise
        if row is None:  # ``first``, and the subject has a saga of this kind on record
            raise DuplicateSaga(kind, subject_id)
        return _row_to_saga(row)

    async def get_saga(self, saga_id: str) -> Saga | None:
        return await self._run(lambda db: _saga_row(db, saga_id))

    async def latest_saga(self, kind: SagaKind, subject_id: str) -> Saga | None:
        async with self._lock:
            row = await self._fetchone(
                f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE kind = ? AND subject_id = ? "
                "ORDER BY created_at DESC, saga_id DESC LIMIT 1",
                (kind, subject_id),
            )
        return None if row is None else _row_to_saga(row)

    async def advance(
        self,
        saga_id: str,
        *,
        owner: str,
        step: str,
        data_update: Mapping[str, Any],
        lease_seconds: float,
        now: datetime | None = None,
    ) -> Saga:
        now = _now(now)
        return await self._transaction(
            lambda db: _advance(db, _owned(db, saga_id, owner), step, data_update, lease_seconds, now)
        )

    async def set_state(
        self,
        saga_id: str,
        *,
        owner: str,
        state: SagaState,
        error_code: str | None = None,
        error: str | None = None,
        now: datetime | None = None,
        audit: AuditEvent | None = None,
        durable: bool = True,  # with synchronous=NORMAL no commit here waits for the disk (sqlitedb.py)
    ) -> Saga:
        now = _now(now)

        def change(db: sqlite3.Connection) -> Saga:
            try:
                changed = _fenced_update(
                    db,
                    saga_id,
                    owner,
                    "state = ?, error_code = ?, error = ?, updated_at = ?, "
                    "lease_expires_at = CASE WHEN ? THEN NULL ELSE lease_expires_at END",
                    (state.value, error_code, error, _ts(now), state.is_finished),
                )
            except sqlite3.IntegrityError as exc:
                if not _is_unfinished_saga_conflict(exc):
                    raise
                saga = _saga_row(db, saga_id)
                assert saga is not None  # it violated an index, so it exists
                raise DuplicateSaga(saga.kind, saga.subject_id) from exc
            if audit is not None:
                audit_rows.insert_sqlite(db, audit)
            return changed

        changed = await self._run(change) if audit is None else await self._transaction(change)
        if audit is not None:
            await self.auditor.published(audit)
        return changed

    async def bump_attempts(self, saga_id: str, *, owner: str, now: datetime | None = None) -> Saga:
        now = _now(now)
        return await self._run(
            lambda db: _fenced_update(db, saga_id, owner, "attempts = attempts + 1, updated_at = ?", (_ts(now),))
        )

    async def renew_lease(self, saga_id: str, *, owner: str, lease_seconds: float, now: datetime | None = None) -> bool:
        now = _now(now)
        async with self._statement():
            row = await self._fetchone(
                "UPDATE sagas SET lease_expires_at = ?, updated_at = ? "
                f"WHERE saga_id = ? AND owner = ? AND state IN {_UNFINISHED_SQL} RETURNING saga_id",
                (_ts(now + timedelta(seconds=lease_seconds)), _ts(now), saga_id, owner),
            )
        return row is not None

    async def claim_stale(
        self,
        owner: str,
        *,
        lease_seconds: float,
        limit: int,
        kinds: Sequence[SagaKind] | None = None,
        now: datetime | None = None,
    ) -> list[Saga]:
        now = _now(now)
        of_kinds = "" if kinds is None else f" AND kind IN ({','.join('?' * len(kinds))})"
        # One statement, so one write lock: another connection's claim runs before or after it, never between.
        async with self._statement():
            rows = await self._fetchall(
                "UPDATE sagas SET owner = ?, lease_expires_at = ?, updated_at = ? WHERE saga_id IN ("
                f"  SELECT saga_id FROM sagas WHERE state IN {_UNFINISHED_SQL}{of_kinds}"
                "   AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= ?)"
                "   ORDER BY lease_expires_at, created_at LIMIT ?"
                f") RETURNING {_SAGA_COLUMNS}",
                (owner, _ts(now + timedelta(seconds=lease_seconds)), _ts(now), *(kinds or ()), _ts(now), limit),
            )
        return sorted(map(_row_to_saga, rows), key=lambda s: (s.created_at, s.saga_id))

    async def list_sagas(self, states: Sequence[SagaState] | None = None) -> list[Saga]:
        where = ""
        params: tuple[str, ...] = ()
        if states is not None:
            where = f"WHERE state IN ({','.join('?' * len(states))})"
            params = tuple(s.value for s in states)
        async with self._lock:
            rows = await self._fetchall(
                f"SELECT {_SAGA_COLUMNS} FROM sagas {where} ORDER BY created_at, saga_id", params
            )
        return [_row_to_saga(r) for r in rows]

    # --- the files registry ----------------------------------------------------------------------------

    async def register_file(
        self,
        saga_id: str,
        *,
        owner: str,
        record: FileRecord,
        messages: Sequence[NewOutboxMessage],
        step: str,
        data_update: Mapping[str, Any],
        lease_seconds: float,
        now: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> Saga:
        now = _now(now)
        # Encoded before the transaction opens: a payload that is not JSON fails without touching anything.
        outbox_rows = [(m.kind, m.destination, _json(m.payload), _ts(now), _ts(now)) for m in messages]

        def register(db: sqlite3.Connection) -> tuple[Saga, bool]:
            saga = _owned(db, saga_id, owner)
            if saga.step == step:
                return saga, False
            inserted = _row(
                db,
                f"INSERT INTO files ({_FILE_COLUMNS}) VALUES ({','.join('?' * 18)}) "
                "ON CONFLICT (file_id) DO NOTHING RETURNING file_id",
                _file_params(record),
            )
            audited = False
            if inserted is None:
                existing = _row(db, "SELECT upload_id FROM files WHERE file_id = ?", (record.file_id,))
                if existing is None or existing[0] != record.upload_id:
                    raise DuplicateFile(record.file_id)
            else:
                if outbox_rows:
                    db.executemany(_INSERT_OUTBOX, outbox_rows)
                if audit is not None:
                    audit_rows.insert_sqlite(db, audit)
                    audited = True
            return _advance(db, saga, step, data_update, lease_seconds, now), audited

        saga, audited = await self._transaction(register)
        if audited and audit is not None:
            await self.auditor.published(audit)
        return saga

    async def enqueue(self, messages: Sequence[NewOutboxMessage], *, now: datetime | None = None) -> None:
        now = _now(now)
        rows = [(m.kind, m.destination, _json(m.payload), _ts(now), _ts(now)) for m in messages]
        if not rows:
            return
        await self._transaction(lambda db: db.executemany(_INSERT_OUTBOX, rows))

    async def get_file(self, file_id: str) -> FileRecord | None:
        async with self._lock:
            row = await self._fetchone(f"SELECT {_FILE_COLUMNS} FROM files WHERE file_id = ?", (file_id,))
        return None if row is None else _row_to_file(row)

    async def file_for_upload(self, upload_id: str) -> FileRecord | None:
        async with self._lock:
            row = await self._fetchone(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE upload_id = ? "
                "ORDER BY uploaded_at DESC, file_id DESC LIMIT 1",
                (upload_id,),
            )
        return None if row is None else _row_to_file(row)

    async def delete_file(self, file_id: str) -> bool:
        async with self._statement():
            row = await self._fetchone("DELETE FROM files WHERE file_id = ? RETURNING file_id", (file_id,))
        return row is not None

    async def update_file_location(
        self, file_id: str, *, storage_element_id: str, storage_key: str
    ) -> FileRecord | None:
        async with self._statement():
            row = await self._fetchone(
                f"UPDATE files SET storage_element_id = ?, storage_key = ? WHERE file_id = ? RETURNING {_FILE_COLUMNS}",
                (storage_element_id, storage_key, file_id),
            )
        return None if row is None else _row_to_file(row)

    async def count_files(self) -> int:
        async with self._lock:
            row = await self._fetchone("SELECT count(*) FROM files")
        assert row is not None
        return int(row[0])

    async def count_undelivered(self) -> int:
        async with self._lock:
            row = await self._fetchone("SELECT count(*) FROM outbox WHERE delivered_at IS NULL")
        assert row is not None
        return int(row[0])

    # --- the outbox --------------------------------------------------------------------------------------

    async def claim_due_messages(
        self, *, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> list[OutboxMessage]:
        now = _now(now)
        async with self._statement():
            rows = await self._fetchall(
                "UPDATE outbox SET next_attempt_at = ? WHERE message_id IN ("
                "  SELECT message_id FROM outbox WHERE delivered_at IS NULL AND next_attempt_at <= ?"
                "  ORDER BY next_attempt_at, message_id LIMIT ?"
                f") RETURNING {_OUTBOX_COLUMNS}",
                (_ts(now + timedelta(seconds=lease_seconds)), _ts(now), limit),
            )
        return sorted(map(_row_to_message, rows), key=lambda m: m.message_id)

    async def mark_delivered(self, message_id: int, *, now: datetime | None = None) -> bool:
        now = _now(now)
        async with self._statement():
            row = await self._fetchone(
                "UPDATE outbox SET delivered_at = ? WHERE message_id = ? AND delivered_at IS NULL RETURNING message_id",
                (_ts(now), message_id),
            )
        return row is not None

    async def purge_delivered(self, *, delivered_before: datetime) -> int:
        sql = "DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?"
        return await self._transaction(lambda db: db.execute(sql, (_ts(delivered_before),)).rowcount)

    async def reschedule(self, message_id: int, *, next_attempt_at: datetime, error: str) -> bool:
        async with self._statement():
            row = await self._fetchone(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                "WHERE message_id = ? AND delivered_at IS NULL RETURNING message_id",
                (_ts(next_attempt_at), error, message_id),
            )
        return row is not None
