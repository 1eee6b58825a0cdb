"""The outbox relay against real stores (SQLite and PostgreSQL), a real webhook receiver on loopback and a real,
private redis-server: at-least-once delivery, signatures, backoff, outages and prompt delivery on notify().

Time is passed in as ``now`` (T0 and offsets from it): backoff and due times pass without sleeping.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from redis.asyncio import Redis

from tests.fixtures.redis import RedisServer, free_port
from tusingest.app import open_database
from tusingest.saga import FileRecord, NewOutboxMessage, OutboxMessage, SagaStore
from tusingest.saga.outbox import MAX_CONCURRENT_DELIVERIES, DeliveryReport, OutboxRelay, full_jitter
from tusingest.saga.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    FILE_CREATED,
    SIGNATURE_HEADER,
    UPLOAD_COMPLETED,
    file_event_message,
    verify,
    webhook_event,
    webhook_messages,
)
from tusingest.sessions.model import new_upload_id

# Unclosed HTTP sessions, Redis connections or transports would show up as these warnings; they fail the test.
pytestmark = pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
LATER = T0 + timedelta(days=1)  # past any backoff the tests configure
SECRET = "webhook-secret-🔑"
STREAM = "file-events"
NODE = "node-a"
TINY = timedelta(milliseconds=1)
LOGGER = "tusingest.saga.outbox"


def hours(n: float) -> datetime:
    return T0 + timedelta(hours=n)


# --- a webhook receiver ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event


class WebhookReceiver:
    """A webhook endpoint on a loopback port: records every request, answers ``status``; may be down, or hang."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.status = 204
        self.hang = False  # when set, requests are recorded and then not answered until stop()
        self.received: list[Received] = []
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/artstore?token=t0k3n"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/artstore", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.received) >= count), timeout)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self._changed:
            self.received.append(Received(request.method, request.path_qs, request.headers, body))
            self._changed.notify_all()
        if self.hang:
            await self._release.wait()
        return web.Response(status=self.status, text="" if self.status < 300 else "boom")


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    """A receiver that is up."""
    started = WebhookReceiver(free_port())
    await started.start()
    yield started
    await started.stop()


@pytest.fixture
async def down_receiver() -> AsyncIterator[WebhookReceiver]:
    """A receiver whose port nobody listens on yet; the test starts it."""
    receiver = WebhookReceiver(free_port())
    yield receiver
    await receiver.stop()


# --- stores and relays ----------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SagaStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'tusingest.db'}"
    else:
        # Looked up here, not declared, so the SQLite half runs without a PostgreSQL server.
        url = request.getfixturevalue("postgres_url")
    saga_store = open_database(url).sagas
    await saga_store.open()
    yield saga_store
    await saga_store.close()


MakeRelay = Callable[..., Awaitable[OutboxRelay]]


@pytest.fixture
async def make_relay(store: SagaStore) -> AsyncIterator[MakeRelay]:
    """Opened relays on ``store``, closed at the end. Defaults: signed, no Redis, no jitter (the delay is the
    backoff ceiling, so due times are exact), a poll interval long enough never to matter."""
    relays: list[OutboxRelay] = []

    async def make(**overrides: Any) -> OutboxRelay:
        options: dict[str, Any] = {
            "redis_url": None,
            "webhook_secret": SECRET,
            "webhook_timeout": 5.0,
            "retry_max_seconds": 300.0,
            "poll_interval": 3600.0,
            "jitter": lambda ceiling: ceiling,
            **overrides,
        }
        relay = OutboxRelay(store, **options)
        relays.append(relay)
        await relay.open()
        return relay

    yield make
    for relay in relays:
        await relay.close()


def make_record(upload_id: str) -> FileRecord:
    return FileRecord(
        file_id=new_upload_id(),
        upload_id=upload_id,
        original_filename="report.pdf",
        storage_filename="report_alice_20250304T050607_f1.pdf",
        storage_element_id="se-01",
        storage_key="2025/03/04/05/report_alice_20250304T050607_f1.pdf",
        size_bytes=42,
        stored_size_bytes=42,
        content_type="application/pdf",
        content_encoding=None,
        md5="9e107d9d372bb6826bd81d3542a419d6",
        sha256="d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592",
        created_by_id=None,
        created_by_username="alice",
        retention_policy=None,
        description=None,
        metadata={},
        uploaded_at=T0,
    )


