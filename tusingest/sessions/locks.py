"""One writer per upload: the Locker protocol and its in-process implementation.

Like tusd's ``Lock(ctx, requestUnlock)``: whoever wants a held upload asks the holder to let
go (``on_release_request``), then waits a bounded time. The holder stops reading its body,
commits what it has and releases, so a client that reconnects after a dropped connection is
not locked out by its own dead request.

Implementations: ``MemoryLocker`` (one process, the SQLite deployment) and
``pglocks.PostgresLocker`` (several nodes sharing PostgreSQL). ``app.open_database`` picks one
for a DATABASE_URL; ``tests/contract/test_locker.py`` holds both to the same behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from tusingest.observability.metrics import Metrics

ReleaseRequest = Callable[[], None]


class LockTimeout(Exception):
    """The upload stayed locked by another request for longer than the lock timeout."""


class Locker(Protocol):
    def lock(
        self,
        upload_id: str,
        *,
        on_release_request: ReleaseRequest | None = None,
        timeout: float | None = None,
        ask_holder: bool = True,
    ) -> AbstractAsyncContextManager[None]:
        """Hold the upload's lock for the ``async with`` block; raise LockTimeout.

        While another request holds it, that holder is asked to release (unless
        ``ask_holder`` is false: background work never interrupts a client).
        """

    def claim_new(
        self, upload_id: str, *, on_release_request: ReleaseRequest | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold a brand-new upload whose id no client and no other node knows yet.

        Only this process needs to know of it (so shutdown can stop its body); no lock in a
        shared database is taken, which saves a creation two round trips on PostgreSQL.
        """

    def request_release_all(self) -> None:
        """Ask every holder on this node to let go (graceful shutdown), and from then on every
        request that takes a lock here, at once: a PATCH that waited for its lock while the node
        began to stop commits what it has and lets go, instead of running to the end of its body."""

    async def open(self) -> None:
        """Connect to what the locks live in; raise StoreError with an operator-facing message."""

    async def close(self) -> None:
        """Disconnect; locks still held by this node are given up."""


@dataclass(slots=True)
class _Holder:
    on_release_request: ReleaseRequest | None
    released: asyncio.Event = field(default_factory=asyncio.Event)
    asked: bool = False

    def ask(self) -> bool:
        """Ask the holder to let go, once; whether this call asked."""
        if not self.asked and self.on_release_request is not None:
            self.asked = True
            self.on_release_request()
            return True
        return False


class MemoryLocker:
    """Locks within one process (the SQLite deployment)."""

    def __init__(self, default_timeout: float = 10.0, metrics: Metrics | None = None) -> None:
        self.default_timeout = default_timeout
        self.metrics = metrics or Metrics()  # lock waits and release requests
        self._holders: dict[str, _Holder] = {}
        self._stopping = False  # request_release_all was called: every new holder is asked at once

    def is_locked(self, upload_id: str) -> bool:
        return upload_id in self._holders

    @asynccontextmanager
    async def lock(
        self,
        upload_id: str,
        *,
        on_release_request: ReleaseRequest | None = None,
        timeout: float | None = None,
        ask_holder: bool = True,
    ) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.default_timeout if timeout is None else timeout)
        if upload_id in self._holders:
            self.metrics.lock_waits.inc()
        while (holder := self._holders.get(upload_id)) is not None:
            if ask_holder and holder.ask():
                self.metrics.lock_release_requests.inc()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LockTimeout(upload_id)
            try:
                async with asyncio.timeout(remaining):
                    await holder.released.wait()
            except TimeoutError:
                raise LockTimeout(upload_id) from None
        mine = _Holder(on_release_request)
        self._holders[upload_id] = mine
        if self._stopping:
            mine.ask()
        try:
            yield
        finally:
            del self._holders[upload_id]
            mine.released.set()

    def claim_new(
        self, upload_id: str, *, on_release_request: ReleaseRequest | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self.lock(upload_id, on_release_request=on_release_request)

    def request_release_all(self) -> None:
        self._stopping = True
        for holder in list(self._holders.values()):
            holder.ask()

    async def open(self) -> None:
        pass  # nothing to connect to

    async def close(self) -> None:
        pass
