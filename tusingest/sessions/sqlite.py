"""SessionStore on SQLite: the embedded default for a single process.

WAL with synchronous=NORMAL: a power cut may lose the last commits, which only moves an
offset back (the bytes past it are garbage, invariant 1); it never moves one forward falsely.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from tusingest.sessions.model import Upload, UploadKind, UploadState
from tusingest.sessions.store import StoreError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id            TEXT PRIMARY KEY,
    upload_length INTEGER,
    upload_offset INTEGER NOT NULL DEFAULT 0,
    metadata      TEXT NOT NULL DEFAULT '',
    state         TEXT NOT NULL,
    kind          TEXT NOT NULL DEFAULT 'single',
    parts         TEXT NOT NULL DEFAULT '[]',
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    expires_at    TEXT,
    completion_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS uploads_expiry ON uploads (state, expires_at);
CREATE INDEX IF NOT EXISTS uploads_completion_pending ON uploads (updated_at) WHERE completion_pending = 1;
"""

# user_version -> the statements that bring a database of that version one step up. A database made by
# _SCHEMA is at SCHEMA_VERSION already; these serve files written by an older tusingest.
_UPGRADES: dict[int, str] = {
    1: "ALTER TABLE uploads ADD COLUMN completion_pending INTEGER NOT NULL DEFAULT 0;",
}

_SNAPSHOT_RETRIES = 50
_COLUMNS = (
    "id, upload_length, upload_offset, metadata, state, kind, parts, created_at, updated_at, expires_at, "
    "completion_pending"
)
# The commit that reaches the length completes the upload in the same statement (see SessionStore.commit_offset).
_COMPLETES = (
    "state = CASE WHEN upload_length = ? THEN 'complete' ELSE state END, "
    "completion_pending = CASE WHEN upload_length = ? AND kind <> 'partial' THEN 1 ELSE completion_pending END"
)


def _ts(value: datetime | None) -> str | None:
    # Always UTC: list_expired compares these strings, and text order is time order only in one zone.
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value is not None else None


def _row_to_upload(row: sqlite3.Row | tuple[object, ...]) -> Upload:
    (id_, length, offset, metadata, state, kind, parts, created, updated, expires, pending) = tuple(row)
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
    )


async def _retry_on_stale_snapshot[T](statement: Callable[[], Awaitable[T]]) -> T:
    """Run a one-statement write, again when SQLite reports the database locked.

    The saga store writes to the same file from its own connection. A write here that had to wait
    for the saga store's transaction finds its read snapshot stale once that commits, and SQLite
    answers SQLITE_BUSY_SNAPSHOT at once instead of waiting (busy_timeout does not apply). Nothing
    was written, and the statement succeeds on a fresh snapshot.
    """
    for attempt in range(_SNAPSHOT_RETRIES):
        try:
            return await statement()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _SNAPSHOT_RETRIES - 1:
                raise
            await asyncio.sleep(min(0.05, 0.001 * 2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


class SQLiteSessionStore:
    def __init__(self, database_url: str) -> None:
        path = database_url.removeprefix("sqlite:///").removeprefix("sqlite://")
        if not path:
            raise ValueError("sqlite DATABASE_URL needs a file path, e.g. sqlite:///./data/tusingest.db")
        self.path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the SQLite session store is not open")
        return self._db

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            # The saga store writes to the same file from its own connection: wait for it, do not fail.
            await self._db.execute("PRAGMA busy_timeout=30000")
            await self._migrate(self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        """Create the schema, or bring a file of an older version up to SCHEMA_VERSION step by step."""
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        async with db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'uploads'") as cursor:
            exists = await cursor.fetchone() is not None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the SQLite database is at schema version {version}; this tusingest knows only {SCHEMA_VERSION}"
            )
        if exists:
            for step in range(max(version, 1), SCHEMA_VERSION):
                await db.executescript(f"BEGIN IMMEDIATE; {_UPGRADES[step]} PRAGMA user_version={step + 1}; COMMIT;")
        await db.executescript(_SCHEMA)
        await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def ping(self) -> bool:
        try:
            await self.db.execute("SELECT 1")
        except (sqlite3.Error, StoreError):
            return False
        return True

    async def create(self, upload: Upload) -> None:
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
        )

        async def run() -> None:
            await self.db.execute(f"INSERT INTO uploads ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", values)

        try:
            await _retry_on_stale_snapshot(run)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"upload {upload.id} already exists") from exc

    async def get(self, upload_id: str) -> Upload | None:
        async with self.db.execute(f"SELECT {_COLUMNS} FROM uploads WHERE id = ?", (upload_id,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _row_to_upload(row)

    async def get_many(self, upload_ids: list[str]) -> dict[str, Upload]:
        if not upload_ids:
            return {}
        marks = ",".join("?" * len(upload_ids))
        async with self.db.execute(f"SELECT {_COLUMNS} FROM uploads WHERE id IN ({marks})", upload_ids) as cursor:
            rows = await cursor.fetchall()
        return {u.id: u for u in map(_row_to_upload, rows)}

    async def _update_returning(self, sql: str, params: tuple[object, ...]) -> Upload | None:
        async def run() -> sqlite3.Row | None:
            async with self.db.execute(f"{sql} RETURNING {_COLUMNS}", params) as cursor:
                return await cursor.fetchone()

        row = await _retry_on_stale_snapshot(run)
        return None if row is None else _row_to_upload(row)

    async def commit_offset(
        self, upload_id: str, expected: int, offset: int, updated_at: datetime, expires_at: datetime | None
    ) -> Upload | None:
        return await self._update_returning(
            f"UPDATE uploads SET upload_offset = ?, updated_at = ?, expires_at = ?, {_COMPLETES} "
            "WHERE id = ? AND upload_offset = ? AND state = 'active'",
            (offset, _ts(updated_at), _ts(expires_at), offset, offset, upload_id, expected),
        )

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
        self, upload_id: str, state: UploadState, *, only_from: UploadState | None = None
    ) -> Upload | None:
        if only_from is None:
            return await self._update_returning("UPDATE uploads SET state = ? WHERE id = ?", (state.value, upload_id))
        return await self._update_returning(
            "UPDATE uploads SET state = ? WHERE id = ? AND state = ?", (state.value, upload_id, only_from.value)
        )

    async def list_expired(self, now: datetime, limit: int = 500) -> list[Upload]:
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM uploads WHERE state = 'active' AND expires_at IS NOT NULL "
            "AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (_ts(now), limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_row_to_upload(r) for r in rows]

    async def list_final_uploads_with_part(self, partial_id: str) -> list[Upload]:
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM uploads WHERE kind = 'final' AND EXISTS "
            "(SELECT 1 FROM json_each(uploads.parts) WHERE json_each.value = ?)",
            (partial_id,),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_row_to_upload(r) for r in rows]

    async def list_expired_partials(self, now: datetime, limit: int = 500) -> list[Upload]:
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM uploads WHERE state = 'complete' AND kind = 'partial' "
            "AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (_ts(now), limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_row_to_upload(r) for r in rows]

    async def completion_taken_over(self, upload_id: str) -> None:
        async def run() -> None:
            await self.db.execute("UPDATE uploads SET completion_pending = 0 WHERE id = ?", (upload_id,))

        await _retry_on_stale_snapshot(run)

    async def list_completion_pending(self, before: datetime, limit: int = 100) -> list[Upload]:
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM uploads WHERE completion_pending = 1 AND updated_at <= ? "
            "ORDER BY updated_at LIMIT ?",
            (_ts(before), limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_row_to_upload(r) for r in rows]
