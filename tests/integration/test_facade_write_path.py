"""The REST facade writes through the one append operation of the tus endpoint: the offset is
checked inside the upload's lock, a newer request asks a stalled one to let go, completion runs
after the lock is released, and the form is read whole before a new upload is stored (late
fields are applied, a refused field keeps nothing, a file part must have its expected name)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import TUS, LiveServer, ServerFactory, _server_factory, upload_bytes
from tests.integration.test_facade_upload import multipart, post_file
from tusingest.app import recover_uploads
from tusingest.sessions import UploadState


async def read_json(reader: asyncio.StreamReader, headers: dict[str, str]) -> dict[str, Any]:
    """The JSON body of a response whose status line and headers ``read_response`` has read."""
    return dict(json.loads(await reader.readexactly(int(headers["content-length"]))))


def ranged(session: str, start: int, data: bytes, total: int) -> tuple[bytes, dict[str, str]]:
    """A resumable facade request putting ``data`` at ``start`` of a ``total``-byte session."""
    body, content_type = multipart(("file", "data.bin", data))
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "X-Upload-Session-ID": session,
        "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}",
    }
    return body, headers


async def test_two_requests_claiming_the_same_range_of_a_session_give_one_409_and_the_file_is_exact(
    start_server: ServerFactory,
) -> None:
    # A stalled request holds the first half of the session; a retry of the same range (a client
    # after a proxy timeout) must not be appended after it: the offset is checked in the lock.
    half = 256 << 10
    server = await start_server(staging_write_buffer_kb=64, lock_timeout_seconds=5)
    payload = os.urandom(2 * half)
    session = "same-range-" + secrets.token_hex(6)
    first_half = payload[:half]
    async with server.client() as client:
        opened = await post_file(
            client, b"", fields={"total_size": str(len(payload))}, headers={"X-Upload-Session-ID": session}
        )
        assert opened.status_code == 202, opened.text
        body, headers = ranged(session, 0, first_half, len(payload))
        reader, writer = await open_request(server.url + "/api/files/upload", "POST", headers)
        try:
            writer.write(body[: len(body) - 60_000])  # most of the part, then the client goes quiet
            await writer.drain()
            await eventually(lambda: server.parts.staging.staged_size(session), lambda size: size > 0)
            retry_body, retry_headers = ranged(session, 0, first_half, len(payload))
            retry = await client.post("/api/files/upload", content=retry_body, headers=retry_headers)
            async with asyncio.timeout(10):
                status, stalled_headers = await read_response(reader)  # the stalled request's own answer
                stalled = await read_json(reader, stalled_headers)
        finally:
            writer.close()
        kept = stalled["bytes_uploaded"]
        rest_body, rest_headers = ranged(session, kept, payload[kept:], len(payload))
        rest = await client.post("/api/files/upload", content=rest_body, headers=rest_headers)
    assert status == 202 and 0 < kept < half, stalled
    assert retry.status_code == 409, retry.text
    assert retry.json()["error"] == "offset_mismatch" and retry.json()["bytes_uploaded"] == kept
    assert rest.status_code == 201, rest.text
    assert rest.json()["sha256_hash"] == hashlib.sha256(payload).hexdigest()


async def test_metadata_sent_after_the_file_part_is_applied(sqlite_server: LiveServer) -> None:
    # The README's `curl -F file=@report.pdf -F 'metadata=...'` sends the file first.
    boundary = "----late" + secrets.token_hex(6)
    payload = os.urandom(20_000)
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="report.pdf"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += payload + b"\r\n"
    body += f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n'.encode()
    body += json.dumps({"project": "atlas"}).encode() + b"\r\n"
    body += f'--{boundary}\r\nContent-Disposition: form-data; name="description"\r\n\r\nQ3 report\r\n'.encode()
    body += f"--{boundary}--\r\n".encode()
    async with sqlite_server.client() as client:
        response = await client.post(
            "/api/files/upload", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    assert response.status_code == 201, response.text
    record = await sqlite_server.parts.saga_store.get_file(response.json()["file_id"])
    assert record is not None and record.metadata["project"] == "atlas" and record.description == "Q3 report"


def file_then_fields(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "----after" + secrets.token_hex(6)
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += data + b"\r\n"
    for key, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "late_metadata",
    [pytest.param("[1, 2]", id="not-an-object"), pytest.param(json.dumps({"username": "u" * 65}), id="refused")],
)
@pytest.mark.parametrize("resumable", [False, True], ids=["one-shot", "resumable"])
async def test_a_metadata_400_leaves_no_session_and_no_staged_bytes_behind(
    sqlite_server: LiveServer, late_metadata: str, resumable: bool
) -> None:
    body, content_type = file_then_fields(os.urandom(30_000), {"metadata": late_metadata})
    headers = {"Content-Type": content_type}
    session = "late-" + secrets.token_hex(6)
    if resumable:
        headers["X-Upload-Session-ID"] = session
    async with sqlite_server.client() as client:
        response = await client.post("/api/files/upload", content=body, headers=headers)
        status = await client.get(f"/api/files/upload/session/{session}")
    await recover_uploads(sqlite_server.parts)  # nothing owed either: recovery registers nothing
    assert (response.status_code, response.json()["error"]) == (400, "invalid_metadata")
    assert status.status_code == 404
    assert await sqlite_server.parts.staging.list_upload_ids() == []
    assert await sqlite_server.parts.saga_store.count_files() == 0


@pytest.mark.parametrize(
    ("path", "expected", "sent"),
    [("/api/files/upload", "file", "upload"), ("/api/files/batch/upload", "files", "file")],
)
async def test_a_file_part_under_another_name_is_refused_with_400_naming_the_expected_field(
    sqlite_server: LiveServer, path: str, expected: str, sent: str
) -> None:
    body, content_type = multipart((sent, "a.bin", os.urandom(1000)))
    async with sqlite_server.client() as client:
        response = await client.post(path, content=body, headers={"Content-Type": content_type})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert repr(expected) in response.json()["message"]
    assert await sqlite_server.parts.staging.list_upload_ids() == []
    assert await sqlite_server.parts.saga_store.count_files() == 0


async def test_a_session_status_answers_at_once_while_the_completing_request_waits_for_its_saga(
    start_server: ServerFactory,
) -> None:
    # The completing facade request waits up to FINALISE_WAIT_SECONDS for the saga, held at a
    # failpoint; that wait must not hold the upload's lock: a tus HEAD (which takes the lock)
    # answers at once, and DELETE keeps its 423 while the saga runs.
    server = await start_server(finalise_wait_seconds=30, saga_failpoints="inspected=pause", lock_timeout_seconds=1)
    session = "waiting-" + secrets.token_hex(6)
    payload = os.urandom(5000)
    async with server.client() as client:
        completing = asyncio.create_task(
            post_file(
                client, payload, fields={"total_size": str(len(payload))}, headers={"X-Upload-Session-ID": session}
            )
        )

        # A small file's steps are held in memory, not in the saga log: ask the failpoint itself.
        async def held() -> bool:
            return "inspected" in server.parts.sagas.failpoints.reached

        await eventually(held, bool, timeout=10)
        head = await client.head(f"/files/{session}", headers=TUS)
        deleted = await client.delete(f"/files/{session}", headers=TUS)
        still_waiting = not completing.done()
        completing.cancel()
    assert still_waiting
    assert head.status_code == 200 and head.headers["Upload-Offset"] == str(len(payload))
    assert head.headers["ArtStore-Upload-Status"] == "finalizing"
    assert deleted.status_code == 423


# --- two nodes, random interleavings of facade requests ------------------------------------------

INTERLEAVINGS = 2
SESSIONS_PER_INTERLEAVING = 3
CLIENTS_PER_INTERLEAVING = 3
STEPS_PER_CLIENT = 30


@pytest.fixture
async def start_node(tmp_path: Path, postgres_url: str) -> AsyncIterator[ServerFactory]:
    """Nodes that share one PostgreSQL database and one staging directory."""
    async with _server_factory(tmp_path, postgres_url) as factory:
        yield factory


@dataclass
class Session:
    session_id: str
    payload: bytes
    sent: int = 0  # the furthest byte any client has put on the wire
    known_offset: int = 0
    done: bool = False
    taken: list[tuple[int, int]] = field(default_factory=list)  # byte ranges a 2xx said it kept


@dataclass
class FacadeClient:
    """A facade client that follows the rules: it sends from the offset it last learned, and on
    409 or a broken request asks the session's status and resumes from there."""

    rng: random.Random
    nodes: list[httpx.AsyncClient]
    statuses: dict[str, int]

    def count(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1

    async def run(self, sessions: list[Session]) -> None:
        for _ in range(STEPS_PER_CLIENT):
            live = [s for s in sessions if not s.done]
            if not live:
                return
            session = self.rng.choice(live)
            node = self.rng.choice(self.nodes)
            try:
                if self.rng.random() < 0.2:
                    await self.status(node, session)
                elif self.rng.random() < 0.4:
                    await self.stalled(node, session)
                else:
                    await self.send(node, session)
            except (httpx.TransportError, OSError):
                self.count("network error")
                await self.status(node, session)
            await asyncio.sleep(self.rng.random() * 0.005)

    def next_range(self, session: Session) -> tuple[int, bytes]:
        start = session.known_offset
        data = session.payload[start : start + self.rng.randint(1, 24 << 10)]
        session.sent = max(session.sent, start + len(data))
        return start, data

    async def status(self, node: httpx.AsyncClient, session: Session) -> None:
        response = await node.get(f"/api/files/upload/session/{session.session_id}")
        self.count(f"status {response.status_code}")
        if response.status_code == 200:
            session.known_offset = response.json()["bytes_uploaded"]

    async def send(self, node: httpx.AsyncClient, session: Session) -> None:
        start, data = self.next_range(session)
        body, headers = ranged(session.session_id, start, data, len(session.payload))
        response = await node.post("/api/files/upload", content=body, headers=headers)
        await self.answer(node, session, start, response.status_code, response.json())

    async def stalled(self, node: httpx.AsyncClient, session: Session) -> None:
        """Send part of a request, then hang up or go quiet until another request interrupts it."""
        start, data = self.next_range(session)
        body, headers = ranged(session.session_id, start, data, len(session.payload))
        reader, writer = await open_request(str(node.base_url).rstrip("/") + "/api/files/upload", "POST", headers)
        try:
            writer.write(body[: self.rng.randint(0, len(body) - 1)])
            await writer.drain()
            if self.rng.random() < 0.5:
                self.count("dropped")
                return
            try:
                async with asyncio.timeout(0.2):
                    status, answer_headers = await read_response(reader)
                    answer = await read_json(reader, answer_headers)
            except TimeoutError:
                self.count("stalled, nobody came")
                return
            self.count("stalled answered")
            await self.answer(node, session, start, status, answer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def answer(
        self, node: httpx.AsyncClient, session: Session, start: int, status: int, body: dict[str, Any]
    ) -> None:
        self.count(f"{status} {body.get('error', '')}".strip())
        if status == 201:
            session.taken.append((start, len(session.payload)))
            session.known_offset = len(session.payload)
            session.done = True
        elif status == 202:
            session.taken.append((start, body["bytes_uploaded"]))
            session.known_offset = body["bytes_uploaded"]
        elif status == 409 and "bytes_uploaded" in body:
            session.known_offset = body["bytes_uploaded"]
        else:  # a cut request (400), a busy session (409 without offset): ask where it stands
            await self.status(node, session)


async def facade_interleaving(
    seed: int, nodes: list[LiveServer], http: list[httpx.AsyncClient], statuses: dict[str, int]
) -> None:
    rng = random.Random(seed)
    sessions = []
    for n in range(SESSIONS_PER_INTERLEAVING):
        session = Session(f"mix-{seed}-{n}-{secrets.token_hex(4)}", rng.randbytes(rng.randint(8 << 10, 64 << 10)))
        opened = await post_file(
            rng.choice(http),
            b"",
            fields={"total_size": str(len(session.payload))},
            headers={"X-Upload-Session-ID": session.session_id},
        )
        assert opened.status_code == 202, opened.text
        sessions.append(session)
    clients = [FacadeClient(random.Random(rng.random()), http, statuses) for _ in range(CLIENTS_PER_INTERLEAVING)]
    async with asyncio.timeout(30):
        await asyncio.gather(*(client.run(sessions) for client in clients))

    for session in sessions:
        where = f"interleaving {seed}, session {session.session_id}"
        stored = await nodes[0].parts.store.get(session.session_id)
        assert stored is not None, where
        assert stored.offset <= session.sent, f"{where}: stored offset {stored.offset} > sent {session.sent}"
        # At most one 2xx for any byte: the ranges the answers said they kept never overlap.
        kept = sorted((start, end) for start, end in session.taken if end > start)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(kept)), where
        staged = await upload_bytes(rng.choice(nodes), session.session_id, stored.offset)
        assert staged == session.payload[: stored.offset], where
        if stored.offset == len(session.payload):
            statuses["session complete"] = statuses.get("session complete", 0) + 1
            assert stored.state is UploadState.COMPLETE, where
            outcome = await nodes[0].parts.sagas.wait(session.session_id, 10)
            assert outcome is not None and outcome.file is not None, where
            assert outcome.file.sha256 == hashlib.sha256(session.payload).hexdigest(), where


async def test_random_interleavings_of_facade_requests_across_two_nodes_keep_every_session_exact(
    start_node: ServerFactory,
) -> None:
    nodes = [await start_node(lock_timeout_seconds=1.0), await start_node(lock_timeout_seconds=1.0)]
    statuses: dict[str, int] = {}
    async with nodes[0].client() as http_a, nodes[1].client() as http_b:
        for seed in range(INTERLEAVINGS):
            await facade_interleaving(seed, nodes, [http_a, http_b], statuses)
    # The interleavings did what they are for: requests collided and clients had to resume.
    assert statuses.get("session complete", 0) >= 1, statuses
    assert statuses.get("409 offset_mismatch", 0) > 0 and statuses.get("stalled answered", 0) > 0, statuses
    assert not {k: v for k, v in statuses.items() if k.startswith("5")}, statuses
