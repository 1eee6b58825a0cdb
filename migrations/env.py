"""Alembic environment: runs the migrations against the PostgreSQL database named by DATABASE_URL.

The URL comes from ``config.attributes["database_url"]`` (set by ``tusingest migrate``), the
``sqlalchemy.url`` main option, or the DATABASE_URL environment variable, in that order.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
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
    if url.startswith("postgresql+asyncpg://"):
        return str(url)
    raise RuntimeError(f"migrations are for PostgreSQL only; DATABASE_URL must start with postgresql://, got {url!r}")


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    context.configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    # Every node of a cluster may run `tusingest migrate` at start: the first one migrates, the
    # others wait here and then find nothing to do. The session lock ends with the connection.
    connection.execute(text("SELECT pg_advisory_lock(hashtext('tusingest migrations'))"))
    connection.commit()
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_async_engine(database_url(), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
