"""A server on embedded defaults (SQLite, no Redis, no JWT key, no webhooks) never loads the clients it does
not use: asyncpg, redis, aiohttp and werkzeug cost about 19 MiB of resident memory together, PyJWT and
cryptography about 9 MiB; structlog, with the rich and pygments it imports when they are installed, about
7 MiB (only console lines need it, not JSON lines); and
``tusingest serve`` has a new SQLite file migrated by a child process, so alembic and SQLAlchemy (about
29 MiB) are not loaded for the server's lifetime either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NOT_NEEDED = (
    "asyncpg",
    "redis",
    "aiohttp",
    "werkzeug",
    "jwt",
    "cryptography",
    "botocore",
    "aiobotocore",
    "structlog",
    "rich",  # (pygments is not checked here: this start migrates in process, and alembic's mako imports it)
)

STARTED = """
import asyncio, json, sys
from tusingest.app import build_app
from tusingest.config import load_settings
from tusingest.observability import logs

logs.configure(logs.LogSettings(format="json"))  # what `tusingest serve` does off a terminal
app = build_app(load_settings())

async def started() -> list[str]:
    async with app.router.lifespan_context(app):
        return sorted({name.partition(".")[0] for name in sys.modules})

print(json.dumps(asyncio.run(started())))
"""


def test_a_server_on_embedded_defaults_starts_without_importing_postgres_redis_or_http_clients(
    tmp_path: Path,
) -> None:
    environ = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    done = subprocess.run(
        [sys.executable, "-c", STARTED], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr

    loaded = set(json.loads(done.stdout.splitlines()[-1]))

    assert "tusingest" in loaded
    assert sorted(loaded.intersection(NOT_NEEDED)) == []


SERVE_PREPARES = """
import asyncio, json, sys
from tusingest.cli import _migrate_sqlite_in_child
from tusingest.sessions import migrations
from tusingest.sessions.sqlite import SQLiteSessionStore

async def opened(url: str) -> None:
    await _migrate_sqlite_in_child(url)
    store = SQLiteSessionStore(url)
    await store.open()
    await store.close()

asyncio.run(opened(sys.argv[1]))
print(json.dumps({"alembic": "alembic" in sys.modules, "sqlalchemy": "sqlalchemy" in sys.modules,
                  "at_head": migrations.sqlite_at_head(sys.argv[1])}))
"""


def test_serve_has_a_new_sqlite_file_migrated_by_a_child_and_never_loads_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'tusingest.db'}"
    done = subprocess.run(
        [sys.executable, "-c", SERVE_PREPARES, url], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr

    assert json.loads(done.stdout.splitlines()[-1]) == {"alembic": False, "sqlalchemy": False, "at_head": True}
