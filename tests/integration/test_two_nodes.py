"""Two nodes on one PostgreSQL database and one staging directory: one writer per upload across
nodes (invariant 3). A request on one node interrupts a stalled PATCH on the other, which commits
what it received; random interleavings of PATCH, HEAD and DELETE across both nodes never lose,
duplicate or invent a byte (invariants 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, _server_factory, upload_bytes
from tusingest.sessions import UploadState
from tusingest.sessions.pglocks import lock_key


@pytest.fixture
async def start_node(tmp_path: Path, postgres_url: str) -> AsyncIterator[ServerFactory]:
    """Start nodes that share one PostgreSQL database and one staging directory."""
    async with _server_factory(tmp_path, postgres_url) as factory:
        yield factory


async def create(client: httpx.AsyncClient, length: int) -> str:
    """The new upload's path: every node serves it, whichever created it."""
    response = await client.post("/files/", headers=TUS | {"Upload-Length": str(length)})
    assert response.status_code == 201
    return urlsplit(response.headers["Location"]).path


async def staged(server: LiveServer, upload_id: str, length: int) -> bytes:
    return await upload_bytes(server, upload_id, length)


def patch_headers(offset: int, length: int) -> dict[str, str]:
    return TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS, "Content-Length": str(length)}


@contextlib.asynccontextmanager
async def stalled_patch(url: str, payload: bytes, sent: int) -> AsyncIterator[asyncio.StreamReader]:
    """A PATCH of ``payload`` that sends ``sent`` bytes and goes quiet, its connection open until the block ends."""
    reader, writer = await open_request(url, "PATCH", patch_headers(0, len(payload)))
    try:
        writer.write(payload[:sent])
        await writer.drain()
        yield reader
    finally:
        writer.close()  # also when the test fails: a connection left open would hold up the server's shutdown


async def test_a_head_on_one_node_interrupts_a_stalled_patch_on_the_other_which_commits_what_it_received(
    start_node: ServerFactory,
) -> None:
    buffer = 64 << 10
    a = await start_node(staging_write_buffer_kb=buffer >> 10)
    b = await start_node(staging_write_buffer_kb=buffer >> 10)
    payload = os.urandom(1 << 20)
    sent = 256 << 10
    async with a.client() as client_a, b.client() as client_b:
        url = await create(client_a, len(payload))
        upload_id = url.rsplit("/", 1)[1]
        async with stalled_patch(a.url + url, payload, sent) as reader:  # to node a
            await eventually(lambda: a.parts.staging.staged_size(upload_id), lambda size: size > sent - buffer)
            resumed_at = await client_b.head(url, headers=TUS)  # node b asks node a's PATCH to let go
            async with asyncio.timeout(10):
                status, headers = await read_response(reader)  # the stalled PATCH's own answer, from node a
        offset = int(resumed_at.headers["Upload-Offset"])
        rest = await client_b.patch(url, headers=patch_headers(offset, len(payload) - offset), content=payload[offset:])
    assert sent - buffer < offset <= sent
    assert (status, headers["upload-offset"]) == (204, str(offset))
    assert rest.status_code == 204 and rest.headers["Upload-Offset"] == str(len(payload))
    assert await staged(b, upload_id, len(payload)) == payload


async def test_a_patch_on_one_node_interrupts_a_stalled_patch_on_the_other_and_gets_409_with_its_offset(
    start_node: ServerFactory,
) -> None:
    buffer = 64 << 10
    a = await start_node(staging_write_buffer_kb=buffer >> 10)
    b = await start_node(staging_write_buffer_kb=buffer >> 10)
    payload = os.urandom(512 << 10)
    sent = 128 << 10
    async with a.client() as client_a, b.client() as client_b:
        url = await create(client_a, len(payload))
        upload_id = url.rsplit("/", 1)[1]
        async with stalled_patch(a.url + url, payload, sent):  # to node a
            await eventually(lambda: a.parts.staging.staged_size(upload_id), lambda size: size > sent - buffer)
            # A client that lost track retries from 0 on the other node: not locked out, it learns the offset.
            retry = await client_b.patch(url, headers=patch_headers(0, len(payload)), content=payload)
        after = await client_b.head(url, headers=TUS)
    offset = int(after.headers["Upload-Offset"])
    assert retry.status_code == 409
    assert sent - buffer < offset <= sent
    assert await staged(a, upload_id, offset) == payload[:offset]


