"""Many uploads finishing at once on the embedded SQLite store: the session store's offset commits
and the saga store's transactions share one database file and must never answer "database is
locked" (benchmarks/load.py --scenario small found that: 200 uploads, 16 in flight)."""

from __future__ import annotations

import asyncio
import os

import httpx

from tests.fixtures.server import OCTETS, TUS, LiveServer

UPLOADS = 300
IN_FLIGHT = 16


async def test_concurrent_small_uploads_all_finalise_on_sqlite(sqlite_server: LiveServer) -> None:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(client: httpx.AsyncClient) -> tuple[int, str | None]:
        async with gate:
            body = os.urandom(64 << 10)
            response = await client.post(
                "/files/",
                headers=TUS | {"Upload-Length": str(len(body)), "Content-Type": OCTETS},
                content=body,
            )
            return response.status_code, response.headers.get("ArtStore-Upload-Status")

    limits = httpx.Limits(max_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=sqlite_server.url, timeout=60, limits=limits) as client:
        results = await asyncio.gather(*(one(client) for _ in range(UPLOADS)))
    assert results == [(201, "completed")] * UPLOADS
    assert await sqlite_server.parts.saga_store.count_files() == UPLOADS
