"""The progress bus: where an upload stands, pushed to whoever watches it (the SSE stream of
``GET /api/files/upload/session/{id}/events``), on every node.

Two places publish, never the protocol handlers: the session store's ``commit_offset`` (every
committed offset, and termination or expiry through ``set_state``) and the upload saga (its
stages). ``ProgressBus`` delivers in this process only (SQLite: one node); ``PostgresProgressBus``
(sessions/pgprogress.py, so that a SQLite server never imports asyncpg) carries events across nodes
with LISTEN/NOTIFY: the PostgreSQL session store sends the NOTIFY of an offset in the very
statement that commits it (no extra round trip, and nobody hears of an offset that was rolled
back), and one dedicated connection per node listens.

Delivery is best effort and in order: each subscriber has a queue of QUEUE_MAX events, and one that
falls further behind gets ``RESYNC`` instead of the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Final

from tusingest.sessions.model import Upload, UploadState

log = logging.getLogger(__name__)

MESSAGE_MAX: Final = 512  # a failure's message is cut to this in a NOTIFY (payloads must stay under 8000 bytes)


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


RESYNC: Final = None  # what a subscriber gets when events may have been missed: re-read the state

Subscription = asyncio.Queue[ProgressEvent | None]
QUEUE_MAX: Final = 256  # events a subscriber may fall behind before it is told to re-read the state instead


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