async def holds_advisory_lock(database_url: str, upload_id: str) -> bool:
    """Whether some node holds the upload's advisory lock, as PostgreSQL sees it."""
    key = lock_key(upload_id) & (1 << 64) - 1  # a bigint key is shown as two oids: high and low half
    connection = await asyncpg.connect(database_url)
    try:
        held = await connection.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
            key >> 32,
            key & 0xFFFFFFFF,
        )
    finally:
        await connection.close()
    return bool(held)


async def test_a_patch_interrupted_on_one_node_before_its_first_byte_gets_400_and_the_other_node_takes_over(
    start_node: ServerFactory, postgres_url: str
) -> None:
    a = await start_node()
    b = await start_node()
    payload = os.urandom(64 << 10)
    async with a.client() as client_a, b.client() as client_b:
        url = await create(client_a, len(payload))
        upload_id = url.rsplit("/", 1)[1]
        async with stalled_patch(a.url + url, payload, 0) as reader:  # to node a: not a byte of its body
            await eventually(lambda: holds_advisory_lock(postgres_url, upload_id), bool)
            second = await client_b.patch(url, headers=patch_headers(0, len(payload)), content=payload)
            async with asyncio.timeout(10):
                status, headers = await read_response(reader)  # the stalled PATCH's own answer, from node a
                body = await reader.readexactly(int(headers["content-length"]))
    assert (status, headers["upload-offset"]) == (400, "0")
    assert b"interrupted by another request" in body
    assert second.status_code == 204 and second.headers["Upload-Offset"] == str(len(payload))
    assert await staged(b, upload_id, len(payload)) == payload


# -- random interleavings ------------------------------------------------------------------------

INTERLEAVINGS = 50
UPLOADS_PER_INTERLEAVING = 3
CLIENTS_PER_INTERLEAVING = 4
STEPS_PER_CLIENT = 12


@dataclass
class Tracked:
    url: str  # a path: clients send each request to either node
    payload: bytes
    sent: int = 0  # the furthest byte any client has put on the wire
    known_offset: int = 0  # what the clients last learned from a server
    deleted: bool = False
    seen_offsets: list[tuple[int, int]] = field(default_factory=list)  # (offset reported, sent by then)

    def observe(self, offset: int) -> None:
        self.seen_offsets.append((offset, self.sent))
        self.known_offset = offset


@dataclass
class Tally:
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


