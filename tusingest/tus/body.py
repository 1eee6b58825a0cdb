"""Reading a request body straight into staging, stoppable from outside.

The loop awaits the ASGI ``receive`` directly: no per-chunk task or thread. An ``Interrupt``
(asked for by a newer request for the same upload, or by graceful shutdown) ends the wait at
once by rescheduling an ``asyncio.timeout`` to now; the caller then commits what arrived.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable

from starlette.types import Receive

from tusingest.staging import ChunkWriter


class BodyEnd(enum.Enum):
    COMPLETE = "complete"  # the client sent the whole body
    DISCONNECTED = "disconnected"  # the client went away mid-body
    INTERRUPTED = "interrupted"  # another request or shutdown asked us to let go
    OVERFLOW = "overflow"  # the body runs past what the upload may still take


class Interrupt:
    def __init__(self) -> None:
        self.fired = False
        self._timeout: asyncio.Timeout | None = None

    def fire(self) -> None:
        self.fired = True
        if self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time())


async def receive_body(
    receive: Receive,
    writer: ChunkWriter,
    limit: int,
    interrupt: Interrupt,
    on_chunk: Callable[[bytes], None] | None = None,
    inspect: Callable[[bytes], Awaitable[bool]] | None = None,
) -> BodyEnd:
    """Append the body to ``writer`` until it ends; at most ``limit`` bytes are accepted.

    ``on_chunk`` sees every accepted piece of the body, in order, before it is written (the
    checksum extension hashes the body this way). ``inspect`` sees the first pieces too, until
    it returns True (it has seen enough); it may raise to refuse the upload mid-body.
    """
    try:
        async with asyncio.timeout(None) as timeout:
            interrupt._timeout = timeout
            if interrupt.fired:
                return BodyEnd.INTERRUPTED
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return BodyEnd.DISCONNECTED
                body: bytes = message.get("body", b"")
                if body:
                    if writer.written + len(body) > limit:
                        return BodyEnd.OVERFLOW
                    if on_chunk is not None:
                        on_chunk(body)
                    if inspect is not None and await inspect(body):
                        inspect = None
                    await writer.write(body)
                if not message.get("more_body", False):
                    return BodyEnd.COMPLETE
    except TimeoutError:
        if interrupt.fired:
            return BodyEnd.INTERRUPTED
        raise
    finally:
        interrupt._timeout = None
