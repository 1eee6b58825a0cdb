"""Live progress over Server-Sent Events (GET /api/files/upload/session/{id}/events) on real servers:
every committed offset, the status and the finalisation stages, then ``registered`` or ``failed``;
across nodes through PostgreSQL LISTEN/NOTIFY; ownership as for the session status; no stream or
subscription outlives its client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tests.integration.test_authentication import ALICE, BOB, bearer
from tests.integration.test_finalise import metadata

MiB = 1 << 20


@dataclass
class Event:
    event: str
    data: dict[str, Any]
    id: str | None = None


@dataclass
class EventStream:
    """An open event stream, read one event at a time (``: ping`` comments are counted, not returned)."""

    response: httpx.Response
    lines: AsyncIterator[str]
    pings: int = 0
    ended: bool = False
    seen: list[Event] = field(default_factory=list)

    async def next(self, timeout: float = 30.0) -> Event | None:
        """The next event; None when the server ended the stream."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            async for line in self.lines:
                if line == "":
                    if fields:
                        event = Event(fields["event"], json.loads(fields["data"]), fields.get("id"))
                        self.seen.append(event)
                        return event
                    continue
                if line.startswith(":"):
                    self.pings += line == ": ping"
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
        self.ended = True
        return None

    async def until_end(self, timeout: float = 60.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while await self.next(timeout) is not None:
                pass
        return self.seen


def events_path(upload_id: str) -> str:
    return f"/api/files/upload/session/{upload_id}/events"


@contextlib.asynccontextmanager
async def watch(client: httpx.AsyncClient, upload_id: str) -> AsyncIterator[EventStream]:
    """The upload's event stream, its first two events (the current state: ``progress``, ``status``)
    read, so the server has subscribed to what comes next."""
    async with client.stream("GET", events_path(upload_id)) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = EventStream(response, response.aiter_lines())
        await stream.next()
        await stream.next()
        yield stream


async def create(client: httpx.AsyncClient, length: int, filename: str = "data.bin") -> str:
    created = await client.post(
        "/files/", headers=TUS | {"Upload-Length": str(length), "Upload-Metadata": metadata(filename=filename)}
    )
    assert created.status_code == 201, created.text
    return str(created.headers["Location"]).rsplit("/", 1)[1]


async def patch(client: httpx.AsyncClient, upload_id: str, offset: int, body: bytes) -> httpx.Response:
    headers = TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS}
    return await client.patch(f"/files/{upload_id}", headers=headers, content=body)


async def settled_session(client: httpx.AsyncClient, upload_id: str) -> dict[str, Any]:
    async def status() -> dict[str, Any]:
        body: dict[str, Any] = (await client.get(f"/api/files/upload/session/{upload_id}")).json()
        return body

    return await eventually(status, lambda body: body["status"] in ("completed", "failed"), timeout=60)


