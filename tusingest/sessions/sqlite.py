"""SessionStore on SQLite: the embedded default for a single process.

The file, its one connection and its schema (the alembic scripts, as on PostgreSQL) are sqlitedb.py's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime

import aiosqlite

from tusingest.sessions import audit as audit_rows
from tusingest.sessions.audit import LOG_ONLY, AuditEvent, Auditor, AuditQuery
from tusingest.sessions.model import IdempotencyKey, Upload, UploadKind, UploadState
from tusingest.sessions.progress import ProgressBus, ProgressEvent
from tusingest.sessions.sqlitedb import SQLiteDatabase
from tusingest.sessions.store import StoreError

_COLUMNS = (
    "id, upload_length, upload_offset, metadata, state, kind, parts, created_at, updated_at, expires_at, "
    "completion_pending, owner_id, owner_name"
)
# The commit that reaches the length completes the upload in the same statement (see SessionStore.commit_offset).
_COMPLETES = (
    "state = CASE WHEN upload_length = ? THEN 'complete' ELSE state END, "
    "completion_pending = CASE WHEN upload_length = ? AND kind <> 'partial' THEN 1 ELSE completion_pending END"
)


_KEY_COLUMNS = "subject, idempotency_key, fingerprint, upload_id, created_at, expires_at"
# A claim wins a (subject, key) that is free or whose holder has expired; else the holder stays.
_CLAIM = (
    f"INSERT INTO idempotency_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (subject, idempotency_key) DO UPDATE SET fingerprint = excluded.fingerprint, "
    "upload_id = excluded.upload_id, created_at = excluded.created_at, expires_at = excluded.expires_at "
    f"WHERE idempotency_keys.expires_at <= excluded.created_at RETURNING {_KEY_COLUMNS}"
)


def _row_to_key(row: sqlite3.Row) -> IdempotencyKey:
    subject, key, fingerprint, upload_id, created, expires = tuple(row)
    return IdempotencyKey(
        subject=str(subject),
        key=str(key),
        fingerprint=str(fingerprint),
        upload_id=str(upload_id),
        created_at=datetime.fromisoformat(str(created)),
        expires_at=datetime.fromisoformat(str(expires)),
    )


def _ts(value: datetime | None) -> str | None:
    # Always UTC: list_expired compares these strings, and text order is time order only in one zone.
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value is not None else None


def _row_to_upload(row: sqlite3.Row | tuple[object, ...]) -> Upload:
    (id_, length, offset, metadata, state, kind, parts, created, updated, expires, pending, owner, name) = tuple(row)
    return Upload(
        id=str(id_),
        length=None if length is None else int(str(length)),
        offset=int(str(offset)),
        metadata=str(metadata),
        state=UploadState(str(state)),
        kind=UploadKind(str(kind)),
        parts=tuple(json.loads(str(parts))),
        created_at=datetime.fromisoformat(str(created)),
        updated_at=datetime.fromisoformat(str(updated)),
        expires_at=None if expires is None else datetime.fromisoformat(str(expires)),
        completion_pending=bool(pending),
        owner_id=None if owner is None else str(owner),
        owner_name=None if name is None else str(name),
    )


class SQLiteSessionStore:
    """The uploads table of an SQLite file; on ``database``, the saga store's connection when app.py shares one."""

    def __init__(self, database: str | SQLiteDatabase) -> None:
        self.database = SQLiteDatabase(database) if isinstance(database, str) else database
        self._open = False
        self.auditor: Auditor = LOG_ONLY  # app.py hands over the one it built
        self.progress = ProgressBus()  # and the progress bus

    @property
    def db(self) -> aiosqlite.Connection:
        db = self.database.connection
        if not self._open or db is None:
            raise StoreError("the SQLite session store is not open")
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
            await self._fetchone("SELECT 1")
        except (sqlite3.Error, StoreError):
            return False
        return True

    # Every statement holds the database's lock until it has run to its end (see sqlitedb.py for why):
    # executed, fetched and closed in one hop to aiosqlite's thread.

    async def _fetchone(self, sql: str, params: Iterable[object] = ()) -> sqlite3.Row | None:
        async with self.database.lock:
            rows = list(await self.db.execute_fetchall(sql, tuple(params)))
        return rows[0] if rows else None

    async def _fetchall(self, sql: str, params: Iterable[object] = ()) -> list[Upload]:
        async with self.database.lock:
            rows = await self.db.execute_fetchall(sql, tuple(params))
        return [_row_to_upload(r) for r in rows]

    async def _audited(self, event: AuditEvent, sql: str, params: tuple[object, ...]) -> sqlite3.Row | None:
        """Run ``sql`` and write ``event``'s row in one transaction; publish the event once it is committed
        (and only when the statement changed something: it returned a row)."""

        def audited(db: sqlite3.Connection) -> sqlite3.Row | None:
            rows = db.execute(sql, params).fetchall()  # to its end: a pending statement would hold COMMIT up
            row: sqlite3.Row | None = rows[0] if rows else None
            if row is not None:
                audit_rows.insert_sqlite(db, event)
            return row

        row = await self.database.transaction(lambda: self.db, audited)
        if row is not None:
            await self.auditor.published(event)
        return row

    async def record_audit(self, event: AuditEvent) -> None:
        await self.database.transaction(lambda: self.db, lambda db: audit_rows.insert_sqlite(db, event))
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
        async with self.database.lock:
            return await audit_rows.list_sqlite(self.db, AuditQuery(since, until, limit, subject, upload_id))

    async def create(self, upload: Upload, audit: AuditEvent | None = None) -> None:
        upload = upload.as_stored()
        values = (
            upload.id,
            upload.length,
            upload.offset,
            upload.metadata,
            upload.state.value,
            upload.kind.value,
            json.dumps(list(upload.parts)),
            _ts(upload.created_at),
            _ts(upload.updated_at),
            _ts(upload.expires_at),
            int(upload.completion_pending),
            upload.owner_id,
            upload.owner_name,
        )

        sql = f"INSERT INTO uploads ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        try:
            if audit is None:
                await self._fetchone(sql, values)
            else:
                await self._audited(audit, f"{sql} RETURNING id", values)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"upload {upload.id} already exists") from exc

    async def claim_idempotency_key(self, claim: IdempotencyKey) -> IdempotencyKey:
        values = (claim.subject, claim.key, claim.fingerprint, claim.upload_id)
        while True:
            row = await self._fetchone(_CLAIM, (*values, _ts(claim.created_at), _ts(claim.expires_at)))
            if row is None:  # held: read the holder (gone meanwhile: claim again)
                row = await self._fetchone(
                    f"SELECT {_KEY_COLUMNS} FROM idempotency_keys WHERE subject = ? AND idempotency_key = ?",
                    (claim.subject, claim.key),
                )
            if row is not None:
                return _row_to_key(row)

    async def release_idempotency_key(self, subject: str, key: str, upload_id: str) -> None:
        await self._fetchone(
            "DELETE FROM idempotency_keys WHERE subject = ? AND idempotency_key = ? AND upload_id = ?",
            (subject, key, upload_id),
        )

    async def forget_expired_idempotency_keys(self, now: datetime) -> int:
        async with (
            self.database.lock,
            self.db.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (_ts(now),)) as cursor,
        ):
            return cursor.rowcount

    async def get(self, upload_id: str) -> Upload | None:
        row = await self._fetchone(f"SELECT {_COLUMNS} FROM uploads WHERE id = ?", (upload_id,))
        return None if row is None else _row_to_upload(row)

    async def get_many(self, upload_ids: list[str]) -> dict[str, Upload]:
        if not upload_ids:
            return {}
        marks = ",".join("?" * len(upload_ids))
        uploads = await self._fetchall(f"SELECT {_COLUMNS} FROM uploads WHERE id IN ({marks})", upload_ids)
        return {u.id: u for u in uploads}

    async def _update_returning(self, sql: str, params: tuple[object, ...]) -> Upload | None:
        row = await self._fetchone(f"{sql} RETURNING {_COLUMNS}", params)
        return None if row is None else _row_to_upload(row)

    async def commit_offset(
        self, upload_id: str, expected: int, offset: int, updated_at: datetime, expires_at: datetime | None
    ) -> Upload | None:
        committed = await self._update_returning(
            f"UPDATE uploads SET upload_offset = ?, updated_at = ?, expires_at = ?, {_COMPLETES} "
            "WHERE id = ? AND upload_offset = ? AND state = 'active'",
            (offset, _ts(updated_at), _ts(expires_at), offset, offset, upload_id, expected),
        )
        if committed is not None:
            await self.progress.publish(ProgressEvent.committed(committed))
        return committed

    async def set_length(self, upload_id: str, length: int) -> Upload | None:
        return await self._update_returning(
            # A length equal to the offset completes the upload, as a commit reaching it would.
            "UPDATE uploads SET upload_length = ?, "
            "state = CASE WHEN upload_offset = ? AND state = 'active' THEN 'complete' ELSE state END, "
            "completion_pending = CASE WHEN upload_offset = ? AND state = 'active' AND kind <> 'partial' "
            "THEN 1 ELSE completion_pending END "
            "WHERE id = ? AND upload_length IS NULL AND upload_offset <= ?",
            (length, length, length, upload_id, length),
        )

    async def set_state(
        self,
        upload_id: str,
        state: UploadState,
        *,
        only_from: UploadState | None = None,
        audit: AuditEvent | None = None,
    ) -> Upload | None:
        sql, params = "UPDATE uploads SET state = ? WHERE id = ?", (state.value, upload_id)
        params_: tuple[object, ...] = params
        if only_from is not None:
            sql, params_ = f"{sql} AND state = ?", (*params, only_from.value)
        if audit is None:
            changed = await self._update_returning(sql, params_)
        else:
            row = await self._audited(audit, f"{sql} RETURNING {_COLUMNS}", params_)
            changed = None if row is None else _row_to_upload(row)
        if changed is not None and (event := ProgressEvent.ended(changed)) is not None:
            await self.progress.publish(event)
        return changed

    async def list_expired(self, now: datetime, limit: int = 500) -> list[Upload]:
        return await self._fetchall(
            f"SELECT {_COLUMNS} FROM uploads WHERE state = 'active' AND expires_at IS NOT NULL "
            "AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (_ts(now), limit),
        )

    async def list_final_uploads_with_part(self, partial_id: str) -> list[Upload]:
        return await self._fetchall(
            f"SELECT {_COLUMNS} FROM uploads WHERE kind = 'final' AND EXISTS "
            "(SELECT 1 FROM json_each(uploads.parts) WHERE json_each.value = ?)",
            (partial_id,),
        )

    async def list_expired_partials(self, now: datetime, limit: int = 500) -> list[Upload]:
        return await self._fetchall(
            f"SELECT {_COLUMNS} FROM uploads WHERE state = 'complete' AND kind = 'partial' "
            "AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (_ts(now), limit),
        )

    async def completion_taken_over(self, upload_id: str) -> None:
        await self._fetchone("UPDATE uploads SET completion_pending = 0 WHERE id = ?", (upload_id,))

    async def list_completion_pending(self, before: datetime, limit: int = 100) -> list[Upload]:
        return await self._fetchall(
            f"SELECT {_COLUMNS} FROM uploads WHERE completion_pending = 1 AND updated_at <= ? "
            "ORDER BY updated_at LIMIT ?",
            (_ts(before), limit),
        )