async def enqueue(store: SagaStore, messages: Sequence[NewOutboxMessage], *, now: datetime | None = T0) -> None:
    """Queue ``messages`` as the upload saga does, in the transaction registering a file (``now`` None: the clock)."""
    saga = await store.create_saga("upload", new_upload_id(), {}, owner=NODE, lease_seconds=60, now=now)
    await store.register_file(
        saga.saga_id,
        owner=NODE,
        record=make_record(saga.subject_id),
        messages=messages,
        step="registered",
        data_update={},
        lease_seconds=60,
        now=now,
    )


async def pending(store: SagaStore, now: datetime = LATER) -> list[OutboxMessage]:
    """The undelivered messages due at ``now``, left due at ``now`` (a claim with no lease): rounds at ``now``
    or after still see them."""
    return await store.claim_due_messages(limit=1000, lease_seconds=0, now=now)


def event(n: int = 1) -> dict[str, Any]:
    return webhook_event(UPLOAD_COMPLETED, {"file_id": f"f{n}", "size": 5 * 2**40, "name": "Ёлка.pdf"}, now=T0)


def log_lines(caplog: pytest.LogCaptureFixture, level: int, containing: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and containing in r.getMessage()
    ]


# --- webhooks ---------------------------------------------------------------------------------------------------


async def test_webhook_is_posted_once_signed_with_event_headers_and_marked_delivered(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver
) -> None:
    sent = event()
    await enqueue(store, webhook_messages(sent, [receiver.url]))
    relay = await make_relay()

    report = await relay.deliver_due(now=T0)

    assert report == DeliveryReport(delivered=1, failed=0)
    (request,) = receiver.received
    assert (request.method, request.path_qs) == ("POST", "/hooks/artstore?token=t0k3n")
    assert request.event == sent
    assert verify(request.body, SECRET, request.headers[SIGNATURE_HEADER])
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers[EVENT_HEADER] == "upload.completed"
    assert request.headers[DELIVERY_HEADER].isdigit()
    assert request.headers["User-Agent"].startswith("tusingest/")
    assert await relay.deliver_due(now=LATER) == DeliveryReport()
    assert len(receiver.received) == 1
    assert await pending(store) == []


