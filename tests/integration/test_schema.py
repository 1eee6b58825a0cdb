"""One schema source: the alembic scripts build SQLite as they build PostgreSQL, and upgrade both.

Covers what the stores' contract suites do not: that both databases agree, that SQLite files made by the
stores' old hand-written DDL are adopted, that an SQLite file behind the head is upgraded when opened,
and that opening a file at the head costs no alembic import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from alembic import command

from tusingest.saga.sqlite import SQLiteSagaStore
from tusingest.sessions import migrations
from tusingest.sessions.model import Upload, UploadState
from tusingest.sessions.sqlite import SQLiteSessionStore
from tusingest.sessions.sqlitedb import SQLiteDatabase

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)

# SQLite's column affinity of each PostgreSQL type, as the stores keep it (times as ISO text, lists and JSON
# as JSON text, booleans as 0/1).
AFFINITY_OF_POSTGRES_TYPE = {
    "text": "TEXT",
    "character varying": "TEXT",
    "bigint": "INTEGER",
    "integer": "INTEGER",
    "boolean": "INTEGER",
    "timestamp with time zone": "TEXT",
    "jsonb": "TEXT",
    "ARRAY": "TEXT",
}

# The stores' DDL before alembic built SQLite, as tusingest 7955399 wrote it: user_version 1 had no
# completion_pending, user_version 2 added it; the saga store added its tables on its first open.
OLD_UPLOADS_V1 = """
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
    expires_at    TEXT
);
CREATE INDEX IF NOT EXISTS uploads_expiry ON uploads (state, expires_at);
INSERT INTO uploads VALUES ('kept', 10, 10, '', 'complete', 'single', '[]', '2025-01-01T00:00:00.000000+00:00',
                            '2025-01-01T00:00:00.000000+00:00', NULL);
PRAGMA user_version = 1;
"""
OLD_UPLOADS_V2 = """
ALTER TABLE uploads ADD COLUMN completion_pending INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS uploads_completion_pending ON uploads (updated_at) WHERE completion_pending = 1;
PRAGMA user_version = 2;
"""
OLD_SAGA_TABLES = """
CREATE TABLE IF NOT EXISTS sagas (
    saga_id          TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    subject_id       TEXT NOT NULL,
    state            TEXT NOT NULL
                     CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'failed')),
    step             TEXT,
    data             TEXT NOT NULL DEFAULT '{}',
    attempts         INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error            TEXT,
    owner            TEXT,
    lease_expires_at TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS sagas_one_unfinished ON sagas (kind, subject_id)
    WHERE state IN ('running', 'compensating');