class Client:
    """A tus client that follows the rules: on 409 or a broken request it asks HEAD and resumes
    from the server's offset, on 423 it retries, after 404/410 it gives the upload up."""

    def __init__(self, rng: random.Random, nodes: list[httpx.AsyncClient], tally: Tally) -> None:
        self.rng = rng
        self.nodes = nodes
        self.tally = tally

    async def run(self, uploads: list[Tracked], steps: int) -> None:
        for _ in range(steps):
            live = [u for u in uploads if not u.deleted and u.known_offset < len(u.payload)]
            if not live:
                return
            upload = self.rng.choice(live)
            node = self.rng.choice(self.nodes)
            roll = self.rng.random()
            try:
                if roll < 0.03:
                    await self.delete(node, upload)
                elif roll < 0.23:
                    await self.head(node, upload)
                elif roll < 0.43:
                    await self.stalled_patch(node, upload)
                else:
                    await self.patch(node, upload)
            except (httpx.TransportError, OSError):
                self.tally.count("network error")
                await self.head(node, upload)
            await asyncio.sleep(self.rng.random() * 0.005)

    async def head(self, node: httpx.AsyncClient, upload: Tracked) -> None:
        response = await node.head(upload.url, headers=TUS)
        self.tally.count(f"HEAD {response.status_code}")
        if response.status_code == 200:
            upload.observe(int(response.headers["Upload-Offset"]))
        elif response.status_code in (404, 410):
            upload.deleted = True

    async def delete(self, node: httpx.AsyncClient, upload: Tracked) -> None:
        response = await node.delete(upload.url, headers=TUS)
        self.tally.count(f"DELETE {response.status_code}")
        if response.status_code in (204, 404, 410):
            upload.deleted = True

    def next_body(self, upload: Tracked) -> tuple[int, bytes]:
        offset = upload.known_offset
        size = self.rng.randint(1, 24 << 10)
        body = upload.payload[offset : offset + size]
        upload.sent = max(upload.sent, offset + len(body))  # counted before it is on the wire
        return offset, body

    async def patch(self, node: httpx.AsyncClient, upload: Tracked) -> None:
        offset, body = self.next_body(upload)
        response = await node.patch(upload.url, headers=patch_headers(offset, len(body)), content=body)
        await self.handle_patch_answer(node, upload, response.status_code, response.headers.get("Upload-Offset"))

    async def stalled_patch(self, node: httpx.AsyncClient, upload: Tracked) -> None:
        """Send part of a body, then either hang up or go quiet until another request interrupts it."""
        offset, body = self.next_body(upload)
        part = self.rng.randint(0, len(body))
        url = str(node.base_url).rstrip("/") + upload.url
        reader, writer = await open_request(url, "PATCH", patch_headers(offset, len(body)))
        try:
            writer.write(body[:part])
            await writer.drain()
            if self.rng.random() < 0.5:
                self.tally.count("PATCH dropped")
                return  # the network drops: the server commits what arrived
            try:
                async with asyncio.timeout(0.2):
                    status, headers = await read_response(reader)
            except TimeoutError:
                self.tally.count("PATCH stalled, nobody came")
                return
            self.tally.count(f"stalled PATCH {status}")
            await self.handle_patch_answer(node, upload, status, headers.get("upload-offset"))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def handle_patch_answer(
        self, node: httpx.AsyncClient, upload: Tracked, status: int, offset: str | None
    ) -> None:
        self.tally.count(f"PATCH {status}")
        if status == 204 and offset is not None:
            upload.observe(int(offset))
        elif status in (400, 409):  # 400: interrupted before a byte was taken; ask where it stands
            await self.head(node, upload)
        elif status in (404, 410):
            upload.deleted = True
        # 423: the next step retries; anything else is a failure the checks below will name


async def interleave(seed: int, nodes: list[LiveServer], http: list[httpx.AsyncClient], tally: Tally) -> None:
    rng = random.Random(seed)
    uploads = []
    for _ in range(UPLOADS_PER_INTERLEAVING):
        payload = rng.randbytes(rng.randint(8 << 10, 64 << 10))
        uploads.append(Tracked(await create(rng.choice(http), len(payload)), payload))
    clients = [Client(random.Random(rng.random()), http, tally) for _ in range(CLIENTS_PER_INTERLEAVING)]
    async with asyncio.timeout(10):
        await asyncio.gather(*(client.run(uploads, STEPS_PER_CLIENT) for client in clients))

    for upload in uploads:
        upload_id = upload.url.rsplit("/", 1)[1]
        stored = await nodes[0].parts.store.get(upload_id)
        assert stored is not None
        where = f"interleaving {seed}, upload {upload_id}"
        assert all(offset <= sent for offset, sent in upload.seen_offsets), f"{where}: offset past what was sent"
        assert stored.offset <= upload.sent, f"{where}: stored offset {stored.offset} > sent {upload.sent}"
        if stored.state is UploadState.TERMINATED:
            continue
        reader = rng.choice(nodes)
        assert await staged(reader, upload_id, stored.offset) == upload.payload[: stored.offset], where
        if stored.offset == len(upload.payload):
            tally.count("upload complete")
            assert stored.state is UploadState.COMPLETE, where


async def test_random_interleavings_across_two_nodes_keep_every_upload_exact(start_node: ServerFactory) -> None:
    nodes = [await start_node(lock_timeout_seconds=1.0), await start_node(lock_timeout_seconds=1.0)]
    tally = Tally()
    async with nodes[0].client() as http_a, nodes[1].client() as http_b:
        for seed in range(INTERLEAVINGS):
            await interleave(seed, nodes, [http_a, http_b], tally)
    seen = tally.statuses
    # The interleavings did what they are for: writers were interrupted and clients had to resume.
    assert seen.get("upload complete", 0) >= INTERLEAVINGS, seen
    assert seen.get("stalled PATCH 204", 0) > 0 and seen.get("PATCH 409", 0) > 0, seen
    unexpected = {k: v for k, v in seen.items() if k.endswith(("500", "503"))}
    assert not unexpected, seen
