"""ASGI middleware for responses sent before the request body was read to its end.

tus answers early on purpose (413 before a 1 GiB body, 409, an interrupted PATCH). Two things
must then happen: the response says ``Connection: close``, because the rest of the body is
still on the wire; and somebody keeps taking the body's remaining messages, because Hypercorn
(h11) delivers the close to the app through the same bounded queue as the body, and with the
queue full and nobody reading, the connection would hang for good.

Being the one wrapper around every body, it also counts the body's bytes for the access line
(``note_bytes_in``, once per request), so observability needs no wrapper of its own.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tusingest.observability.logs import note_bytes_in

_DRAIN_LIMIT_SECONDS = 30.0


class UnreadBodyGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _announces_body(scope):
            await self.app(scope, receive, send)
            return

        body_done = False
        received = 0
        drain: asyncio.Task[None] | None = None

        async def tracking_receive() -> Message:
            nonlocal body_done, received
            message = await receive()
            received += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def drain_rest() -> None:
            nonlocal received
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DRAIN_LIMIT_SECONDS):
                    while True:
                        message = await receive()
                        received += len(message.get("body", b""))
                        if message["type"] == "http.disconnect" or not message.get("more_body", False):
                            return

        async def guarded_send(message: Message) -> None:
            nonlocal drain
            if body_done:
                await send(message)
                return
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and drain is None:
                drain = asyncio.create_task(drain_rest())
            await send(message)

        try:
            await self.app(scope, tracking_receive, guarded_send)
        finally:
            if drain is not None:
                await drain
            note_bytes_in(received)


def _announces_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False
