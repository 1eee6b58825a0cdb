"""The embedded SQLite database file: one connection, shared by the SQLite session store and saga store.

With one connection per process there is one writer per process. Two connections on one file (as before)
made a write that waited for the other connection's transaction fail with "database is locked" (a stale
snapshot, which busy_timeout does not cover), and needed retries; one connection has nobody to wait for.
Every statement runs under ``lock``: that orders the stores' statements, keeps one store's statement out of
the other's open transaction, and keeps a cursor's read snapshot from spanning another statement's write.
busy_timeout still covers other processes on the same file (`tusingest cleanup` beside a server).

The schema comes from the alembic scripts (migrations/), as on PostgreSQL. Opening checks the file's
revision without importing alembic; only a new file, one that is behind or one the stores' old DDL made
(PRAGMA user_version 1 or 2, adopted by ``migrations.upgrade``) pays for alembic and SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from tusingest.sessions import migrations
from tusingest.sessions.store import StoreError

# Another process writing the same file is waited for this long before a write gives up.
BUSY_TIMEOUT_MS = 30_000


def _file_revision(path: str) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return migrations.read_sqlite_revision(db)


async def _to_the_end(statement: Awaitable[object]) -> None:
    """Await a statement; if cancelled meanwhile, wait for it to finish anyway, then re-raise."""
    running = asyncio.ensure_future(statement)
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


class SQLiteDatabase:
    """One SQLite file and its one connection; each store opens and closes it, the last close disconnects."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.path = migrations.sqlite_path(database_url)
        self._db: aiosqlite.Connection | None = None
        self._users = 0
        # Held by every statement and every transaction, of either store.
        self.lock = asyncio.Lock()

    @property
    def connection(self) -> aiosqlite.Connection | None:
        return self._db

    async def open(self) -> None:
        async with self.lock:
            if self._db is None:
                self._db = await self._connect()
            self._users += 1

    async def close(self) -> None:
        async with self.lock:
            self._users = max(0, self._users - 1)
            if self._users == 0 and self._db is not None:
                db, self._db = self._db, None
                await db.close()

    async def _connect(self) -> aiosqlite.Connection:
        try:
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
            await self._bring_to_head()
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            # WAL with synchronous=NORMAL: a power cut may lose the last commits, which only moves an offset
            # back (the bytes past it are garbage, invariant 1); never forward. A process crash loses nothing.
            # FULL would fsync every commit while holding SQLite's one write lock, for every saga step.
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            await db.close()
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        return db

    async def _bring_to_head(self) -> None:
        revision = await asyncio.to_thread(_file_revision, self.path)
        if revision == migrations.head_revision():
            return
        if revision is not None and not migrations.is_known_revision(revision):
            raise StoreError(
                f"the SQLite database {self.path!r} is at schema revision {revision}, which this tusingest does "
                f"not know (it knows up to {migrations.head_revision()}): a newer tusingest migrated it"
            )
        try:
            await migrations.upgrade_async(self.url)
        except StoreError:
            raise
        except Exception as exc:  # alembic and SQLAlchemy raise their own types; the caller needs a StoreError
            raise StoreError(f"cannot migrate SQLite database {self.path!r}: {exc}") from exc

    @asynccontextmanager
    async def transaction(self, connection: Callable[[], aiosqlite.Connection]) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under ``lock``, on the store's ``connection()`` (which raises once that
        store is closed; asked under the lock, so a store closed meanwhile runs nothing).

        IMMEDIATE takes the write lock up front, so a read-then-write transaction never meets another
        process's newer snapshot half-way (which SQLite answers with SQLITE_BUSY instead of waiting).

        BEGIN, COMMIT and ROLLBACK run to their end even when the caller is cancelled meanwhile: a
        statement already handed to aiosqlite's thread finishes regardless, and only once it has do we
        know whether a transaction is open. Otherwise a cancelled BEGIN would leave one open for the
        next caller, and a ROLLBACK after a finished COMMIT would fail and hide the cancellation.
        """
        async with self.lock:
            db = connection()
            try:
                await _to_the_end(db.execute("BEGIN IMMEDIATE"))
                yield db
                await _to_the_end(db.execute("COMMIT"))
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.OperationalError):
                        await _to_the_end(db.execute("ROLLBACK"))
                raise
