"""SagaStore on PostgreSQL (asyncpg): the saga log, files registry and outbox shared by every node.

Claims of stale sagas and due messages lock their rows with FOR UPDATE SKIP LOCKED, so nodes that claim at
the same time split the work rather than both taking it. The schema comes from alembic (0002) and ``open``
refuses a database that is not at the head revision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg

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
from tusingest.sessions.pgpool import PostgresDatabase

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
_ONE_UNFINISHED_INDEX = "sagas_one_unfinished"  # the partial unique index of 0002


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now


def _json(value: Mapping[str, Any]) -> str:
    # Encoded here rather than by a pool codec: a value that is not JSON fails with the same TypeError,
    # before any statement is sent, on SQLite and PostgreSQL alike.
    return json.dumps(dict(value))


def _row_to_saga(row: asyncpg.Record) -> Saga:
    return Saga(
        saga_id=row["saga_id"],
        kind=cast(SagaKind, row["kind"]),
        subject_id=row["subject_id"],
        state=SagaState(row["state"]),
        step=row["step"],
        data=json.loads(row["data"]),
        attempts=row["attempts"],
        error_code=row["error_code"],
        error=row["error"],
        owner=row["owner"],
        lease_expires_at=row["lease_expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _row_to_file(row: asyncpg.Record) -> FileRecord:
    return FileRecord(
        file_id=row["file_id"],
        upload_id=row["upload_id"],
        original_filename=row["original_filename"],
        storage_filename=row["storage_filename"],
        storage_element_id=row["storage_element_id"],
        storage_key=row["storage_key"],
        size_bytes=row["size_bytes"],
        stored_size_bytes=row["stored_size_bytes"],
        content_type=row["content_type"],
        content_encoding=row["content_encoding"],
        md5=row["md5"],
        sha256=row["sha256"],
        created_by_id=row["created_by_id"],
        created_by_username=row["created_by_username"],
        retention_policy=row["retention_policy"],
        description=row["description"],
        metadata=json.loads(row["metadata"]),
        uploaded_at=row["uploaded_at"],
    )


def _row_to_message(row: asyncpg.Record) -> OutboxMessage:
    return OutboxMessage(
        message_id=row["message_id"],
        kind=cast(OutboxKind, row["kind"]),
        destination=row["destination"],
        payload=json.loads(row["payload"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        delivered_at=row["delivered_at"],
        last_error=row["last_error"],
    )


class PostgresSagaStore(PostgresDatabase):
    what = "saga store"
    default_max_size = 5
    auditor: Auditor = LOG_ONLY  # app.py hands over the one it built

    # --- plumbing ----------------------------------------------------------------------------------

    async def _refusal(self, saga_id: str, owner: str) -> Exception:
        """Why a fenced write matched no row: the saga is gone, or someone else owns it now."""
        row = await self.pool.fetchrow("SELECT owner FROM sagas WHERE saga_id = $1", saga_id)
        if row is None:
            return SagaNotFound(saga_id)
        return SagaOwnershipLost(saga_id, owner, row["owner"])

    async def _fenced_update(
        self,
        saga_id: str,
        owner: str,
        assignments: str,
        *params: object,
        audit: AuditEvent | None = None,
        durable: bool = True,
    ) -> Saga:
        """``UPDATE sagas SET <assignments>`` where $1 is the saga id and $2 its owner; refused otherwise.

        With ``audit``, its row is written in the same transaction and published once that commits.
        Not ``durable``: the commit does not wait for the WAL flush (a later durable commit flushes it too)."""
        sql = f"UPDATE sagas SET {assignments} WHERE saga_id = $1 AND owner = $2 RETURNING {_SAGA_COLUMNS}"
        if audit is None and durable:
            row = await self.pool.fetchrow(sql, saga_id, owner, *params)
        else:
            async with self.pool.acquire() as connection, connection.transaction():
                if not durable:
                    await connection.execute("SET LOCAL synchronous_commit = off")
                row = await connection.fetchrow(sql, saga_id, owner, *params)
                if row is not None and audit is not None:
                    await audit_rows.insert_postgres(connection, audit)
        if row is None:
            raise await self._refusal(saga_id, owner)
        if audit is not None:
            await self.auditor.published(audit)
        return _row_to_saga(row)

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
        # Two concurrent ``first`` inserts may both find no saga: the unfinished-saga index refuses the second.
        unless_any = "WHERE NOT EXISTS (SELECT 1 FROM sagas WHERE kind = $2 AND subject_id = $3) " if first else ""
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO sagas (saga_id, kind, subject_id, state, data, owner, lease_expires_at, created_at, "
                "updated_at) SELECT $1::text, $2::text, $3::text, $4::text, $5::jsonb, $6::text, $7::timestamptz, "
                f"$8::timestamptz, $8::timestamptz {unless_any}RETURNING {_SAGA_COLUMNS}",
                new_saga_id(),
                kind,
                subject_id,
                SagaState.RUNNING.value,
                _json(data),
                owner,
                now + timedelta(seconds=lease_seconds),
                now,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == _ONE_UNFINISHED_INDEX:
                raise DuplicateSaga(kind, subject_id) from exc
            raise
        if row is None:  # ``first``, and the subject has a saga of this kind on record
            raise DuplicateSaga(kind, subject_id)
        return _row_to_saga(row)

    async def get_saga(self, saga_id: str) -> Saga | None:
        row = await self.pool.fetchrow(f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE saga_id = $1", saga_id)
        return None if row is None else _row_to_saga(row)

    async def latest_saga(self, kind: SagaKind, subject_id: str) -> Saga | None:
        row = await self.pool.fetchrow(
            f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE kind = $1 AND subject_id = $2 "
            "ORDER BY created_at DESC, saga_id DESC LIMIT 1",
            kind,
            subject_id,
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
        # jsonb || jsonb replaces top-level keys: the shallow merge the contract asks for, in one statement.
        return await self._fenced_update(
            saga_id,
            owner,
            "step = $3, data = data || $4::jsonb, lease_expires_at = $5, updated_at = $6",
            step,
            _json(data_update),
            now + timedelta(seconds=lease_seconds),
            now,
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
        durable: bool = True,
    ) -> Saga:
        now = _now(now)
        try:
            return await self._fenced_update(
                saga_id,
                owner,
                "state = $3, error_code = $4, error = $5, updated_at = $6, "
                "lease_expires_at = CASE WHEN $7::boolean THEN NULL ELSE lease_expires_at END",
                state.value,
                error_code,
                error,
                now,
                state.is_finished,
                audit=audit,
                durable=durable,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _ONE_UNFINISHED_INDEX:
                raise
            saga = await self.get_saga(saga_id)
            assert saga is not None  # it violated an index, so it exists
            raise DuplicateSaga(saga.kind, saga.subject_id) from exc

    async def bump_attempts(self, saga_id: str, *, owner: str, now: datetime | None = None) -> Saga:
        return await self._fenced_update(saga_id, owner, "attempts = attempts + 1, updated_at = $3", _now(now))

    async def renew_lease(self, saga_id: str, *, owner: str, lease_seconds: float, now: datetime | None = None) -> bool:
        now = _now(now)
        renewed = await self.pool.fetchval(
            "UPDATE sagas SET lease_expires_at = $3, updated_at = $4 "
            f"WHERE saga_id = $1 AND owner = $2 AND state IN {_UNFINISHED_SQL} RETURNING true",
            saga_id,
            owner,
            now + timedelta(seconds=lease_seconds),
            now,
        )
        return renewed is not None

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
        # SKIP LOCKED: a row another node is claiming right now is left to it. Should that node commit first,
        # READ COMMITTED re-checks the lease on the new row version, which is no longer stale, so it is skipped.
        rows = await self.pool.fetch(
            "WITH claimed AS ("
            "  UPDATE sagas SET owner = $1, lease_expires_at = $2, updated_at = $3 WHERE saga_id IN ("
            f"    SELECT saga_id FROM sagas WHERE state IN {_UNFINISHED_SQL}"
            "     AND ($5::text[] IS NULL OR kind = ANY($5::text[]))"
            "     AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= $3)"
            "     ORDER BY lease_expires_at NULLS FIRST, created_at LIMIT $4"
            "     FOR UPDATE SKIP LOCKED"
            f"  ) RETURNING {_SAGA_COLUMNS}"
            ") SELECT * FROM claimed ORDER BY created_at, saga_id",
            owner,
            now + timedelta(seconds=lease_seconds),
            now,
            limit,
            None if kinds is None else list(kinds),
        )
        return [_row_to_saga(r) for r in rows]

    async def list_sagas(self, states: Sequence[SagaState] | None = None) -> list[Saga]:
        if states is None:
            rows = await self.pool.fetch(f"SELECT {_SAGA_COLUMNS} FROM sagas ORDER BY created_at, saga_id")
        else:
            rows = await self.pool.fetch(
                f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE state = ANY($1::text[]) ORDER BY created_at, saga_id",
                [s.value for s in states],
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
        audited = False
        # Encoded before the transaction opens: a payload that is not JSON fails without touching anything.
        outbox_rows = [(m.kind, m.destination, _json(m.payload), now) for m in messages]
        metadata, update = _json(record.metadata), _json(data_update)
        async with self.pool.acquire() as connection, connection.transaction():
            # FOR UPDATE: the owner check holds until commit; a claim_stale meanwhile skips this row.
            row = await connection.fetchrow(f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE saga_id = $1 FOR UPDATE", saga_id)
            if row is None:
                raise SagaNotFound(saga_id)
            saga = _row_to_saga(row)
            if saga.owner != owner:
                raise SagaOwnershipLost(saga_id, owner, saga.owner)
            if saga.step == step:
                return saga
            inserted = await connection.fetchval(
                f"INSERT INTO files ({_FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
                "$13, $14, $15, $16, $17::jsonb, $18) ON CONFLICT (file_id) DO NOTHING RETURNING true",
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
                metadata,
                record.uploaded_at,
            )
            if inserted is None:
                same_upload = await connection.fetchval(
                    "SELECT upload_id IS NOT DISTINCT FROM $2 FROM files WHERE file_id = $1",
                    record.file_id,
                    record.upload_id,
                )
                if not same_upload:
                    raise DuplicateFile(record.file_id)
            else:
                if outbox_rows:
                    await connection.executemany(
                        "INSERT INTO outbox (kind, destination, payload, next_attempt_at, created_at) "
                        "VALUES ($1, $2, $3::jsonb, $4, $4)",
                        outbox_rows,
                    )
                if audit is not None:
                    await audit_rows.insert_postgres(connection, audit)
                    audited = True
            row = await connection.fetchrow(
                "UPDATE sagas SET step = $2, data = data || $3::jsonb, lease_expires_at = $4, updated_at = $5 "
                f"WHERE saga_id = $1 RETURNING {_SAGA_COLUMNS}",
                saga_id,
                step,
                update,
                now + timedelta(seconds=lease_seconds),
                now,
            )
        assert row is not None  # the row is locked by this transaction, so it is still there
        if audited and audit is not None:
            await self.auditor.published(audit)
        return _row_to_saga(row)

    async def enqueue(self, messages: Sequence[NewOutboxMessage], *, now: datetime | None = None) -> None:
        now = _now(now)
        rows = [(m.kind, m.destination, _json(m.payload), now) for m in messages]
        if rows:
            await self.pool.executemany(
                "INSERT INTO outbox (kind, destination, payload, next_attempt_at, created_at) "
                "VALUES ($1, $2, $3::jsonb, $4, $4)",
                rows,
            )

    async def get_file(self, file_id: str) -> FileRecord | None:
        row = await self.pool.fetchrow(f"SELECT {_FILE_COLUMNS} FROM files WHERE file_id = $1", file_id)
        return None if row is None else _row_to_file(row)

    async def file_for_upload(self, upload_id: str) -> FileRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE upload_id = $1 ORDER BY uploaded_at DESC, file_id DESC LIMIT 1",
            upload_id,
        )
        return None if row is None else _row_to_file(row)

    async def delete_file(self, file_id: str) -> bool:
        deleted = await self.pool.fetchval("DELETE FROM files WHERE file_id = $1 RETURNING true", file_id)
        return deleted is not None

    async def update_file_location(
        self, file_id: str, *, storage_element_id: str, storage_key: str
    ) -> FileRecord | None:
        row = await self.pool.fetchrow(
            f"UPDATE files SET storage_element_id = $2, storage_key = $3 WHERE file_id = $1 RETURNING {_FILE_COLUMNS}",
            file_id,
            storage_element_id,
            storage_key,
        )
        return None if row is None else _row_to_file(row)

    async def count_files(self) -> int:
        count: int = await self.pool.fetchval("SELECT count(*) FROM files")
        return count

    async def count_undelivered(self) -> int:
        count: int = await self.pool.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NULL")
        return count

    # --- the outbox --------------------------------------------------------------------------------------

    async def claim_due_messages(
        self, *, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> list[OutboxMessage]:
        now = _now(now)
        rows = await self.pool.fetch(
            "WITH claimed AS ("
            "  UPDATE outbox SET next_attempt_at = $1 WHERE message_id IN ("
            "    SELECT message_id FROM outbox WHERE delivered_at IS NULL AND next_attempt_at <= $2"
            "    ORDER BY next_attempt_at, message_id LIMIT $3"
            "    FOR UPDATE SKIP LOCKED"
            f"  ) RETURNING {_OUTBOX_COLUMNS}"
            ") SELECT * FROM claimed ORDER BY message_id",
            now + timedelta(seconds=lease_seconds),
            now,
            limit,
        )
        return [_row_to_message(r) for r in rows]

    async def mark_delivered(self, message_id: int, *, now: datetime | None = None) -> bool:
        delivered = await self.pool.fetchval(
            "UPDATE outbox SET delivered_at = $2 WHERE message_id = $1 AND delivered_at IS NULL RETURNING true",
            message_id,
            _now(now),
        )
        return delivered is not None

    async def purge_delivered(self, *, delivered_before: datetime) -> int:
        status = await self.pool.execute(
            "DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < $1", delivered_before
        )
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"

    async def reschedule(self, message_id: int, *, next_attempt_at: datetime, error: str) -> bool:
        rescheduled = await self.pool.fetchval(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3 "
            "WHERE message_id = $1 AND delivered_at IS NULL RETURNING true",
            message_id,
            next_attempt_at,
            error,
        )
        return rescheduled is not None
