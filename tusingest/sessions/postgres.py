"""SessionStore on PostgreSQL (asyncpg): upload state shared by every node of a cluster.

Every method is one statement, so one round trip; the schema comes from alembic (``tusingest migrate``)
and ``open`` refuses a database that is not at the head revision.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from tusingest.sessions import audit as audit_rows
from tusingest.sessions.audit import LOG_ONLY, AuditEvent, Auditor, AuditQuery
from tusingest.sessions.model import IdempotencyKey, Upload, UploadKind, UploadState
from tusingest.sessions.pgpool import PostgresDatabase
from tusingest.sessions.progress import ProgressBus, ProgressEvent
from tusingest.sessions.store import StoreError

_COLUMNS = (
    "id, upload_length, upload_offset, metadata, state, kind, parts, created_at, updated_at, expires_at, "
    "completion_pending, owner_id, owner_name"
)


_KEY_COLUMNS = "subject, idempotency_key, fingerprint, upload_id, created_at, expires_at"
# A claim wins a (subject, key) that is free or whose holder has expired; else the holder stays.
_CLAIM = (
    f"INSERT INTO idempotency_keys ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (subject, idempotency_key) DO UPDATE SET fingerprint = excluded.fingerprint, "
    "upload_id = excluded.upload_id, created_at = excluded.created_at, expires_at = excluded.expires_at "
    f"WHERE idempotency_keys.expires_at <= excluded.created_at RETURNING {_KEY_COLUMNS}"
)


def _row_to_key(row: asyncpg.Record) -> IdempotencyKey:
    return IdempotencyKey(*row.values())  # _KEY_COLUMNS are the fields, in their order


def _row_to_upload(row: asyncpg.Record) -> Upload:
    return Upload(
        id=row["id"],
        length=row["upload_length"],
        offset=row["upload_offset"],
        metadata=row["metadata"],
        state=UploadState(row["state"]),
        kind=UploadKind(row["kind"]),
        parts=tuple(row["parts"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        completion_pending=row["completion_pending"],
        owner_id=row["owner_id"],
        owner_name=row["owner_name"],
    )


class PostgresSessionStore(PostgresDatabase):
    what = "session store"
    default_max_size = 10
    auditor: Auditor = LOG_ONLY  # app.py hands over the one it built

    def __init__(self, database_url: str, **options: Any) -> None:
        super().__init__(database_url, **options)
        self.progress = ProgressBus()  # app.py hands over the one it built

    async def _audited(self, event: AuditEvent, sql: str, *params: object) -> asyncpg.Record | None:
        """Run ``sql`` and write ``event``'s row in one transaction; publish the event once it is committed
        (and only when the statement changed something: it returned a row)."""
        async with self.pool.acquire() as connection, connection.transaction():
            row: asyncpg.Record | None = await connection.fetchrow(sql, *params)
            if row is not None:
                await audit_rows.insert_postgres(connection, event)
        if row is not None:
            await self.auditor.published(event)
        return row

    async def record_audit(self, event: AuditEvent) -> None:
        await audit_rows.insert_postgres(self.pool, event)
        await self.auditor.published(event)

    async def list_audit(
        self,
        since: datetime,
        until: datetime | None = None,
        limit: int = 1000,
        *,
        subject: str | None = None,
        upload_id: str | None = None,
    ) -> list[AuditEvent]:
        return await audit_rows.list_postgres(self.pool, AuditQuery(since, until, limit, subject, upload_id))

    async def create(self, upload: Upload, audit: AuditEvent | None = None) -> None:
        upload = upload.as_stored()
        sql = f"INSERT INTO uploads ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        params = (
            upload.id,
            upload.length,
            upload.offset,
            upload.metadata,
            upload.state.value,
            upload.kind.value,
            list(upload.parts),
            upload.created_at,
            upload.updated_at,
            upload.expires_at,
            upload.completion_pending,
            upload.owner_id,
            upload.owner_name,
        )
        try:
            if audit is None:
                await self.pool.execute(sql, *params)
            else:
                await self._audited(audit, f"{sql} RETURNING id", *params)
        except asyncpg.UniqueViolationError as exc:
            raise StoreError(f"upload {upload.id} already exists") from exc

    async def claim_idempotency_key(self, claim: IdempotencyKey) -> IdempotencyKey:
        values = (claim.subject, claim.key, claim.fingerprint, claim.upload_id, claim.created_at, claim.expires_at)
        while True:
            row = await self.pool.fetchrow(_CLAIM, *values)
            if row is None:  # held: read the holder (gone meanwhile: claim again)
                row = await self.pool.fetchrow(
                    f"SELECT {_KEY_COLUMNS} FROM idempotency_keys WHERE subject = $1 AND idempotency_key = $2",
                    claim.subject,
                    claim.key,
                )
            if row is not None:
                return _row_to_key(row)

    async def release_idempotency_key(self, subject: str, key: str, upload_id: str) -> None:
        await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE subject = $1 AND idempotency_key = $2 AND upload_id = $3",
            subject,
            key,
            upload_id,
        )

    async def forget_expired_idempotency_keys(self, now: datetime) -> int:
        status = await self.pool.execute("DELETE FROM idempotency_keys WHERE expires_at <= $1", now)
        return int(status.rsplit(" ", 1)[1])

    async def get(self, upload_id: str) -> Upload | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM uploads WHERE id = $1", upload_id)
        return None if row is None else _row_to_upload(row)

    async def get_many(self, upload_ids: list[str]) -> dict[str, Upload]:
        if not upload_ids:
            return {}
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM uploads WHERE id = ANY($1::text[])", upload_ids)
        return {u.id: u for u in map(_row_to_upload, rows)}

    async def _update_returning(self, sql: str, *params: object) -> Upload | None:
        row = await self.pool.fetchrow(f"{sql} RETURNING {_COLUMNS}", *params)
        return None if row is None else _row_to_upload(row)

    async def commit_offset(
        self, upload_id: str, expected: int, offset: int, updated_at: datetime, expires_at: datetime | None
    ) -> Upload | None:
        # Reaching the length completes the upload in this same statement (see SessionStore.commit_offset).
        update = (
            "UPDATE uploads SET upload_offset = $1, updated_at = $2, expires_at = $3, "
            "state = CASE WHEN upload_length = $1 THEN 'complete' ELSE state END, "
            "completion_pending = completion_pending OR (upload_length IS NOT DISTINCT FROM $1 AND kind <> 'partial') "
            "WHERE id = $4 AND upload_offset = $5 AND state = 'active'"
        )
        params: tuple[object, ...] = (offset, updated_at, expires_at, upload_id, expected)
        channel = self.progress.notify_channel
        if channel is None:
            committed = await self._update_returning(update, *params)
            if committed is not None:
                await self.progress.publish(ProgressEvent.committed(committed))
            return committed
        # The NOTIFY rides in the committing statement: no extra round trip, and it is sent only if
        # the offset is committed (PostgreSQL delivers notifications at commit).
        row = await self.pool.fetchrow(
            f"WITH committed AS ({update} RETURNING {_COLUMNS}) SELECT committed.*, pg_notify($6, "
            "json_build_object('upload_id', id, 'offset', upload_offset, 'length', upload_length)::text) "
            "FROM committed",
            *params,
            channel,
        )
        return None if row is None else _row_to_upload(row)

    async def set_length(self, upload_id: str, length: int) -> Upload | None:
        return await self._update_returning(
            # A length equal to the offset completes the upload, as a commit reaching it would.
            "UPDATE uploads SET upload_length = $1, "
            "state = CASE WHEN upload_offset = $1 AND state = 'active' THEN 'complete' ELSE state END, "
            "completion_pending = completion_pending "
            "OR (upload_offset = $1 AND state = 'active' AND kind <> 'partial') "
            "WHERE id = $2 AND upload_length IS NULL AND upload_offset <= $1",
            length,
            upload_id,
        )

    async def set_state(
        self,
        upload_id: str,
        state: UploadState,
        *,
        only_from: UploadState | None = None,
        audit: AuditEvent | None = None,
    ) -> Upload | None:
        sql, params = "UPDATE uploads SET state = $1 WHERE id = $2", [state.value, upload_id]
        if only_from is not None:
            sql, params = f"{sql} AND state = $3", [*params, only_from.value]
        if audit is None:
            changed = await self._update_returning(sql, *params)
        else:
            row = await self._audited(audit, f"{sql} RETURNING {_COLUMNS}", *params)
            changed = None if row is None else _row_to_upload(row)
        if changed is not None and (event := ProgressEvent.ended(changed)) is not None:
            await self.progress.publish(event)
        return changed

    async def _select(self, where: str, *params: object) -> list[Upload]:
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM uploads WHERE {where}", *params)
        return [_row_to_upload(r) for r in rows]

    async def list_expired(self, now: datetime, limit: int = 500) -> list[Upload]:
        return await self._select(
            "state = 'active' AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2", now, limit
        )

    async def list_final_uploads_with_part(self, partial_id: str) -> list[Upload]:
        # `parts @> ARRAY[...]` rather than `= ANY(parts)`: the containment form can use the GIN index.
        return await self._select("kind = 'final' AND parts @> ARRAY[$1::text]", partial_id)

    async def list_expired_partials(self, now: datetime, limit: int = 500) -> list[Upload]:
        return await self._select(
            "state = 'complete' AND kind = 'partial' AND expires_at IS NOT NULL AND expires_at <= $1 "
            "ORDER BY expires_at LIMIT $2",
            now,
            limit,
        )

    async def completion_taken_over(self, upload_id: str) -> None:
        await self.pool.execute("UPDATE uploads SET completion_pending = false WHERE id = $1", upload_id)

    async def list_completion_pending(self, before: datetime, limit: int = 100) -> list[Upload]:
        return await self._select("completion_pending AND updated_at <= $1 ORDER BY updated_at LIMIT $2", before, limit)
