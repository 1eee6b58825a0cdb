"""The PostgreSQL schema's version: which alembic revision the code needs, which one a database is at,
and the upgrade that `tusingest migrate` runs.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from asyncpg.pool import PoolConnectionProxy

import tusingest
from tusingest.sessions.store import StoreError

if TYPE_CHECKING:
    from alembic.config import Config

# The revisions of migrations/versions, newest last. Kept here so that a serving node checks its
# database without importing alembic and SQLAlchemy (about 22 MiB resident and 0.7 s at start);
# tests/unit/test_migrations.py holds these to the scripts.
KNOWN_REVISIONS = ("0001", "0002", "0003")
HEAD_REVISION = KNOWN_REVISIONS[-1]

# alembic keeps the running migration in module globals (alembic.context), so one upgrade at a time per
# process; other processes wait on the advisory lock taken in env.py.
_upgrade_lock = threading.Lock()

# migrations/ sits beside the package in the source tree (see DESIGN.md), not inside it.
REPO_ROOT = Path(tusingest.__file__).resolve().parents[1]


class MigrationsNotFound(StoreError):
    """alembic.ini or migrations/ is missing: tusingest runs from an install without its migrations."""


def alembic_config(database_url: str | None = None) -> Config:
    from alembic.config import Config

    ini = REPO_ROOT / "alembic.ini"
    scripts = REPO_ROOT / "migrations"
    if not ini.is_file() or not (scripts / "env.py").is_file():
        raise MigrationsNotFound(
            f"cannot find the database migrations: expected {ini} and {scripts}/env.py next to the tusingest package"
        )
    config = Config(str(ini))
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
    connection = await asyncpg.connect(database_url)
    try:
        return await read_revision(connection)
    finally:
        await connection.close()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database to ``revision``; a no-op when it is there already.

    Synchronous: env.py runs its own event loop, so call this outside one (or use ``upgrade_async``).
    """
    from alembic import command

    with _upgrade_lock:
        command.upgrade(alembic_config(database_url), revision)


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, database_url, revision)
