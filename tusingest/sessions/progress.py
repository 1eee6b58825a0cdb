"""The progress bus: where an upload stands, pushed to whoever watches it (the SSE stream of
``GET /api/files/upload/session/{id}/events``), on every node.

Two places publish, never the protocol handlers: the session store's ``commit_offset`` (every
committed offset, and termination or expiry through ``set_state``) and the upload saga (its
stages). ``ProgressBus`` delivers in this process only (SQLite: one node); ``PostgresProgressBus``
carries events across nodes with LISTEN/NOTIFY: the PostgreSQL session store sends the NOTIFY of
an offset in the very statement that commits it (no extra round trip, and nobody hears of an
offset that was rolled back), and one dedicated connection per node listens.

Delivery is best effort and in order: each subscriber has a queue of QUEUE_MAX events, and one that
falls further behind gets ``RESYNC`` instead of the backlog. Other events (a saga's stages, an ending
state) are NOTIFYs of their own, which a publisher never waits for: they queue (SEND_MAX at most;
beyond that they are dropped and logged) for one task that sends what has gathered in one round
trip, and what is queued when the node closes is still sent. When the listening connection was
lost, events may have been missed: every subscriber then gets ``RESYNC`` and re-reads the upload's
state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from tusingest.sessions.model import Upload, UploadState

log = logging.getLogger(__name__)

PROGRESS_CHANNEL: Final = "tusingest_progress"
MESSAGE_MAX: Final = 512  # a failure's message is cut to this in a NOTIFY (payloads must stay under 8000 bytes)
SEND_MAX: Final = 1024  # events queued for NOTIFY before more are dropped (PostgreSQL that slow loses watchers anyway)
SEND_BATCH: Final = 256  # events one NOTIFY round trip carries at most
FLUSH_SECONDS: Final = 5.0  # how long close() lets the queued events go out
# One statement, in queue order: the select list (pg_notify) is evaluated after the ORDER BY.
_NOTIFY_ALL: Final = (
    "SELECT pg_notify($1, payload) FROM unnest($2::text[]) WITH ORDINALITY AS queued(payload, n) ORDER BY n"
)


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One step of an upload: a committed ``offset`` (of ``length``), a finalisation ``stage`` (a
    failed one with its ``error`` code and ``message``), or the ``state`` that ended it unfinished
    (terminated, expired)."""

    upload_id: str
    offset: int | None = None
    length: int | None = None
    stage: str | None = None
    error: str | None = None
    message: str | None = None
    state: str | None = None

    @classmethod
    def committed(cls, upload: Upload) -> ProgressEvent:
        return cls(upload.id, offset=upload.offset, length=upload.length)

    @classmethod
    def ended(cls, upload: Upload) -> ProgressEvent | None:
        """The event of a state change a watcher must hear of: only those that end an unfinished upload
        (the saga's stages tell of the rest)."""
        if upload.state in (UploadState.TERMINATED, UploadState.EXPIRED):
            return cls(upload.id, state=upload.state.value)
        return None

    def to_json(self) -> str:
        fields = {name: value for name, value in asdict(self).items() if value is not None}
        if self.message is not None:
            fields["message"] = self.message[:MESSAGE_MAX]
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ProgressEvent | None:
        """The event in a NOTIFY payload; None for one that is not ours (logged, then ignored)."""
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            log.warning("ignored a progress notification that is not an event (%s): %.200s", exc, text)
            return None


_CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

RESYNC: Final = None  # what a subscriber gets when events may have been missed: re-read the state

Subscription = asyncio.Queue[ProgressEvent | None]
QUEUE_MAX: Final = 256  # events a subscriber may fall behind before it is told to re-read the state instead
type Listening = asyncpg.Connection[Any] | PoolConnectionProxy[Any]  # lazy: asyncpg's classes are generic to mypy only


def _offer(queue: Subscription, event: ProgressEvent | None) -> None:
    """Queue ``event``; a subscriber that fell QUEUE_MAX events behind (a client that does not read) gets
    its backlog replaced by one RESYNC, so a stream's memory stays bounded and it still ends up current."""
    try:
        queue.put_nowait(event)
    except asyncio.QueueFull:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(RESYNC)


