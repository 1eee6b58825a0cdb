"""SessionStore on PostgreSQL (asyncpg): upload state shared by every node of a cluster.

Every method is one statement, so one round trip; the schema comes from alembic (``tusingest migrate``)
and ``open`` refuses a database that is not at the head revision.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

import asyncpg

from tusingest.sessions import migrations
from tusingest.sessions.model import Upload, UploadKind, UploadState
from tusingest.sessions.store import DatabaseNotMigrated, StoreError

_COLUMNS = "id, upload_length, upload_offset, metadata, state, kind, parts, created_at, updated_at, expires_at"


def database_name(database_url: str) -> str:
    parts = urlsplit(database_url)
    # asyncpg falls back to the user name when the URL names no database, and so does libpq.
    return parts.path.lstrip("/") or parse_qs(parts.query).get("dbname", [""])[0] or parts.username or "(default)"


def check_revision(database_url: str, at: str | None) -> None:
    """Refuse a database that is not at the head revision, telling the operator what to do."""
    head = migrations.head_revision()
    if at == head:
        return
    name = database_name(database_url)
    if at is not None and not migrations.is_known_revision(at):
        # Telling the operator to migrate would be wrong: a newer tusingest already did.
        raise StoreError(
            f"database {name} is at revision {at}, which this tusingest does not know (head is {head}): "
            "it was migrated by a newer version"
        )
    raise DatabaseNotMigrated(
        f"database {name} is not migrated (at {at or 'nothing'}, head is {head}): run `tusingest migrate`"
    )


def describe_database(database_url: str) -> str:
    """``<db> on <host:port>`` for messages an operator reads: never the user or password."""
    parts = urlsplit(database_url)
    hosts = parts.netloc.rpartition("@")[2] or parse_qs(parts.query).get("host", ["localhost"])[0]
    return f"database {database_name(database_url)} on {hosts}"


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
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset hook: the store never changes session state, so skip the default reset's extra round trip."""


class PostgresSessionStore:
    def __init__(
        self,
        database_url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        ping_timeout: float = 5.0,
    ) -> None:
        if not database_url.startswith(("postgresql://", "postgres://")):
            # The URL may carry a password: name only its scheme.
            scheme = database_url.partition(":")[0]
            raise ValueError(f"PostgreSQL DATABASE_URL must start with postgresql:// or postgres://, not {scheme}:")
        self.database_url = database_url
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.ping_timeout = ping_timeout
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the PostgreSQL session store is not open")
        return self._pool

    async def open(self) -> None:
        where = describe_database(self.database_url)
        try:
            pool = await asyncpg.create_pool(
                self.database_url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                reset=_keep_session,
                server_settings={"application_name": "tusingest"},
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL {where}: {exc}") from exc
        try:
            async with pool.acquire() as connection:
                at = await migrations.read_revision(connection)
            check_revision(self.database_url, at)
        except BaseException:
            pool.terminate()  # nothing was handed out yet, and a cancelled open must not wait on a graceful close
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(self.command_timeout):
                await pool.close()
        except TimeoutError:
            # A connection still checked out (a stuck request) must not hang shutdown.
            pool.terminate()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.ping_timeout):
                await self.pool.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, StoreError):
            return False
        return True

    async def create(self, upload: Upload) -> None:
        try:
            await self.pool.execute(
                f"INSERT INTO uploads ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
            )
        except asyncpg.UniqueViolationError as exc:
            raise StoreError(f"upload {upload.id} already exists") from exc

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
        return await self._update_returning(
            "UPDATE uploads SET upload_offset = $1, updated_at = $2, expires_at = $3 "
            "WHERE id = $4 AND upload_offset = $5 AND state = 'active'",
            offset,
            updated_at,
            expires_at,
            upload_id,
            expected,
        )

    async def set_length(self, upload_id: str, length: int) -> Upload | None:
        return await self._update_returning(
            "UPDATE uploads SET upload_length = $1 WHERE id = $2 AND upload_length IS NULL AND upload_offset <= $1",
            length,
            upload_id,
        )

    async def set_state(
        self, upload_id: str, state: UploadState, *, only_from: UploadState | None = None
    ) -> Upload | None:
        if only_from is None:
            return await self._update_returning("UPDATE uploads SET state = $1 WHERE id = $2", state.value, upload_id)
        return await self._update_returning(
            "UPDATE uploads SET state = $1 WHERE id = $2 AND state = $3", state.value, upload_id, only_from.value
        )

    async def list_expired(self, now: datetime, limit: int = 500) -> list[Upload]:
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM uploads WHERE state = 'active' AND expires_at IS NOT NULL "
            "AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
            now,
            limit,
        )
        return [_row_to_upload(r) for r in rows]

    async def list_final_uploads_with_part(self, partial_id: str) -> list[Upload]:
        # `parts @> ARRAY[...]` rather than `= ANY(parts)`: the containment form can use the GIN index.
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM uploads WHERE kind = 'final' AND parts @> ARRAY[$1::text]", partial_id
        )
        return [_row_to_upload(r) for r in rows]
