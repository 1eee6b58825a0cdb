"""Writing a body into staging, stoppable from outside and cut when too slow.

``write_body`` is the one write loop: it takes a ``Body`` (an async iterator of chunks and how
it ended) and needs no per-chunk task or thread. An ``Interrupt`` (asked for by a newer request
for the same upload, or by graceful shutdown) ends the wait at once by rescheduling an
``asyncio.timeout`` to now; the caller then commits what arrived. ``body_chunks`` reads an ASGI
body; its ``BodyWatch`` ends a body whose client sends too slowly: it looks at the bytes
received from a timer a few times per window, so the per-chunk path gains no work at all.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from tusingest.staging import StagingWriter


class BodyEnd(enum.Enum):
    COMPLETE = "complete"  # the client sent the whole body
    DISCONNECTED = "disconnected"  # the client went away mid-body
    INTERRUPTED = "interrupted"  # another request or shutdown asked us to let go
    OVERFLOW = "overflow"  # the body runs past what the upload may still take
    TOO_SLOW = "too_slow"  # the client sent nothing for too long, or too little per window


class Body(Protocol):
    """The bytes of one append as they arrive, and how they ended once ``chunks`` is exhausted:
    COMPLETE, DISCONNECTED or TOO_SLOW (INTERRUPTED and OVERFLOW are decided by the writer)."""

    end: BodyEnd

    def chunks(self) -> AsyncGenerator[bytes]: ...


@dataclass(frozen=True, slots=True)
class BodyPace:
    """How slowly a client may send a body before it is cut off like a disconnect.

    ``idle_timeout``: seconds without a single byte. ``min_rate``: bytes per second, averaged
    over each ``window`` seconds (0: no minimum); a window smooths a mobile link's pauses.
    """

    idle_timeout: float = 60.0
    min_rate: int = 1024
    window: float = 30.0

    def describe(self) -> str:
        rate = f", or less than {self.min_rate} bytes/s over {self.window:g} s" if self.min_rate else ""
        return f"no byte for {self.idle_timeout:g} s{rate}"


class BodyTooSlow(ClientDisconnect):
    """A body cut off by its ``BodyPace``: to a reader of ``body_chunks`` it ends like a
    disconnect (what arrived is kept where resumable), but the client may still listen."""


class BodyWatch:
    """Trips when a body falls below its pace, judged on a timer (``loop.call_later``).

    ``progress`` returns the bytes received so far; it is read only on the timer's ticks, a
    few per idle timeout and per window, so the caller's hot path stays untouched. On tripping
    the watch reschedules ``timeout`` (when set) to now, which ends the caller's wait.
    """

    def __init__(self, pace: BodyPace, progress: Callable[[], int]) -> None:
        self.pace = pace
        self.progress = progress
        self.tripped = False
        self.timeout: asyncio.Timeout | None = None
        self._loop = asyncio.get_running_loop()
        self._tick = min(pace.idle_timeout, pace.window) / 4
        now = self._loop.time()
        self._last_bytes = self._window_bytes = progress()
        self._last_change = self._window_start = now
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._tick, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self._loop.time()
        received = self.progress()
        if received != self._last_bytes:
            self._last_bytes, self._last_change = received, now
        too_slow = now - self._last_change >= self.pace.idle_timeout
        if now - self._window_start >= self.pace.window:
            if (received - self._window_bytes) < self.pace.min_rate * (now - self._window_start):
                too_slow = True
            self._window_start, self._window_bytes = now, received
        if too_slow:
            self._handle = None
            self.tripped = True
            if self.timeout is not None:
                self.timeout.reschedule(now)
            return
        self._handle = self._loop.call_later(self._tick, self._check)


class Interrupt:
    def __init__(self) -> None:
        self.fired = False
        self._timeout: asyncio.Timeout | None = None

    def fire(self) -> None:
        self.fired = True
        if self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time())


async def write_body(
    body: Body,
    writer: StagingWriter,
    limit: int,
    interrupt: Interrupt,
    on_chunk: Callable[[bytes], None] | None = None,
    inspect: Callable[[bytes], Awaitable[bool]] | None = None,
) -> BodyEnd:
    """Append ``body`` to ``writer`` until it ends; at most ``limit`` bytes are accepted.

    The one write loop of every append (``tus.append``). ``on_chunk`` sees every accepted piece,
    in order, before it is written (the checksum extension hashes the body this way). ``inspect``
    sees the first pieces too, until it returns True (it has seen enough); it may raise to refuse
    the upload mid-body. An ``Interrupt`` ends the wait for the next piece at once.
    """
    chunks = body.chunks()
    try:
        async with asyncio.timeout(None) as timeout:
            interrupt._timeout = timeout
            if interrupt.fired:
                return BodyEnd.INTERRUPTED
            async for chunk in chunks:
                if writer.written + len(chunk) > limit:
                    return BodyEnd.OVERFLOW
                if on_chunk is not None:
                    on_chunk(chunk)
                if inspect is not None and await inspect(chunk):
                    inspect = None
                await writer.write(chunk)
    except TimeoutError:
        if interrupt.fired:
            return BodyEnd.INTERRUPTED
        raise
    finally:
        interrupt._timeout = None
        await chunks.aclose()
    return body.end


async def body_chunks(receive: Receive, pace: BodyPace) -> AsyncGenerator[bytes]:
    """The request body piece by piece, for readers that parse it (the REST facade's forms).

    Raises ``ClientDisconnect`` when the client goes away and ``BodyTooSlow`` (a subclass) when
    it sends below ``pace``. Only the wait for the next piece is bounded: the reader's own work
    between pieces is never cancelled, and a trip found then ends the next wait at once.
    """
    received = 0
    watch = BodyWatch(pace, lambda: received)
    try:
        while True:
            if watch.tripped:
                raise BodyTooSlow()
            try:
                async with asyncio.timeout(None) as timeout:
                    watch.timeout = timeout
                    message = await receive()
            except TimeoutError:
                if watch.tripped:
                    raise BodyTooSlow() from None
                raise
            finally:
                watch.timeout = None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body: bytes = message.get("body", b"")
            if body:
                received += len(body)
                yield body
            if not message.get("more_body", False):
                return
    finally:
        watch.stop()
