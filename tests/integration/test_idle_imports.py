"""A server on embedded defaults (SQLite, no Redis, no JWKS, no webhooks) never loads the clients it does
not use: asyncpg, redis, aiohttp and werkzeug cost about 19 MiB of resident memory together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NOT_NEEDED = ("asyncpg", "redis", "aiohttp", "werkzeug")

STARTED = """
import asyncio, json, sys
from tusingest.app import build_app
from tusingest.config import load_settings

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
