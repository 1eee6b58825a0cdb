"""Alembic environment: runs the migrations against the database named by DATABASE_URL, PostgreSQL or SQLite.

The URL comes from ``config.attributes["database_url"]`` (set by ``tusingest migrate`` and by the SQLite
stores when they open a file that is behind), the ``sqlalchemy.url`` main option, or the DATABASE_URL
environment variable, in that order. The same scripts build both; where the dialects differ a script asks
``op.get_context().dialect.name``. A change to an existing SQLite table goes through ``op.batch_alter_table``.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

config = context.config

# Called from inside tusingest, the application owns logging; fileConfig would silence its loggers.
if config.config_file_name is not None and not config.attributes.get("skip_logging_config", False):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = (
        config.attributes.get("database_url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("DATABASE_URL")
    )
    if not url:
        raise RuntimeError("no database URL: set DATABASE_URL=postgresql://user@host/db")
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            # The service talks to PostgreSQL through asyncpg only; no second (sync) driver to install.
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    if url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
        return str(url)
    if url.startswith("sqlite://"):
        # aiosqlite, like the stores: the one SQLite driver the service has.
        return "sqlite+aiosqlite://" + url.removeprefix("sqlite://")
    scheme = url.partition(":")[0]  # the URL may carry a password: name only its scheme
    raise RuntimeError(f"DATABASE_URL must start with postgresql:// or sqlite:///, not {scheme}:")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    url = database_url()
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, render_as_batch=is_sqlite(url))
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if not sqlite:
        # Every node of a cluster may run `tusingest migrate` at start: the first one migrates, the
        # others wait here and then find nothing to do. The session lock ends with the connection.
        # (An SQLite file belongs to one process; tusingest serialises its own upgrades.)
        connection.execute(text("SELECT pg_advisory_lock(hashtext('tusingest migrations'))"))
        connection.commit()
        context.configure(connection=connection, transaction_per_migration=True)
    else:
        # One transaction from reading alembic_version to the last script (see begin_immediately).
        context.configure(connection=connection, transactional_ddl=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def begin_immediately(engine: AsyncEngine) -> None:
    """Make SQLite's DDL transactional, with the file's write lock taken up front.

    The driver opens no transaction for DDL by itself, so every statement would commit (and sync) alone
    and a crash could leave half a script applied. Beginning IMMEDIATE ourselves makes an upgrade one
    transaction that holds the write lock from reading alembic_version on: a second process waits for it
    (busy_timeout) and then finds nothing to do.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN, never; ours below
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):  # as the stores run
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


async def run_migrations_online() -> None:
    url = database_url()
    engine = create_async_engine(url, poolclass=NullPool)
    if is_sqlite(url):
        begin_immediately(engine)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
