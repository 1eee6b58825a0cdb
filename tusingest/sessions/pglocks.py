"""One writer per upload across nodes: the Locker on PostgreSQL advisory locks.

Within a node an inner MemoryLocker serialises requests first, so local contention never
reaches the database. The one request per upload that gets through then takes a session-level
``pg_try_advisory_lock`` on this node's lock connection: one dedicated connection that holds
every advisory lock of the node, so a node that dies frees its locks with its connection.

A node that finds an upload held elsewhere asks the holder to let go, like tusd's
``Lock(ctx, requestUnlock)``: ``NOTIFY tusingest_lock, 'release:<id>'``. Every node LISTENs on
a second connection; the holding node calls its holder's ``on_release_request`` and, when the
holder lets go, answers ``released:<id>`` so the waiter retries at once. Waiters also retry on
a short backoff, so a lost notification costs a little latency, never the lock.

If the lock connection breaks, PostgreSQL has already freed every lock of the node: the
holders are asked to let go at once, their unlocks become no-ops and the next lock reconnects.
Until a holder notices, another node may take the same upload; the store's compare-and-set
commit (``commit_offset`` expects the old offset) keeps that from ever advancing an offset falsely.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tusingest.observability.metrics import Metrics
from tusingest.sessions.locks import LockTimeout, MemoryLocker, ReleaseRequest
from tusingest.sessions.pgpool import describe_database
from tusingest.sessions.store import StoreError

log = logging.getLogger(__name__)

CHANNEL = "tusingest_lock"
# Payloads on CHANNEL, each followed by the upload id:
_RELEASE = "release:"  # a node waits for the upload and asks its holder to let go
_WAIT = "wait:"  # a node waits without asking (background work): only tell it when the lock is free
_RELEASED = "released:"  # the holder let go of an upload somebody waited for

_CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def lock_key(upload_id: str) -> int:
    """The upload's advisory lock key: a stable signed 64-bit hash of its id, the same on every node."""
    digest = hashlib.blake2b(upload_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Hold:
    """This node's claim on one upload: the holder's release callback and the connection with the lock."""

    __slots__ = ("asked", "connection", "on_release_request", "wanted")

    def __init__(self, on_release_request: ReleaseRequest | None) -> None:
        self.on_release_request = on_release_request
        self.asked = False
        self.wanted = False  # another node waits for this upload: tell it when we let go
        self.connection: asyncpg.Connection | None = None

    def ask(self) -> None:
        # Local newcomers (through the inner MemoryLocker) and other nodes ask through here: once is enough.
        if not self.asked and self.on_release_request is not None:
            self.asked = True
            self.on_release_request()


class PostgresLocker:
    """Locks shared by every node on one PostgreSQL database (the cluster deployment)."""

    def __init__(
        self,
        database_url: str,
        default_timeout: float = 10.0,
        *,
        connect_timeout: float = 10.0,
        command_timeout: float = 10.0,
        retry_interval: tuple[float, float] = (0.05, 0.5),
        metrics: Metrics | None = None,
    ) -> None:
        self.database_url = database_url
        self.metrics = metrics or Metrics()
        self.default_timeout = default_timeout
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.retry_interval = retry_interval
        self._local = MemoryLocker(default_timeout, self.metrics)  # counts the waits within this node
        self._held: dict[str, _Hold] = {}  # uploads whose advisory lock this node holds
        self._wakeups: dict[str, asyncio.Event] = {}  # the one local waiter per upload (the inner lock's holder)
        self._connection: asyncpg.Connection | None = None
        self._connection_lock = asyncio.Lock()  # one statement at a time on the lock connection
        self._listener: asyncpg.Connection | None = None
        self._listening: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._open = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        connection = await self._connect_lock_connection()
        try:
            listener, lost = await self._listen()
        except BaseException:
            connection.terminate()
            raise
        self._connection, self._listener, self._open = connection, listener, True
        self._listening = asyncio.create_task(self._keep_listening(lost), name="lock-notifications")

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        connection, self._connection = self._connection, None
        listener, self._listener = self._listener, None
        if connection is not None:
            self._ask_holders_on(connection)
        for event in self._wakeups.values():
            event.set()  # waiters retry now and learn that the locker is closed
        for conn in (listener, connection):
            if conn is not None:
                await self._close_connection(conn)

    async def _close_connection(self, connection: asyncpg.Connection) -> None:
        try:
            await connection.close(timeout=self.command_timeout)
        except _CONNECTION_ERRORS:
            connection.terminate()

    async def _connect(self) -> asyncpg.Connection:
        try:
            connection: asyncpg.Connection = await asyncpg.connect(
                self.database_url,
                timeout=self.connect_timeout,
                server_settings={"application_name": "tusingest-locks"},
            )
        except _CONNECTION_ERRORS as exc:
            raise StoreError(f"cannot connect to PostgreSQL {describe_database(self.database_url)}: {exc}") from exc
        return connection

    # -- Locker ------------------------------------------------------------------------------

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
        hold = _Hold(on_release_request)
        local_timeout = max(0.0, deadline - loop.time())
        async with self._local.lock(
            upload_id, on_release_request=hold.ask, timeout=local_timeout, ask_holder=ask_holder
        ):
            await self._acquire(upload_id, hold, deadline, ask_holder)
            self._held[upload_id] = hold
            try:
                yield
            finally:
                del self._held[upload_id]
                await self._release(upload_id, hold)

    def claim_new(
        self, upload_id: str, *, on_release_request: ReleaseRequest | None = None
    ) -> AbstractAsyncContextManager[None]:
        # No other node can know a new id yet: the in-process lock is all it needs.
        return self._local.lock(upload_id, on_release_request=on_release_request)

    def request_release_all(self) -> None:
        self._local.request_release_all()

    # -- acquiring and releasing -------------------------------------------------------------

    async def _acquire(self, upload_id: str, hold: _Hold, deadline: float, ask_holder: bool) -> None:
        loop = asyncio.get_running_loop()
        key = lock_key(upload_id)
        pause, longest_pause = self.retry_interval
        first_try = True
        while True:
            woken = self._wakeups[upload_id] = asyncio.Event()  # before trying: a `released` may come at once
            try:
                remaining = deadline - loop.time()
                if ask_holder:
                    note: str | None = _RELEASE + upload_id
                else:
                    note = _WAIT + upload_id if remaining > 0 else None
                hold.connection = await self._try_lock(key, note)
                if hold.connection is not None:
                    return
                if first_try:  # another node holds it: a wait, and (with ask_holder) a release request sent
                    first_try = False
                    self.metrics.lock_waits.inc()
                    if ask_holder:
                        self.metrics.lock_release_requests.inc()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise LockTimeout(upload_id)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, pause)):
                        await woken.wait()
                pause = min(pause * 2, longest_pause)
            finally:
                if self._wakeups.get(upload_id) is woken:
                    del self._wakeups[upload_id]

    async def _try_lock(self, key: int, note: str | None) -> asyncpg.Connection | None:
        """The lock connection if it now holds ``key``; else None, after sending ``note`` to the holder."""
        attempt = asyncio.ensure_future(self._try_lock_on_connection(key, note))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # The database may grant the lock after all: then nobody owns it, so give it back.
            attempt.add_done_callback(lambda done: self._give_back(key, done))
            raise

    async def _try_lock_on_connection(self, key: int, note: str | None) -> asyncpg.Connection | None:
        async with self._connection_lock:
            connection = await self._lock_connection()
            try:
                if await connection.fetchval("SELECT pg_try_advisory_lock($1)", key, timeout=self.command_timeout):
                    return connection
                if note is not None:
                    await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, note, timeout=self.command_timeout)
            except _CONNECTION_ERRORS as exc:
                self._lost(connection, exc)
                raise StoreError(f"the upload lock connection failed: {exc}") from exc
            return None

    def _give_back(self, key: int, attempt: asyncio.Future[asyncpg.Connection | None]) -> None:
        if attempt.cancelled() or attempt.exception() is not None or (connection := attempt.result()) is None:
            return
        self._spawn(self._unlock(key, connection, None))

    async def _release(self, upload_id: str, hold: _Hold) -> None:
        if hold.connection is None:
            return
        note = _RELEASED + upload_id if hold.wanted else None
        unlock = self._spawn(self._unlock(lock_key(upload_id), hold.connection, note))
        # Shielded: a cancelled holder still gives the lock back before a local newcomer may take it.
        await asyncio.shield(unlock)

    async def _unlock(self, key: int, connection: asyncpg.Connection, note: str | None) -> None:
        async with self._connection_lock:
            if connection is not self._connection or connection.is_closed():
                return  # that connection is gone, and PostgreSQL freed its locks with it
            try:
                if note is None:
                    released = await connection.fetchval(
                        "SELECT pg_advisory_unlock($1)", key, timeout=self.command_timeout
                    )
                else:
                    # One round trip: the notification goes out when this statement commits.
                    released = await connection.fetchval(
                        "SELECT pg_advisory_unlock($1), pg_notify($2, $3)",
                        key,
                        CHANNEL,
                        note,
                        timeout=self.command_timeout,
                    )
            except _CONNECTION_ERRORS as exc:
                self._lost(connection, exc)  # which frees the lock as well
                return
            if not released:
                log.warning("advisory lock %d was not held by this node when released", key)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- the lock connection -----------------------------------------------------------------

    async def _lock_connection(self) -> asyncpg.Connection:
        """The live lock connection, reconnecting after a loss. Called under ``_connection_lock``."""
        if not self._open:
            raise StoreError("the PostgreSQL upload locker is not open")
        connection = self._connection
        if connection is None or connection.is_closed():
            connection = self._connection = await self._connect_lock_connection()
            log.info("upload lock connection re-established")
        return connection

    async def _connect_lock_connection(self) -> asyncpg.Connection:
        connection = await self._connect()
        connection.add_termination_listener(self._on_lock_connection_closed)
        return connection

    def _on_lock_connection_closed(self, connection: asyncpg.Connection | PoolConnectionProxy) -> None:
        if connection is self._connection:
            self._lost(connection, None)

    def _lost(self, connection: asyncpg.Connection, exc: BaseException | None) -> None:
        """Every lock on ``connection`` is gone (or will be once it is closed): tell its holders."""
        if connection is self._connection:
            self._connection = None
            log.warning("upload lock connection lost (%s): asking its holders to let go", exc or "closed")
        connection.terminate()  # make sure PostgreSQL frees the locks, whatever state the session is in
        self._ask_holders_on(connection)

    def _ask_holders_on(self, connection: asyncpg.Connection) -> None:
        for hold in list(self._held.values()):
            if hold.connection is connection:
                hold.ask()

    # -- notifications -----------------------------------------------------------------------

    async def _listen(self) -> tuple[asyncpg.Connection, asyncio.Event]:
        listener = await self._connect()
        lost = asyncio.Event()
        listener.add_termination_listener(lambda _: lost.set())
        try:
            await listener.add_listener(CHANNEL, self._on_notification)
        except BaseException as exc:
            listener.terminate()
            if isinstance(exc, _CONNECTION_ERRORS):
                raise StoreError(f"cannot listen for upload lock notifications: {exc}") from exc
            raise
        return listener, lost

    async def _keep_listening(self, lost: asyncio.Event) -> None:
        """Reconnect the listener when it breaks; waiters poll meanwhile, so nothing waits forever."""
        pause = self.retry_interval[1]
        while True:
            await lost.wait()
            log.warning("upload lock notification connection lost: reconnecting")
            while True:
                try:
                    self._listener, lost = await self._listen()
                    break
                except StoreError as exc:
                    log.warning("%s; retrying in %.1f s", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 10.0)
            pause = self.retry_interval[1]
            for event in self._wakeups.values():
                event.set()  # a `released` may have been missed

    def _on_notification(
        self, connection: asyncpg.Connection | PoolConnectionProxy, pid: int, channel: str, payload: object
    ) -> None:
        if not isinstance(payload, str):
            return
        kind, _, upload_id = payload.partition(":")
        if kind == _RELEASED[:-1]:
            if (woken := self._wakeups.get(upload_id)) is not None:
                woken.set()
            return
        hold = self._held.get(upload_id)
        if hold is None:
            return
        hold.wanted = True
        if kind == _RELEASE[:-1]:
            hold.ask()
