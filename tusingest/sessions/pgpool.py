"""One asyncpg pool on a migrated database: what every PostgreSQL store opens, pings and closes.

``open`` refuses a database that is not at the head revision (``tusingest migrate``); ``close``
never hangs on a connection a stuck request still holds.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import asyncpg

from tusingest.sessions import migrations
from tusingest.sessions.store import DatabaseNotMigrated, StoreError


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


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset hook: the stores never change session state, so skip the default reset's extra round trip."""


class PostgresDatabase:
    """Base of the PostgreSQL stores; ``what`` names the store in messages."""

    what = "store"
    default_max_size = 10

    def __init__(
        self,
        database_url: str,
        *,
        min_size: int = 1,
        max_size: int | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        ping_timeout: float = 5.0,
    ) -> None:
        self.database_url = database_url
        self.min_size = min_size
        self.max_size = max_size or self.default_max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.ping_timeout = ping_timeout
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError(f"the PostgreSQL {self.what} is not open")
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
            # A connection still checked out (a stuck request or saga step) must not hang shutdown.
            pool.terminate()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.ping_timeout):
                await self.pool.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, StoreError):
            return False
        return True