class ProgressBus:
    """Fans events out to this process's subscribers of an upload; nothing is kept for anyone else.

    Publishing to an upload nobody watches costs one dictionary look-up."""

    notify_channel: str | None = None
    """Set: the PostgreSQL session store sends committed offsets as NOTIFY on this channel itself."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self.closing = False  # the node shuts down: streams end, their clients reconnect elsewhere

    @contextlib.contextmanager
    def subscribe(self, upload_id: str) -> Iterator[Subscription]:
        """A queue of the upload's events from now on, until the block ends."""
        queue: Subscription = asyncio.Queue(maxsize=QUEUE_MAX)
        self._subscribers.setdefault(upload_id, set()).add(queue)
        try:
            yield queue
        finally:
            watchers = self._subscribers[upload_id]
            watchers.discard(queue)
            if not watchers:
                del self._subscribers[upload_id]

    @property
    def subscriptions(self) -> int:
        return sum(len(watchers) for watchers in self._subscribers.values())

    def deliver(self, event: ProgressEvent) -> None:
        """Hand ``event`` to this process's subscribers of its upload."""
        for queue in self._subscribers.get(event.upload_id, ()):
            _offer(queue, event)

    def resync(self) -> None:
        for watchers in self._subscribers.values():
            for queue in watchers:
                _offer(queue, RESYNC)

    def end_streams(self) -> None:
        """Shutting down: wake every subscriber to see ``closing`` and end (as ``request_release_all``
        asks running PATCHes to let go), so open streams do not hold the shutdown up."""
        self.closing = True
        self.resync()

    async def publish(self, event: ProgressEvent) -> None:
        """Tell every node's subscribers (here: this process is the only node)."""
        self.deliver(event)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None


class PostgresProgressBus(ProgressBus):
    """LISTEN/NOTIFY on ``channel``: every node listens on one dedicated connection (reconnected with
    backoff when it is lost) and delivers what it hears, its own commits included."""

    def __init__(
        self, database_url: str, *, channel: str = PROGRESS_CHANNEL, reconnect_max_seconds: float = 30.0
    ) -> None:
        super().__init__()
        self.database_url = database_url
        self.channel = channel
        self.notify_channel = channel
        self.reconnect_max_seconds = reconnect_max_seconds
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsent: asyncio.Queue[ProgressEvent] = asyncio.Queue(maxsize=SEND_MAX)
        self._sender: asyncio.Task[None] | None = None  # the one user of the connection's statements

    async def open(self) -> None:
        await self._connect()  # a database that cannot be reached stops the start, as the stores do
        self._task = asyncio.create_task(self._keep_listening(), name="progress-listener")
        self._sender = asyncio.create_task(self._send_queued(), name="progress-sender")

    async def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            with contextlib.suppress(TimeoutError):  # what is still queued then is lost, as on a crash
                async with asyncio.timeout(FLUSH_SECONDS):
                    await self._unsent.join()
            sender.cancel()
            await asyncio.wait([sender])
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # ended (cancelled): nothing of it is left running
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await asyncio.wait_for(connection.close(), 5)

    async def publish(self, event: ProgressEvent) -> None:
        """Queue ``event`` for the sender and return at once: a saga's stage never waits for PostgreSQL."""
        if self._sender is None:
            log.warning("progress event of upload %s not published: the progress bus is not open", event.upload_id)
            return
        try:
            self._unsent.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("progress event of upload %s dropped: %d events wait to be sent", event.upload_id, SEND_MAX)

    async def _send_queued(self) -> None:
        """Send what has gathered in the queue, in order, up to SEND_BATCH events a round trip."""
        while True:
            batch = [await self._unsent.get()]
            while len(batch) < SEND_BATCH and not self._unsent.empty():
                batch.append(self._unsent.get_nowait())
            try:
                await self._send(batch)
            finally:
                for _ in batch:
                    self._unsent.task_done()

    async def _send(self, batch: list[ProgressEvent]) -> None:
        connection = self._connection
        try:
            if connection is None or connection.is_closed():
                raise ConnectionError("not connected to PostgreSQL")  # an OSError, so caught below
            await connection.execute(_NOTIFY_ALL, self.channel, [event.to_json() for event in batch])
        except _CONNECTION_ERRORS as exc:
            # The listener reconnects and has every subscriber re-read the state: nothing is retried here.
            uploads = ", ".join(sorted({event.upload_id for event in batch}))
            log.warning("%d progress events not published (uploads %.200s): %s", len(batch), uploads, exc)

    async def _connect(self) -> None:
        connection = await asyncpg.connect(self.database_url, server_settings={"application_name": "tusingest"})
        self._lost.clear()
        connection.add_termination_listener(lambda _: self._lost.set())
        await connection.add_listener(self.channel, self._heard)
        self._connection = connection

    def _heard(self, connection: Listening, pid: int, channel: str, payload: object) -> None:
        event = ProgressEvent.from_json(str(payload))
        if event is not None:
            self.deliver(event)

    async def _keep_listening(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_CONNECTION_ERRORS),
            wait=wait_random_exponential(multiplier=0.5, max=self.reconnect_max_seconds),
            before_sleep=lambda state: log.warning(
                "the progress listener cannot reconnect yet: %s", state.outcome and state.outcome.exception()
            ),
        )
        while True:
            await self._lost.wait()
            log.warning("the progress listener lost its PostgreSQL connection; reconnecting")
            self._connection = None
            async for attempt in retrying:
                with attempt:
                    await self._connect()
            self.resync()  # what was sent while nobody listened is lost: subscribers read the state again