def of_kind(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [event.data for event in events if event.event == kind]


async def test_a_watcher_sees_every_8_mib_step_of_a_64_mib_upload_then_registered_also_from_another_node(
    start_server: ServerFactory,
) -> None:
    watched = await start_server(compression_enabled=False)
    # On PostgreSQL the PATCHes go to a second node: their offsets reach the watcher through NOTIFY.
    engine = watched.settings.database_url.partition(":")[0]
    writer = await start_server(compression_enabled=False) if engine.startswith("postgres") else watched
    payload = os.urandom(64 * MiB)
    async with watched.client() as watching, writer.client() as writing:
        upload_id = await create(watching, len(payload))
        async with watch(watching, upload_id) as stream:
            first = stream.seen[:2]  # the current state: subscribed from here on
            for offset in range(0, len(payload), 8 * MiB):
                answer = await patch(writing, upload_id, offset, payload[offset : offset + 8 * MiB])
                assert answer.status_code == 204, answer.text
            events = await stream.until_end()
        session = await settled_session(watching, upload_id)
    assert first == [
        Event("progress", {"session_id": upload_id, "bytes_uploaded": 0, "bytes_total": 64 * MiB}, "0"),
        Event("status", {"session_id": upload_id, "status": "in_progress"}),
    ]
    steps = [data["bytes_uploaded"] for data in of_kind(events, "progress")]
    assert steps == [n * 8 * MiB for n in range(9)]  # the 0 sent first, then each commit, none skipped
    assert [data["status"] for data in of_kind(events, "status")] == ["in_progress", "finalizing", "completed"]
    assert [data["stage"] for data in of_kind(events, "stage")] == ["inspecting", "placing", "registered"]
    assert events[-1].event == "registered"
    assert events[-1].data == session["file"] and events[-1].data["sha256_hash"] == session["file"]["sha256_hash"]
    assert stream.ended
    await eventually(lambda: _subscriptions(watched), lambda count: count == 0)


async def test_a_refused_mime_type_ends_the_stream_with_failed(start_server: ServerFactory) -> None:
    server = await start_server(allowed_mime_types="image/*")
    text = b"plain text, not an image\n" * 40_000
    async with server.client() as client:
        upload_id = await create(client, len(text), "notes.txt")
        async with watch(client, upload_id) as stream:
            refused = await patch(client, upload_id, 0, text)
            events = await stream.until_end()
    assert refused.status_code == 415
    assert [data["stage"] for data in of_kind(events, "stage")] == ["failed"]
    assert of_kind(events, "status")[-1]["status"] == "failed"
    assert events[-1].event == "failed" and events[-1].data["error"] == "mime_type_not_allowed"
    assert set(events[-1].data) == {"error", "message"}


async def test_a_late_watcher_of_a_settled_upload_gets_its_state_and_final_event_at_once(
    sqlite_server: LiveServer,
) -> None:
    payload = os.urandom(MiB)
    async with sqlite_server.client() as client:
        upload_id = await create(client, len(payload))
        assert (await patch(client, upload_id, 0, payload)).status_code == 204
        session = await settled_session(client, upload_id)
        async with watch(client, upload_id) as stream:
            events = await stream.until_end(timeout=5)
    assert [event.event for event in events] == ["progress", "status", "registered"]
    assert events[0].data["bytes_uploaded"] == MiB and events[1].data["status"] == "completed"
    assert events[2].data == session["file"]


async def test_a_terminated_upload_ends_its_stream_with_failed(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        upload_id = await create(client, 1000)
        async with watch(client, upload_id) as stream:
            assert (await client.delete(f"/files/{upload_id}", headers=TUS)).status_code == 204
            events = await stream.until_end(timeout=10)
    assert events[-1] == Event("failed", {"error": "upload_terminated", "message": "the upload was terminated"})


async def test_a_quiet_stream_gets_a_ping_each_heartbeat(start_server: ServerFactory) -> None:
    server = await start_server(events_heartbeat_seconds=0.05)
    async with server.client() as client:
        upload_id = await create(client, 1000)
        async with watch(client, upload_id) as stream:
            with pytest.raises(TimeoutError):
                await stream.next(timeout=0.5)  # nothing happens to the upload: only comments arrive
    assert stream.pings >= 3


async def test_a_node_shutting_down_ends_its_streams(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        upload_id = await create(client, 1000)
        async with watch(client, upload_id) as stream:
            sqlite_server.parts.progress.end_streams()  # what `tusingest serve` does on SIGTERM
            rest = await stream.until_end(timeout=5)
    assert [event.event for event in rest] == ["progress", "status"] and stream.ended


async def test_opening_and_closing_100_streams_leaves_no_subscription_or_task(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        upload_id = await create(client, 1000)
        async with watch(client, upload_id):  # the server's own tasks for a client are started
            pass
        await eventually(lambda: _subscriptions(sqlite_server), lambda count: count == 0)
        tasks_before = len(asyncio.all_tasks())
        for _ in range(100):
            async with watch(client, upload_id):
                pass
        # The server sees each disconnect: its stream, and the stream's subscription, end.
        await eventually(lambda: _subscriptions(sqlite_server), lambda count: count == 0)
        await eventually(_task_count, lambda count: count <= tasks_before)


async def _subscriptions(server: LiveServer) -> int:
    return server.parts.progress.subscriptions


async def _task_count() -> int:
    return len(asyncio.all_tasks())


# -- who may watch ---------------------------------------------------------------------------------


async def test_another_users_token_gets_404_and_no_token_401(keyed_server: LiveServer) -> None:
    async with (
        httpx.AsyncClient(base_url=keyed_server.url, timeout=30, headers=bearer(**ALICE)) as alice,
        httpx.AsyncClient(base_url=keyed_server.url, timeout=30, headers=bearer(**BOB)) as bob,
        httpx.AsyncClient(base_url=keyed_server.url, timeout=30) as nobody,
    ):
        upload_id = await create(alice, 1000)
        as_bob = await bob.get(events_path(upload_id))
        unknown = await alice.get(events_path("A" * 22))
        anonymous = await nobody.get(events_path(upload_id))
        async with watch(alice, upload_id) as own:
            first = own.seen[0]
    assert (as_bob.status_code, as_bob.json()["error"]) == (404, "session_not_found")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "session_not_found")
    assert anonymous.status_code == 401
    assert first.event == "progress"
    await eventually(lambda: _subscriptions(keyed_server), lambda count: count == 0)