CREATE INDEX IF NOT EXISTS sagas_by_subject ON sagas (kind, subject_id, created_at);
CREATE INDEX IF NOT EXISTS sagas_by_lease ON sagas (state, lease_expires_at);
CREATE TABLE IF NOT EXISTS files (
    file_id             TEXT PRIMARY KEY,
    upload_id           TEXT,
    original_filename   TEXT NOT NULL,
    storage_filename    TEXT NOT NULL,
    storage_element_id  TEXT NOT NULL,
    storage_key         TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    stored_size_bytes   INTEGER NOT NULL,
    content_type        TEXT NOT NULL,
    content_encoding    TEXT,
    md5                 TEXT NOT NULL,
    sha256              TEXT NOT NULL,
    created_by_id       TEXT,
    created_by_username TEXT NOT NULL,
    retention_policy    TEXT,
    description         TEXT,
    metadata            TEXT NOT NULL DEFAULT '{}',
    uploaded_at         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_upload ON files (upload_id);
CREATE TABLE IF NOT EXISTS outbox (
    message_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    destination     TEXT NOT NULL,
    payload         TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    delivered_at    TEXT,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL;
INSERT INTO sagas (saga_id, kind, subject_id, state, created_at, updated_at) VALUES
    ('s1', 'upload', 'kept', 'completed', '2025-01-01T00:00:00.000000+00:00', '2025-01-01T00:00:00.000000+00:00');
"""
OLD_FILES = {
    "v1": OLD_UPLOADS_V1,
    "v1 with saga tables": OLD_UPLOADS_V1 + OLD_SAGA_TABLES,
    "v2": OLD_UPLOADS_V1 + OLD_UPLOADS_V2,
    "v2 with saga tables": OLD_UPLOADS_V1 + OLD_SAGA_TABLES + OLD_UPLOADS_V2,
}

Columns = dict[str, dict[str, tuple[str, bool]]]  # table -> column -> (affinity, nullable)


def affinity(declared: str) -> str:
    """SQLite's rules (https://www.sqlite.org/datatype3.html#determination_of_column_affinity)."""
    declared = declared.upper()
    if "INT" in declared:
        return "INTEGER"
    if any(word in declared for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if declared == "" or "BLOB" in declared:
        return "BLOB"
    if any(word in declared for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def sqlite_columns(path: Path) -> Columns:
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            table: {
                # A PRIMARY KEY column is NOT NULL in PostgreSQL; SQLite's old DDL left TEXT keys nullable.
                name: (affinity(declared), not notnull and not pk)
                for _, name, declared, notnull, _, pk in db.execute(f"PRAGMA table_info({table})")
            }
            for table in tables
            if table != "sqlite_sequence"  # SQLite's own AUTOINCREMENT bookkeeping
        }


def sqlite_indexes(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        return {name: table for name, table in rows}


async def postgres_columns(url: str) -> Columns:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        )
    finally:
        await connection.close()
    columns: Columns = {}
    for row in rows:
        kind = AFFINITY_OF_POSTGRES_TYPE[row["data_type"]]
        columns.setdefault(row["table_name"], {})[row["column_name"]] = (kind, row["is_nullable"] == "YES")
    return columns


async def postgres_indexes(url: str) -> dict[str, str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT indexname, tablename FROM pg_indexes WHERE schemaname = current_schema() "
            "AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_pkc'"
        )
    finally:
        await connection.close()
    return {row["indexname"]: row["tablename"] for row in rows}


async def open_both(path: Path) -> tuple[SQLiteSessionStore, SQLiteSagaStore]:
    """The two stores on one SQLiteDatabase, as app.py builds them."""
    database = SQLiteDatabase(f"sqlite:///{path}")
    sessions, sagas = SQLiteSessionStore(database), SQLiteSagaStore(database)
    await sessions.open()
    await sagas.open()
    return sessions, sagas


async def close_both(sessions: SQLiteSessionStore, sagas: SQLiteSagaStore) -> None:
    await sagas.close()
    await sessions.close()


def revision_of(path: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return migrations.read_sqlite_revision(db)


async def test_sqlite_and_postgres_have_the_same_tables_columns_nullability_and_affinity(
    postgres_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "new.db"
    await close_both(*await open_both(path))

    assert sqlite_columns(path) == await postgres_columns(postgres_url)
    # Every index but the GIN one over parts (SQLite has no GIN; its json_each lookup reads the final uploads).
    assert sqlite_indexes(path) == {
        name: table for name, table in (await postgres_indexes(postgres_url)).items() if name != "uploads_final_parts"
    }


@pytest.mark.parametrize("old", OLD_FILES)
async def test_sqlite_file_made_by_the_old_ddl_is_adopted_keeps_its_rows_and_matches_a_new_file(
    old: str, tmp_path: Path
) -> None:
    adopted, new = tmp_path / "old.db", tmp_path / "new.db"
    with contextlib.closing(sqlite3.connect(adopted)) as db:
        db.executescript(OLD_FILES[old])
    await close_both(*await open_both(new))

    sessions, sagas = await open_both(adopted)
    try:
        kept = await sessions.get("kept")
        upload = Upload(id="b" * 32, length=5, created_at=T0, updated_at=T0)
        await sessions.create(upload)
        completed = await sessions.commit_offset(upload.id, 0, 5, T0, None)
        saga = await sagas.create_saga("upload", upload.id, {}, owner="node", lease_seconds=60)
    finally:
        await close_both(sessions, sagas)

    assert kept is not None and (kept.offset, kept.state, kept.completion_pending) == (10, UploadState.COMPLETE, False)
    assert completed is not None and completed.completion_pending
    assert saga.subject_id == upload.id
    assert revision_of(adopted) == migrations.head_revision()
    assert sqlite_columns(adopted) == sqlite_columns(new)
    assert sqlite_indexes(adopted) == sqlite_indexes(new)


async def test_sqlite_file_at_an_older_revision_is_upgraded_when_opened_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "behind.db"
    url = f"sqlite:///{path}"
    await migrations.upgrade_async(url, "0002")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO uploads (id, upload_length, upload_offset, state, created_at, updated_at) "
            "VALUES ('kept', 10, 4, 'active', '2025-01-01T00:00:00.000000+00:00', '2025-01-01T00:00:00.000000+00:00')"
        )

    store = SQLiteSessionStore(url)
    await store.open()
    try:
        kept = await store.get("kept")
        completed = await store.commit_offset("kept", 4, 10, T0, None)
    finally:
        await store.close()

    assert revision_of(path) == migrations.head_revision()
    assert kept is not None and (kept.offset, kept.completion_pending) == (4, False)
    assert completed is not None and completed.completion_pending


async def test_sqlite_file_downgraded_and_upgraded_again_is_back_at_head_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "roundtrip.db"
    url = f"sqlite:///{path}"
    store = SQLiteSessionStore(url)
    await store.open()
    await store.create(Upload(id="k" * 32, length=3, created_at=T0, updated_at=T0))
    await store.close()

    # 0003's downgrade drops a column: SQLite needs the batch (copy the table) path for that.
    await asyncio.to_thread(command.downgrade, migrations.alembic_config(url), "0002")
    assert "completion_pending" not in sqlite_columns(path)["uploads"]
    await store.open()
    try:
        kept = await store.get("k" * 32)
    finally:
        await store.close()

    assert revision_of(path) == migrations.head_revision()
    assert kept is not None and kept.length == 3


async def test_opening_an_sqlite_file_at_head_imports_neither_alembic_nor_sqlalchemy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'head.db'}"
    await migrations.upgrade_async(url)
    code = (
        "import asyncio, sys\n"
        "from tusingest.sessions.sqlite import SQLiteSessionStore\n"
        "async def main():\n"
        "    store = SQLiteSessionStore(sys.argv[1])\n"
        "    await store.open()\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'sqlalchemy')))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()

    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "[]"


async def test_migrate_started_by_several_processes_on_one_new_sqlite_file_succeeds_in_each(tmp_path: Path) -> None:
    path = tmp_path / "data" / "tusingest.db"  # the directory does not exist yet either
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{path}"}
    nodes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tusingest", "migrate", env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]

    errors = [(await node.communicate())[1].decode() for node in nodes]

    assert [node.returncode for node in nodes] == [0, 0, 0], errors
    assert revision_of(path) == migrations.head_revision()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