async def test_webhook_without_a_secret_is_sent_unsigned_with_one_warning(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    await enqueue(store, webhook_messages(event(1), [receiver.url]) + webhook_messages(event(2), [receiver.url]))
    relay = await make_relay(webhook_secret=None)

    report = await relay.deliver_due(now=T0)

    assert report == DeliveryReport(delivered=2)
    assert [SIGNATURE_HEADER in r.headers for r in receiver.received] == [False, False]
    assert len(log_lines(caplog, logging.WARNING, "unsigned")) == 1


async def test_unreachable_receiver_reschedules_the_message_with_the_attempt_counted_and_the_error_kept(
    store: SagaStore, make_relay: MakeRelay, down_receiver: WebhookReceiver
) -> None:
    await enqueue(store, webhook_messages(event(), [down_receiver.url]))
    relay = await make_relay(base_delay=10.0)

    report = await relay.deliver_due(now=T0)

    assert report == DeliveryReport(failed=1)
    assert await relay.deliver_due(now=T0 + timedelta(seconds=10) - TINY) == DeliveryReport()
    (message,) = await pending(store)
    assert message.attempts == 1
    assert message.last_error is not None
    assert f"Cannot connect to host 127.0.0.1:{down_receiver.port}" in message.last_error
    assert message.delivered_at is None


async def test_events_queued_while_the_receiver_is_down_arrive_signed_each_at_least_once_when_it_is_up(
    store: SagaStore, make_relay: MakeRelay, down_receiver: WebhookReceiver
) -> None:
    events = [event(n) for n in range(5)]
    for sent in events:
        await enqueue(store, webhook_messages(sent, [down_receiver.url]))
    relay = await make_relay()
    for hour in range(3):
        assert await relay.deliver_due(now=hours(hour)) == DeliveryReport(failed=5)

    await down_receiver.start()
    report = await relay.deliver_due(now=hours(3))

    assert report == DeliveryReport(delivered=5)
    arrived = Counter(r.event["id"] for r in down_receiver.received)
    assert set(arrived) == {e["id"] for e in events}
    assert all(verify(r.body, SECRET, r.headers.get(SIGNATURE_HEADER)) for r in down_receiver.received)
    assert {r.event["id"]: r.event for r in down_receiver.received} == {e["id"]: e for e in events}
    assert await pending(store) == []


async def test_receiver_answering_500_is_retried_with_a_backoff_that_doubles_per_attempt_up_to_the_cap(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver
) -> None:
    receiver.status = 500
    await enqueue(store, webhook_messages(event(), [receiver.url]))
    relay = await make_relay(base_delay=1.0, retry_max_seconds=5.0)
    assert await relay.deliver_due(now=T0) == DeliveryReport(failed=1)

    now = T0
    for delay in [1, 2, 4, 5, 5]:
        assert await relay.deliver_due(now=now + timedelta(seconds=delay) - TINY) == DeliveryReport()
        now += timedelta(seconds=delay)
        assert await relay.deliver_due(now=now) == DeliveryReport(failed=1)

    (message,) = await pending(store)
    assert message.attempts == 6
    assert message.last_error == "HTTP 500 Internal Server Error: boom"
    assert len(receiver.received) == 6


async def test_default_jitter_retries_no_later_than_the_backoff_ceiling(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver
) -> None:
    receiver.status = 503
    await enqueue(store, webhook_messages(event(), [receiver.url]))
    relay = await make_relay(base_delay=10.0, jitter=full_jitter)  # a delay anywhere in [0, ceiling]
    assert await relay.deliver_due(now=T0) == DeliveryReport(failed=1)

    report = await relay.deliver_due(now=T0 + timedelta(seconds=10))

    assert report == DeliveryReport(failed=1)


async def test_receiver_refusing_with_4xx_is_retried_and_logged_once_until_it_accepts(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    receiver.status = 401
    await enqueue(store, webhook_messages(event(1), [receiver.url]) + webhook_messages(event(2), [receiver.url]))
    relay = await make_relay()
    assert await relay.deliver_due(now=hours(0)) == DeliveryReport(failed=2)
    assert await relay.deliver_due(now=hours(1)) == DeliveryReport(failed=2)

    receiver.status = 200
    assert await relay.deliver_due(now=hours(2)) == DeliveryReport(delivered=2)

    (refusal,) = log_lines(caplog, logging.WARNING, "refuses deliveries")
    assert "HTTP 401 Unauthorized" in refusal
    assert f"webhook http://127.0.0.1:{receiver.port}/hooks/artstore " in refusal
    assert "t0k3n" not in caplog.text  # a token in the URL is not logged
    assert len(log_lines(caplog, logging.INFO, "accepts deliveries again")) == 1


async def test_receiver_that_does_not_answer_in_time_fails_and_is_not_tried_again_in_that_round(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver
) -> None:
    receiver.hang = True
    count = MAX_CONCURRENT_DELIVERIES + 2
    await enqueue(store, [m for n in range(count) for m in webhook_messages(event(n), [receiver.url])])
    relay = await make_relay(webhook_timeout=2.0)

    report = await relay.deliver_due(now=T0)

    assert report == DeliveryReport(failed=count)
    assert len(receiver.received) == MAX_CONCURRENT_DELIVERIES
    errors = Counter((m.last_error or "").partition(" (")[0] for m in await pending(store))
    assert errors == {"no answer within 2 s": MAX_CONCURRENT_DELIVERIES, "not attempted: failing in this round": 2}


async def test_message_claimed_by_a_sender_that_died_is_sent_once_the_claim_lease_passes(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver
) -> None:
    await enqueue(store, webhook_messages(event(), [receiver.url]))
    await store.claim_due_messages(limit=10, lease_seconds=60, now=T0)  # a sender claims it, then dies
    relay = await make_relay()
    assert await relay.deliver_due(now=T0 + timedelta(seconds=60) - TINY) == DeliveryReport()

    report = await relay.deliver_due(now=T0 + timedelta(seconds=60))

    assert report == DeliveryReport(delivered=1)
    assert len(receiver.received) == 1


# --- the Redis stream -------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def file_created(file_id: str, **fields: Any) -> NewOutboxMessage:
    return file_event_message(
        FILE_CREATED, {"file_id": file_id, "storage_element_id": "se-01", **fields}, STREAM, now=T0
    )


async def stream_entries(redis_client: Redis) -> list[dict[str, str]]:
    """The fields of every entry of the stream, oldest first (the client decodes responses)."""
    entries: list[tuple[str, dict[str, str]]] = await redis_client.xrange(STREAM)  # type: ignore[assignment]
    return [fields for _, fields in entries]


async def test_file_event_is_appended_to_the_stream_with_flattened_fields(
    store: SagaStore, make_relay: MakeRelay, redis_server: RedisServer, redis_client: Redis
) -> None:
    await enqueue(
        store,
        [
            file_created(
                "f1",
                size=5 * 2**40,
                ratio=0.5,
                compressed=True,
                content_encoding=None,
                metadata={"project": "Ёлка"},
                parts=[1, "two"],
            )
        ],
    )
    relay = await make_relay(redis_url=redis_server.url)

    report = await relay.deliver_due(now=T0)

    assert report == DeliveryReport(delivered=1)
    assert await stream_entries(redis_client) == [
        {
            "event_type": "file:created",
            "file_id": "f1",
            "storage_element_id": "se-01",
            "size": "5497558138880",
            "ratio": "0.5",
            "compressed": "true",
            "content_encoding": "",
            "metadata": '{"project":"Ёлка"}',
            "parts": '[1,"two"]',
            "timestamp": "2025-03-04T05:06:07.123456Z",
        }
    ]
    assert await pending(store) == []


async def test_file_events_wait_while_redis_is_down_and_land_once_it_is_back(
    store: SagaStore, make_relay: MakeRelay, redis_server: RedisServer, redis_client: Redis
) -> None:
    relay = await make_relay(redis_url=redis_server.url, webhook_timeout=2.0)
    redis_server.stop()
    await enqueue(store, [file_created("f1"), file_created("f2")])

    assert await relay.deliver_due(now=hours(0)) == DeliveryReport(failed=2)
    waiting = await pending(store, now=hours(1))
    assert [m.attempts for m in waiting] == [1, 1]
    assert all(f"connecting to 127.0.0.1:{redis_server.port}" in (m.last_error or "") for m in waiting)

    redis_server.start()
    report = await relay.deliver_due(now=hours(1))

    assert report == DeliveryReport(delivered=2)
    assert sorted(fields["file_id"] for fields in await stream_entries(redis_client)) == ["f1", "f2"]


async def test_a_redis_restart_between_rounds_does_not_fail_the_next_delivery(
    store: SagaStore, make_relay: MakeRelay, redis_server: RedisServer, redis_client: Redis
) -> None:
    relay = await make_relay(redis_url=redis_server.url)
    await enqueue(store, [file_created("f1")])
    assert await relay.deliver_due(now=hours(0)) == DeliveryReport(delivered=1)
    redis_server.restart()  # the relay's pooled connection is now dead
    await enqueue(store, [file_created("f2")], now=hours(1))

    report = await relay.deliver_due(now=hours(1))

    assert report == DeliveryReport(delivered=1)
    assert [fields["file_id"] for fields in await stream_entries(redis_client)] == ["f2"]


async def test_without_redis_url_file_events_are_marked_delivered_unsent_and_logged_once(
    store: SagaStore, make_relay: MakeRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await enqueue(store, [file_created("f1"), file_created("f2")])
    relay = await make_relay(redis_url=None)

    report = await relay.deliver_due(now=T0)

    assert report == DeliveryReport(delivered=2)
    assert await pending(store) == []
    assert log_lines(caplog, logging.INFO, "") == [
        "file events are not published: no REDIS_URL (dropping those queued before)"
    ]


# --- the background loop ----------------------------------------------------------------------------------------


async def test_notify_wakes_the_running_relay_without_waiting_for_the_poll_interval(
    store: SagaStore, make_relay: MakeRelay, receiver: WebhookReceiver
) -> None:
    await enqueue(store, webhook_messages(event(1), [receiver.url]), now=None)
    relay = await make_relay(poll_interval=3600.0)
    await relay.start()
    await receiver.wait_for(1)  # the first round, at start, has claimed what was due: the loop now waits an hour

    await enqueue(store, webhook_messages(event(2), [receiver.url]), now=None)
    relay.notify()

    await receiver.wait_for(2, timeout=10.0)
    assert [r.event["data"]["file_id"] for r in receiver.received] == ["f1", "f2"]


async def test_deliver_due_before_open_raises_runtime_error(store: SagaStore) -> None:
    relay = OutboxRelay(
        store, redis_url=None, webhook_secret=SECRET, webhook_timeout=5, retry_max_seconds=300, poll_interval=5
    )

    with pytest.raises(RuntimeError, match="not open"):
        await relay.deliver_due(now=T0)


async def test_close_leaves_no_unclosed_session_or_connection_behind(
    store: SagaStore, redis_server: RedisServer, receiver: WebhookReceiver
) -> None:
    await enqueue(store, [file_created("f1"), *webhook_messages(event(), [receiver.url])], now=None)
    relay = OutboxRelay(
        store, redis_url=redis_server.url, webhook_secret=SECRET, webhook_timeout=5, retry_max_seconds=300,
        poll_interval=3600,
    )  # fmt: skip
    await relay.start()
    await receiver.wait_for(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await relay.close()
        await relay.close()  # twice is harmless
        del relay
        gc.collect()

    assert [str(w.message) for w in caught] == []
