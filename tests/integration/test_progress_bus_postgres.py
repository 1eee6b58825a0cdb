"""The PostgreSQL progress bus between two nodes: a publisher never waits for the NOTIFY round trip (its
events queue, SEND_MAX at most, the rest dropped and logged), the queue goes out in order, and closing
a node still sends what it had queued."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from tusingest.sessions.pgprogress import SEND_MAX, PostgresProgressBus
from tusingest.sessions.progress import ProgressEvent, Subscription

WATCHED = [f"upload-{n}" for n in range(8)]  # SEND_MAX / 8 events each: under a subscriber's QUEUE_MAX


@contextlib.asynccontextmanager
async def opened(postgres_url: str) -> AsyncIterator[PostgresProgressBus]:
    bus = PostgresProgressBus(postgres_url)
    await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


async def received(queue: Subscription, count: int) -> list[ProgressEvent | None]:
    async with asyncio.timeout(10):
        return [await queue.get() for _ in range(count)]


async def test_publishing_never_waits_queues_send_max_events_and_drops_the_rest_with_a_warning(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tusingest.sessions.pgprogress")
    async with opened(postgres_url) as publisher, opened(postgres_url) as listener:
        with contextlib.ExitStack() as stack:
            queues = {upload_id: stack.enter_context(listener.subscribe(upload_id)) for upload_id in WATCHED}
            # No await in this loop suspends unless publish does: the sender cannot run before it ends.
            for offset in range(SEND_MAX + 3):
                await publisher.publish(ProgressEvent(WATCHED[offset % len(WATCHED)], offset=offset))
            per_upload = {
                upload_id: await received(queue, SEND_MAX // len(WATCHED)) for upload_id, queue in queues.items()
            }
            assert all(queue.empty() for queue in queues.values())

    for n, upload_id in enumerate(WATCHED):
        assert per_upload[upload_id] == [
            ProgressEvent(upload_id, offset=offset) for offset in range(n, SEND_MAX, len(WATCHED))
        ]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [
        f"progress event of upload {WATCHED[offset % len(WATCHED)]} dropped: {SEND_MAX} events wait to be sent"
        for offset in range(SEND_MAX, SEND_MAX + 3)
    ]


async def test_closing_a_node_still_sends_the_events_it_had_queued(postgres_url: str) -> None:
    async with opened(postgres_url) as listener:
        with listener.subscribe("upload-1") as queue:
            publisher = PostgresProgressBus(postgres_url)
            await publisher.open()
            events = [ProgressEvent("upload-1", offset=offset) for offset in range(10)]
            events.append(ProgressEvent("upload-1", stage="failed", error="mime_type_refused", message="no"))
            for event in events:
                await publisher.publish(event)
            await publisher.close()
            heard = await received(queue, len(events))

    assert heard == events


async def test_a_closed_bus_logs_what_it_cannot_publish_and_does_not_raise(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tusingest.sessions.pgprogress")
    async with opened(postgres_url) as bus:
        pass

    await bus.publish(ProgressEvent("upload-1", offset=1))

    assert [r.getMessage() for r in caplog.records] == [
        "progress event of upload upload-1 not published: the progress bus is not open"
    ]
