"""The progress bus across nodes: LISTEN/NOTIFY on PostgreSQL (what a bus is: sessions/progress.py).

The session store sends the NOTIFY of a committed offset in the statement that commits it. Other
events (a saga's stages, an ending state) are NOTIFYs of their own, which a publisher never waits
for: they queue (SEND_MAX at most; beyond that they are dropped and logged) for one task that sends
what has gathered in one round trip, and what is queued when the node closes is still sent. When
the listening connection was lost, events may have been missed: every subscriber then gets
``RESYNC`` and re-reads the upload's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from tusingest.sessions.progress import ProgressBus, ProgressEvent

log = logging.getLogger(__name__)

PROGRESS_CHANNEL: Final = "tusingest_progress"
SEND_MAX: Final = 1024  # events queued for NOTIFY before more are dropped (PostgreSQL that slow loses watchers anyway)
SEND_BATCH: Final = 256  # events one NOTIFY round trip carries at most
FLUSH_SECONDS: Final = 5.0  # how long close() lets the queued events go out
# One statement, in queue order: the select list (pg_notify) is evaluated after the ORDER BY.
_NOTIFY_ALL: Final = (
    "SELECT pg_notify($1, payload) FROM unnest($2::text[]) WITH ORDINALITY AS queued(payload, n) ORDER BY n"
)

_CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

type Listening = asyncpg.Connection[Any] | PoolConnectionProxy[Any]  # lazy: asyncpg's classes are generic to mypy only


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
