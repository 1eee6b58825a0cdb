"""ASGI middleware that applies the rate limits of ``tusingest/ratelimit.py`` to every route, so no
handler knows about them: creations per subject and per client address, requests writing at once per
subject, and a byte budget per subject.

It sits after authentication and reads the caller from ``scope["state"]["identity"]`` (anything with a
``subject``); without one (no auth middleware in front) the client address stands for the subject.

A refusal is a 429 with Retry-After, answered before the body is read, in the words of the route:
tus routes as a ``TusError`` (text, Tus-Resumable), /api routes as ``{"error": "rate_limited", ...}``.

An exhausted byte budget throttles instead of refusing: ``receive`` waits until the budget has
earned the bytes again. A 429 could only come before the body (its size is not the cost: the
budget runs out while bytes flow) or in the middle of one, where the client would have to find
its offset and resend; waiting slows the sender through TCP back-pressure and the upload
succeeds at the allowed rate. Keep RATE_LIMIT_BYTES_PER_SECOND above BODY_MIN_RATE_KBPS so a
throttled body is not cut off as too slow (config.py refuses the opposite).
"""

from __future__ import annotations

import asyncio
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tusingest.api.errors import ApiError
from tusingest.ratelimit import Decision, RateLimiter, UploadAllowance
from tusingest.tus.errors import RateLimited
from tusingest.tus.server import TusServer

FACADE_UPLOAD: Final = "/api/files/upload"
FACADE_BATCH: Final = "/api/files/batch/upload"

_MESSAGES: Final = {
    "creations": "too many uploads created by this caller; retry after the time in Retry-After",
    "creations_per_address": "too many uploads created from this address; retry after the time in Retry-After",
    "concurrent_uploads": "too many uploads of this caller are being written at once; retry when one has ended",
}


class RateLimits:
    """Wraps the app; owns ``limiter`` and closes it when the app shuts down (lifespan)."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, tus_base_path: str) -> None:
        self.app = app
        self.limiter = limiter
        self._tus_collection = {tus_base_path, tus_base_path.rstrip("/") or "/"}
        self._tus_prefix = tus_base_path
        settings = limiter.settings
        self._counts_creations = bool(settings.creations_per_minute or settings.creations_per_minute_per_address)
        self._counts_writes = bool(settings.concurrent_uploads or settings.bytes_per_second)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_on_shutdown(send))
            return
        if scope["type"] != "http" or not self.limiter.settings.enabled:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        is_tus = path in self._tus_collection or path.startswith(self._tus_prefix)
        if not is_tus and not path.startswith("/api/"):
            await self.app(scope, receive, send)
            return
        method = _method(scope)
        creates = self._counts_creations and _is_creation(method, path, scope, self._tus_collection)
        writes = self._counts_writes and (method == "PATCH" or (method == "POST" and _announces_body(scope)))
        if not creates and not writes:
            await self.app(scope, receive, send)
            return

        subject, address = _caller(scope)
        allowance: UploadAllowance | None = None
        try:
            if writes:
                allowance = await self.limiter.begin_upload(subject)
                if not allowance.allowed:
                    await _refuse(allowance.decision, is_tus, scope, receive, send)
                    return
            if creates:
                decision = await self.limiter.check_creation(subject, address)
                if not decision.allowed:
                    await _refuse(decision, is_tus, scope, receive, send)
                    return
            if allowance is not None and self.limiter.settings.bytes_per_second:
                receive = _charging(receive, allowance)
            await self.app(scope, receive, send)
        finally:
            if allowance is not None:
                await allowance.release()

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.limiter.aclose()
            await send(message)

        return closing


def _charging(receive: Receive, allowance: UploadAllowance) -> Receive:
    """``receive`` that pays for each body chunk and, with the budget spent, waits until it is earned."""

    async def charged() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            decision = await allowance.charge(len(message.get("body", b"")))
            while not decision.allowed:
                await asyncio.sleep(decision.retry_after)  # the time that earns the debt back
                decision = await allowance.charge(0)
        return message

    return charged


async def _refuse(decision: Decision, is_tus: bool, scope: Scope, receive: Receive, send: Send) -> None:
    message = _MESSAGES.get(decision.limit, "rate limited; retry after the time in Retry-After")
    headers = {"Retry-After": decision.retry_after_header}
    if is_tus:
        response = TusServer.error_response(RateLimited(message, headers=headers))
    else:
        response = ApiError(429, "rate_limited", message, headers=headers).response()
    await response(scope, receive, send)


def _caller(scope: Scope) -> tuple[str, str]:
    """(subject, client address): the identity's subject, or the address where no identity was stored."""
    client = scope.get("client")
    address = str(client[0]) if client else "unknown"
    identity = scope.get("state", {}).get("identity")
    subject = getattr(identity, "subject", None)
    return (str(subject) if subject else f"address:{address}"), address


def _method(scope: Scope) -> str:
    """The method a tus handler will act on: POST with X-HTTP-Method-Override is that method."""
    method: str = scope["method"]
    if method == "POST":
        override = _header(scope, b"x-http-method-override")
        if override is not None:
            return override.decode("latin-1").strip().upper()
    return method


def _is_creation(method: str, path: str, scope: Scope, tus_collection: set[str]) -> bool:
    if method != "POST":
        return False
    if path in tus_collection or path == FACADE_BATCH:  # a batch counts once, whatever its files
        return True
    return path == FACADE_UPLOAD and _header(scope, b"x-upload-session-id") is None


def _announces_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return _header(scope, b"transfer-encoding") is not None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
