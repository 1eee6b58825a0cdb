"""The schema's version: which alembic revision the code needs, which one a database is at, and the
upgrade that `tusingest migrate` runs (and the SQLite stores, when they open a file that is behind).

One set of alembic scripts builds both PostgreSQL and SQLite. They live in migrations/ at the top of the
source tree, and the wheel carries them as tusingest/_migrations (pyproject.toml maps one to the other),
so an installed tusingest migrates its own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import tusingest
from tusingest.sessions.store import StoreError

if TYPE_CHECKING:  # a SQLite server imports neither
    import asyncpg
    from alembic.config import Config
    from asyncpg.pool import PoolConnectionProxy

# The revisions of migrations/versions, newest last. Kept here so that a serving node checks its
# database without importing alembic and SQLAlchemy (about 22 MiB resident and 0.7 s at start);
# tests/unit/test_migrations.py holds these to the scripts.
KNOWN_REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006")
HEAD_REVISION = KNOWN_REVISIONS[-1]

# The SQLite files tusingest made before alembic built them too (the stores' own DDL, PRAGMA user_version 1
# or 2) match these revisions; upgrade() stamps them once and migrates them from there.
_HAND_MADE_UPLOADS = "0001"  # the uploads table
_HAND_MADE_SAGAS = "0002"  # plus sagas, files and outbox
_HAND_MADE_PENDING = "0003"  # plus uploads.completion_pending

# alembic keeps the running migration in module globals (alembic.context), so one upgrade at a time per
# process; other processes wait on the advisory lock taken in env.py.
_upgrade_lock = threading.Lock()

# In a source checkout migrations/ sits beside the package (see DESIGN.md); an installed wheel has it inside.
REPO_ROOT = Path(tusingest.__file__).resolve().parents[1]
PACKAGED_SCRIPTS = Path(tusingest.__file__).resolve().parent / "_migrations"


class MigrationsNotFound(StoreError):
    """The alembic scripts are missing: tusingest runs from an install that did not ship them."""


def scripts_dir() -> Path:
    """The alembic script directory: the wheel's copy, else the source checkout's migrations/."""
    for scripts in (PACKAGED_SCRIPTS, REPO_ROOT / "migrations"):
        if (scripts / "env.py").is_file():
            return scripts
    raise MigrationsNotFound(
        f"cannot find the database migrations: expected {PACKAGED_SCRIPTS}/env.py (installed) "
        f"or {REPO_ROOT}/migrations/env.py (source checkout)"
    )


def alembic_config(database_url: str | None = None) -> Config:
    """alembic's configuration, built here: alembic.ini serves the `alembic` command in a checkout only."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(scripts_dir()))
    config.set_main_option("path_separator", "os")
    config.attributes["skip_logging_config"] = True
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    """The revision this code needs."""
    return HEAD_REVISION


def is_known_revision(revision: str) -> bool:
    """True when ``revision`` is one of our migration scripts (False: a newer tusingest migrated the database)."""
    return revision in KNOWN_REVISIONS


def script_revisions() -> list[str]:
    """The revisions of the alembic scripts on disk, oldest first (imports alembic)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    return [script.revision for script in reversed(list(scripts.walk_revisions()))]


async def read_revision(connection: asyncpg.Connection | PoolConnectionProxy) -> str | None:
    """The revision recorded in ``alembic_version``; None when the database was never migrated."""
    if await connection.fetchval("SELECT to_regclass('alembic_version') IS NULL"):
        return None
    revision: str | None = await connection.fetchval("SELECT version_num FROM alembic_version LIMIT 1")
    return revision


async def current_revision(database_url: str) -> str | None:
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        return await read_revision(connection)
    finally:
        await connection.close()


def sqlite_path(database_url: str) -> str:
    """The file of a ``sqlite:///path`` URL (``sqlite:////abs/path`` for an absolute one)."""
    path = database_url.removeprefix("sqlite:///").removeprefix("sqlite://")
    if not path or path == ":memory:":
        raise ValueError("sqlite DATABASE_URL needs a file path, e.g. sqlite:///./data/tusingest.db")
    return path


def read_sqlite_revision(db: sqlite3.Connection) -> str | None:
    """The revision recorded in an SQLite file's ``alembic_version``; None when alembic never ran on it."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone() is None:
        return None
    row = db.execute("SELECT version_num FROM alembic_version LIMIT 1").fetchone()
    return None if row is None else str(row[0])


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database (PostgreSQL, or an SQLite file) to ``revision``; a no-op when it is there already.

    Synchronous: env.py runs its own event loop, so call this outside one (or use ``upgrade_async``).
    """
    from alembic import command

    with _upgrade_lock:
        config = alembic_config(database_url)
        if database_url.startswith("sqlite:"):
            path = sqlite_path(database_url)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _adopt_hand_made_sqlite(config, path)
        command.upgrade(config, revision)


def _adopt_hand_made_sqlite(config: Config, path: str) -> None:
    """Stamp an SQLite file built by the stores' own DDL with the revision its tables match.

    Such a file has an uploads table and no alembic_version. Its saga tables (made by the saga store's
    first open) and uploads.completion_pending (user_version 2) may each be there or not.
    """
    from alembic import command

    with contextlib.closing(sqlite3.connect(path)) as db:
        if read_sqlite_revision(db) is not None:
            return
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "uploads" not in tables:
            return  # a new file: the upgrade builds it from nothing
        columns = {row[1] for row in db.execute("PRAGMA table_info(uploads)")}
    command.stamp(config, _HAND_MADE_SAGAS if "sagas" in tables else _HAND_MADE_UPLOADS)
    if "completion_pending" in columns:
        # The column came after the saga tables in the scripts but may precede them in a file.
        command.upgrade(config, _HAND_MADE_SAGAS)
        command.stamp(config, _HAND_MADE_PENDING)


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, database_url, revision)


def sqlite_at_head(database_url: str) -> bool:
    """Whether the SQLite file exists and is at the head revision (read without alembic)."""
    path = Path(sqlite_path(database_url))
    if not path.is_file():
        return False
    with contextlib.closing(sqlite3.connect(path)) as db:
        return read_sqlite_revision(db) == HEAD_REVISION


_UPGRADE_IN_CHILD = "import sys; from tusingest.sessions.migrations import upgrade; upgrade(sys.argv[1])"


async def upgrade_in_child(database_url: str) -> str | None:
    """``upgrade`` in a child Python, so that this process never imports alembic and SQLAlchemy (about
    29 MiB, resident for the rest of a server's life). None when it succeeded, else the child's last words."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _UPGRADE_IN_CHILD,
        database_url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await child.communicate()
    if child.returncode == 0:
        return None
    lines = errors.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {child.returncode}"
