"""Rate limits on a live server (tusingest/api/limits.py): creations per address and per subject,
writes at once per subject, and the byte budget, in process memory and in a private Redis.

Without a token the caller is the anonymous identity, so the per-address limits are what tell
callers apart; the per-subject test signs real tokens for two subjects.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.fixtures.jwt import rsa_key, token, write_pem
from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import OCTETS, TUS, LiveServer, base_settings, live_server


@pytest.fixture(params=["memory", "redis"])
def limit_storage(request: pytest.FixtureRequest) -> str | None:
    """REDIS_URL for the limits: none (this process's memory) or a private redis-server."""
    if request.param == "memory":
        return None
    return str(request.getfixturevalue("redis_server").url)


@asynccontextmanager
async def limited_server(tmp_path: Path, **limits: object) -> AsyncIterator[LiveServer]:
    settings = base_settings(tmp_path, f"sqlite:///{tmp_path / 'sessions.db'}", **limits)
    async with live_server(settings) as server:
        yield server


def client_from(server: LiveServer, address: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=server.url, timeout=30, transport=transport)


async def create(client: httpx.AsyncClient, server: LiveServer, length: int = 10, **headers: str) -> httpx.Response:
    return await client.post(server.files_url, headers=TUS | {"Upload-Length": str(length)} | headers)


def assert_retry_after(response: httpx.Response, at_most: int) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["Retry-After"]) <= at_most


async def test_creations_beyond_the_per_address_limit_get_429_and_another_address_is_not_limited(
    tmp_path: Path, limit_storage: str | None
) -> None:
    async with (
        limited_server(tmp_path, rate_limit_creations_per_minute_per_address=2, redis_url=limit_storage) as server,
        client_from(server) as first,
        client_from(server, "127.0.0.2") as second,
    ):
        assert [(await create(first, server)).status_code for _ in range(2)] == [201, 201]
        refused = await create(first, server)
        assert_retry_after(refused, at_most=60)  # the oldest creation leaves the minute's window
        assert refused.headers["Tus-Resumable"] == "1.0.0"
        assert "from this address" in refused.text
        assert (await create(second, server)).status_code == 201
        # A write to an existing upload is no creation: the limited address still uploads.
        location = (await create(second, server, length=3)).headers["Location"]
        patch = await first.patch(
            location, content=b"abc", headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS}
        )
        assert patch.status_code == 204


async def test_facade_creations_beyond_the_limit_get_a_json_429(tmp_path: Path) -> None:
    async with limited_server(tmp_path, rate_limit_creations_per_minute_per_address=1) as server:
        async with server.client() as client:
            files = {"file": ("a.txt", b"hello world", "text/plain")}
            assert (await client.post("/api/files/upload", files=files)).status_code == 201
            refused = await client.post("/api/files/upload", files=files)
        assert_retry_after(refused, at_most=60)
        assert refused.json()["error"] == "rate_limited"
        assert "Tus-Resumable" not in refused.headers


async def test_creations_are_limited_per_subject_not_per_connection(tmp_path: Path) -> None:
    # Real tokens through the real auth middleware: the limit follows the token's subject.
    keys = write_pem(tmp_path / "jwt-public.pem", rsa_key())
    alice, bob = ({"Authorization": f"Bearer {token(rsa_key(), sub=name)}"} for name in ("alice", "bob"))
    async with (
        limited_server(tmp_path, rate_limit_creations_per_minute=1, jwt_public_key_path=str(keys)) as server,
        server.client() as client,
    ):
        assert (await create(client, server, **alice)).status_code == 201
        refused = await create(client, server, **alice)
        assert_retry_after(refused, at_most=60)
        assert "by this caller" in refused.text
        assert (await create(client, server, **bob)).status_code == 201


async def test_a_second_concurrent_write_gets_429_and_the_tus_client_resumes_after_it(
    tmp_path: Path, limit_storage: str | None
) -> None:
    held_length, data = 200_000, bytes(range(256)) * 400
    async with (
        limited_server(tmp_path, rate_limit_concurrent_uploads=1, redis_url=limit_storage) as server,
        server.client() as client,
    ):
        held = (await create(client, server, length=held_length)).headers["Location"]
        other = (await create(client, server, length=len(data))).headers["Location"]
        # One write holds the only slot: half its body sent, the rest withheld.
        headers = TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Content-Length": str(held_length)}
        reader, writer = await open_request(held, "PATCH", headers)
        writer.write(b"h" * (held_length // 2))
        await writer.drain()

        async def patch_other() -> httpx.Response:
            head = await client.head(other, headers=TUS)
            offset = int(head.headers["Upload-Offset"])
            return await client.patch(
                other,
                content=data[offset:],
                headers=TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS},
            )

        refused = await eventually(patch_other, lambda response: response.status_code == 429)
        assert refused.headers["Retry-After"] == "5"
        assert refused.headers["Tus-Resumable"] == "1.0.0"
        assert "at once" in refused.text

        writer.write(b"h" * (held_length - held_length // 2))
        await writer.drain()
        assert (await read_response(reader))[0] == 204
        writer.close()
        # The slot is free again: the refused client resumes from the offset HEAD reports and completes.
        resumed = await patch_other()
        assert resumed.status_code == 204
        assert int(resumed.headers["Upload-Offset"]) == len(data)


async def test_a_subjects_bytes_are_throttled_to_the_budget_and_still_arrive_whole(
    tmp_path: Path, limit_storage: str | None
) -> None:
    rate, data = 256 << 10, bytes(range(256)) * 4096  # 1 MiB at 256 KiB/s, a second's burst allowed
    async with (
        limited_server(tmp_path, rate_limit_bytes_per_second=rate, redis_url=limit_storage) as server,
        server.client() as client,
    ):
        metadata = "filename " + base64.b64encode(b"throttled.bin").decode()
        location = (await create(client, server, length=len(data), **{"Upload-Metadata": metadata})).headers["Location"]
        started = time.monotonic()
        patch = await client.patch(location, content=data, headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS})
        elapsed = time.monotonic() - started
    assert patch.status_code == 204, patch.text
    assert int(patch.headers["Upload-Offset"]) == len(data)
    # (1 MiB - one second's burst) at 256 KiB/s is 3 s; the sliding window's estimate may admit a bit more.
    assert elapsed >= 2.0, f"1 MiB at {rate} bytes/s took only {elapsed:.2f} s"
    assert elapsed < 20


async def test_all_limits_are_off_by_default(tmp_path: Path) -> None:
    async with limited_server(tmp_path) as server, server.client() as client:
        statuses = await asyncio.gather(*(create(client, server) for _ in range(30)))
    assert {response.status_code for response in statuses} == {201}
