"""The embedded SQLite database file: one connection, shared by the SQLite session store and saga store.

With one connection per process there is one writer per process. Two connections on one file (as before)
made a write that waited for the other connection's transaction fail with "database is locked" (a stale
snapshot, which busy_timeout does not cover), and needed retries; one connection has nobody to wait for.
Every statement runs under ``lock``: that orders the stores' statements, keeps one store's statement out of
the other's open transaction, and keeps a cursor's read snapshot from spanning another statement's write.
A transaction (or any group of statements) runs as one function in aiosqlite's thread: one hop there and
back, so the lock is held for one trip instead of one per statement plus BEGIN and COMMIT.
busy_timeout still covers other processes on the same file (`tusingest cleanup` beside a server).

The schema comes from the alembic scripts (migrations/), as on PostgreSQL. Opening checks the file's
revision without importing alembic; only a new file, one that is behind or one the stores' old DDL made
(PRAGMA user_version 1 or 2, adopted by ``migrations.upgrade``) pays for alembic and SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite

from tusingest.sessions import migrations
from tusingest.sessions.store import StoreError

# Another process writing the same file is waited for this long before a write gives up.
BUSY_TIMEOUT_MS = 30_000


def _file_revision(path: str) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return migrations.read_sqlite_revision(db)


async def _to_the_end[T](statements: Awaitable[T]) -> T:
    """Await statements handed to aiosqlite's thread; if cancelled meanwhile, wait for them to finish anyway
    (they run regardless, and the lock must not be released under them), then re-raise."""
    running = asyncio.ensure_future(statements)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


def _in_transaction[T](db: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """BEGIN IMMEDIATE, ``body``, COMMIT; ROLLBACK when anything raises (in aiosqlite's thread)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = body(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.OperationalError):
                db.execute("ROLLBACK")
        raise
    return result


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

    async def run[T](
        self, connection: Callable[[], aiosqlite.Connection], statements: Callable[[sqlite3.Connection], T]
    ) -> T:
        """``statements(db)`` under ``lock``, in one hop to aiosqlite's thread, each statement committing by
        itself, on the store's ``connection()`` (which raises once that store is closed; asked under the
        lock, so a store closed meanwhile runs nothing)."""
        async with self.lock:
            db = connection()
            # aiosqlite has no public "run this in the connection's thread"; _execute is what its own
            # methods use, and _conn is the sqlite3 connection they run on (the contract suites hold both).
            done: T = await _to_the_end(db._execute(statements, db._conn))  # type: ignore[no-untyped-call]
            return done

    async def transaction[T](
        self, connection: Callable[[], aiosqlite.Connection], body: Callable[[sqlite3.Connection], T]
    ) -> T:
        """BEGIN IMMEDIATE, ``body(db)``, COMMIT (ROLLBACK when it raises) as ``run`` does: in one hop.

        IMMEDIATE takes the write lock up front, so a read-then-write transaction never meets another
        process's newer snapshot half-way (which SQLite answers with SQLITE_BUSY instead of waiting).

        The whole runs to its end even when the caller is cancelled meanwhile: handed to aiosqlite's
        thread, it finishes regardless, and the lock is kept until it has (no half-open transaction is
        left for the next caller). The caller's cancellation is raised once it has.
        """
        return await self.run(connection, lambda db: _in_transaction(db, body))
