"""Service discovery: the Storage Element list from the Admin Module's Redis snapshot, kept current
through its change channel, with a local cache, a fallback file and one local directory for when Redis is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random_exponential

from tusingest.elements.model import BackendKind, ElementList, ElementListError, Mode, StorageElement
from tusingest.elements.settings import DiscoverySettings

if TYPE_CHECKING:  # redis is imported where it is used: a node without REDIS_URL never loads it
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

log = logging.getLogger(__name__)

Source = Literal["redis", "cache", "fallback", "default"]


def _redis_unavailable() -> tuple[type[Exception], ...]:
    """What an unreachable, restarting or misconfigured Redis raises; all of it means "try again later".
    Evaluated only where Redis is in use (an ``except`` clause evaluates it once something is raised)."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)


FIRST_RECONNECT_SECONDS = 0.1
# Our own PING on a quiet subscription carries this payload so its reply reaches us: redis-py
# swallows the replies to its health-check PINGs.
LIVENESS_PING = "tusingest-discovery-liveness"


class DiscoveryError(Exception):
    """The element list cannot be had: a configured fallback file is unusable, or Redis is unavailable."""


class ElementDiscovery:
    """The current Storage Element list and where it came from, followed live while Redis answers.

    ``on_change`` is called (synchronously, in the event loop) with the new list whenever the list
    changes, the first time at ``start()``.
    """

    def __init__(
        self,
        *,
        redis_url: str | None,
        key: str,
        channel: str,
        fallback_path: str | os.PathLike[str] | None,
        cache_path: str | os.PathLike[str],
        default_element_dir: str | os.PathLike[str],
        reconnect_max_seconds: float = 30.0,
        timeout_seconds: float = 3.0,
        health_check_seconds: float = 10.0,
        on_change: Callable[[ElementList], None] | None = None,
    ) -> None:
        self._redis_url = redis_url
        self._key = key
        self._channel = channel
        self._fallback_path = Path(fallback_path) if fallback_path is not None else None
        self._cache_path = Path(cache_path)
        self._default_element_dir = os.fspath(default_element_dir)
        self._reconnect_max_seconds = reconnect_max_seconds
        self._timeout_seconds = timeout_seconds
        self._health_check_seconds = health_check_seconds
        self._on_change = on_change

        self._current: ElementList | None = None
        self._source: Source = "default"
        self._cached: ElementList | None = None  # what the cache file holds, to skip rewriting it unchanged
        self._connected = False
        self._last_error: str | None = None
        self._last_refresh: datetime | None = None
        self._outage_since: float | None = None
        self._key_problem: str | None = None
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        # Key reads and published snapshots are applied one at a time, so an older read cannot land
        # after a newer one.
        self._applying = asyncio.Lock()

    @classmethod
    def from_settings(
        cls, settings: DiscoverySettings, *, on_change: Callable[[ElementList], None] | None = None
    ) -> Self:
        return cls(
            redis_url=settings.redis_url,
            key=settings.key,
            channel=settings.channel,
            fallback_path=settings.fallback_path,
            cache_path=settings.cache_path,
            default_element_dir=settings.default_element_dir,
            reconnect_max_seconds=settings.reconnect_max_seconds,
            on_change=on_change,
        )

    @property
    def current(self) -> ElementList:
        if self._current is None:
            raise RuntimeError("ElementDiscovery.start() has not been called")
        return self._current

    @property
    def source(self) -> Source:
        """Where the current list came from: "redis", "cache", "fallback" or "default"."""
        return self._source

    @property
    def connected(self) -> bool:
        """Subscribed to the change channel and the key read; False while Redis is away or not configured."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """The problem that keeps the list from being current from Redis; None when there is none."""
        return self._last_error

    @property
    def last_refresh(self) -> datetime | None:
        """When the list was last confirmed from Redis (key read or published snapshot)."""
        return self._last_refresh

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Load the initial list and, with Redis configured, start following the channel.

        Raises DiscoveryError when a configured fallback file is missing or invalid, whether or not
        it is needed now: a typo must not wait for the first Redis outage to show.
        """
        if self._current is not None:
            raise RuntimeError("ElementDiscovery.start() was already called")
        fallback = await asyncio.to_thread(self._read_fallback) if self._fallback_path is not None else None
        if self._redis_url is None:
            if fallback is not None:
                await self._apply(fallback, "fallback")
            else:
                await self._apply(self._default_list(), "default")
            return

        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._redis = Redis.from_url(
            self._redis_url,
            socket_connect_timeout=self._timeout_seconds,
            socket_timeout=self._timeout_seconds,
            # A pooled connection idle this long is PINGed before reuse; see _listen for the subscription.
            health_check_interval=self._health_check_seconds,
            # Reconnecting is ours to pace (with backoff, logged once per outage), not redis-py's.
            retry=Retry(NoBackoff(), 0),
            client_name="tusingest-discovery",
        )
        pubsub: PubSub | None = None
        try:
            try:
                pubsub = await self._subscribe_and_read()
            except _redis_unavailable() as exc:
                self._lost(exc)
            if self._current is None:
                local, source = await asyncio.to_thread(self._local_list, fallback)
                await self._apply(local, source)
        except BaseException:  # cancelled, or a bug: leave no connection behind
            if pubsub is not None:
                await _close(pubsub)
            await self.close()
            self._current = None
            raise
        self._task = asyncio.create_task(self._follow(pubsub), name="element-discovery")
        self._task.add_done_callback(self._follow_ended)

    async def refresh(self) -> ElementList:
        """Re-read the key now and return the current list; DiscoveryError when Redis is unavailable."""
        if self._redis is None:
            raise DiscoveryError("service discovery has no Redis (REDIS_URL is not set, or not started)")
        try:
            async with self._applying:
                await self._read_and_apply()
        except _redis_unavailable() as exc:
            self._last_error = _describe(exc)
            raise DiscoveryError(f"Redis at {_where(self._redis_url)} is unavailable: {_describe(exc)}") from exc
        return self.current

    async def close(self) -> None:
        """Stop following and close the Redis connections; the current list stays readable."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._connected = False

    # Following the channel

    async def _follow(self, pubsub: PubSub | None) -> None:
        """Listen until cancelled; after any loss, resubscribe with backoff and re-read the key."""
        while True:
            try:
                if pubsub is None:
                    pubsub = await self._resubscribe()
                await self._listen(pubsub)
            except _redis_unavailable() as exc:
                self._lost(exc)
            finally:
                if pubsub is not None:
                    await _close(pubsub)
                    pubsub = None

    async def _resubscribe(self) -> PubSub:
        # Half the wait doubles each attempt, the other half is random, so ingesters that lost Redis
        # together do not all come back in the same instant.
        half_cap = self._reconnect_max_seconds / 2
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_redis_unavailable()),
            wait=wait_exponential(multiplier=FIRST_RECONNECT_SECONDS, max=half_cap)
            + wait_random_exponential(multiplier=FIRST_RECONNECT_SECONDS, max=half_cap),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await self._subscribe_and_read()
                except _redis_unavailable() as exc:
                    self._lost(exc)
                    raise
        raise AssertionError("AsyncRetrying without a stop condition ended")  # pragma: no cover

    async def _subscribe_and_read(self) -> PubSub:
        """Subscribe, then read the key: a change published in between is then not missed."""
        assert self._redis is not None
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            await self._confirm_subscription(pubsub)
            # Connected from here: the list read next is Redis's, and whoever sees it applied must
            # also see the connection it came through (a failed read below marks it lost again).
            self._connected = True
            async with self._applying:
                await self._read_and_apply()
        except BaseException:
            self._connected = False
            await _close(pubsub)
            raise
        if self._outage_since is not None:
            outage = asyncio.get_running_loop().time() - self._outage_since
            log.info("Redis at %s answers again after %.1f s", _where(self._redis_url), outage)
            self._outage_since = None
            if self._key_problem is None:
                self._last_error = None
        return pubsub

    async def _confirm_subscription(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_seconds
        while (remaining := deadline - loop.time()) > 0:
            reply = await pubsub.get_message(timeout=remaining)
            if reply is not None and reply["type"] == "subscribe":
                return
        raise TimeoutError(f"Redis did not confirm SUBSCRIBE {self._channel} within {self._timeout_seconds:g} s")

    async def _listen(self, pubsub: PubSub) -> None:
        """Handle publications until the connection fails.

        redis-py's health check PINGs a quiet subscription but puts no deadline on the reply, so a
        frozen or partitioned server would go unnoticed until TCP gives up, minutes later. After
        ``health_check_seconds`` of silence we PING ourselves and give the reply as long again.
        """
        loop = asyncio.get_running_loop()
        interval = self._health_check_seconds
        heard = loop.time()
        pinged: float | None = None
        while True:
            deadline = (heard if pinged is None else pinged) + interval
            message = await pubsub.get_message(timeout=max(0.0, deadline - loop.time()))
            if message is not None:
                heard, pinged = loop.time(), None
                if message["type"] == "message":
                    await self._on_published(message["data"])
                continue
            if loop.time() < deadline:
                continue  # redis-py read and swallowed the reply to its own health check
            if pinged is not None:
                raise TimeoutError(f"Redis did not answer PING within {interval:g} s")
            await pubsub.ping(LIVENESS_PING)
            pinged = loop.time()

    async def _on_published(self, data: Any) -> None:
        """A full snapshot is applied unless older than what we have; anything else means "re-read the key"."""
        snapshot = _published_snapshot(data)
        async with self._applying:
            if snapshot is None:
                await self._read_and_apply()
            elif self._source == "redis" and snapshot.version < self.current.version:
                # Versions count in the Admin Module's sequence, so only a list from Redis is compared.
                log.info(
                    "ignored a published element list version %d: older than the current version %d",
                    snapshot.version,
                    self.current.version,
                )
            else:
                await self._apply(snapshot, "redis")

    def _lost(self, exc: BaseException) -> None:
        self._connected = False
        self._last_error = _describe(exc)
        if self._outage_since is None:
            self._outage_since = asyncio.get_running_loop().time()
            log.warning(
                "Redis at %s is unavailable (%s); %s, reconnecting with backoff up to %g s",
                _where(self._redis_url),
                self._last_error,
                self._keeping(),
                self._reconnect_max_seconds,
            )

    def _follow_ended(self, task: asyncio.Task[None]) -> None:
        self._connected = False
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._last_error = _describe(exc)
            log.error("service discovery stopped following Redis", exc_info=exc)

    # Reading and applying lists

    async def _read_and_apply(self) -> None:
        """Read the key (the caller holds ``_applying``); a missing or invalid value keeps the current list."""
        assert self._redis is not None
        from redis.exceptions import ResponseError

        try:
            raw = await self._redis.get(self._key)
        except ResponseError as exc:  # e.g. WRONGTYPE: the key holds something else than a string
            self._key_trouble(f"key {self._key} cannot be read: {exc}")
            return
        if raw is None:
            self._key_trouble(f"key {self._key} does not exist")
            return
        try:
            listed = ElementList.parse(raw)
        except ElementListError as exc:
            self._key_trouble(f"key {self._key} holds no valid element list: {exc}")
            return
        if self._key_problem is not None:
            self._key_problem = None
            if self._outage_since is None:
                self._last_error = None
        await self._apply(listed, "redis")

    def _key_trouble(self, problem: str) -> None:
        self._last_error = problem
        if problem != self._key_problem:
            self._key_problem = problem
            log.warning("Redis at %s: %s; %s", _where(self._redis_url), problem, self._keeping())

    def _keeping(self) -> str:
        if self._current is None:
            return "using a local list"
        return f"keeping version {self._current.version} from {self._source}"

    async def _apply(self, listed: ElementList, source: Source) -> None:
        previous, previous_source = self._current, self._source
        self._current, self._source = listed, source
        if source == "redis":
            self._last_refresh = datetime.now(UTC)
        if listed != previous or source != previous_source:
            log.info(
                "storage element list version %d with %d element(s) from %s",
                listed.version,
                len(listed.storage_elements),
                source,
            )
        if listed != previous and self._on_change is not None:
            try:
                self._on_change(listed)
            except Exception:
                log.exception("the storage element list change handler failed")
        if source == "redis" and listed != self._cached:
            try:
                await asyncio.to_thread(_write_atomically, self._cache_path, listed.to_json())
            except OSError as exc:
                log.warning("cannot write the element list cache %s: %s", self._cache_path, exc)
            else:
                self._cached = listed

    def _read_fallback(self) -> ElementList:
        assert self._fallback_path is not None
        try:
            return ElementList.parse(self._fallback_path.read_bytes())
        except (OSError, ElementListError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DiscoveryError(
                f"fallback element list {self._fallback_path} (SERVICE_DISCOVERY_FALLBACK_CONFIG) is unusable: {reason}"
            ) from exc

    def _local_list(self, fallback: ElementList | None) -> tuple[ElementList, Source]:
        """Without Redis: the cache of the last list Redis gave, else the fallback file, else the default."""
        if self._cache_path.exists():
            try:
                cached = ElementList.parse(self._cache_path.read_bytes())
            except (OSError, ElementListError) as exc:
                log.warning("element list cache %s ignored: %s", self._cache_path, exc)
            else:
                self._cached = cached
                return cached, "cache"
        if fallback is not None:
            return fallback, "fallback"
        return self._default_list(), "default"

    def _default_list(self) -> ElementList:
        local = StorageElement(
            element_id="local",
            name="local directory",
            mode=Mode.EDIT,
            backend=BackendKind.DIRECTORY,
            path=self._default_element_dir,
            priority=100,
            status="online",
            capacity_bytes=None,
            used_bytes=0,
        )
        return ElementList(version=0, storage_elements=(local,))


def _published_snapshot(data: Any) -> ElementList | None:
    """The list in a published message, or None when the message is a change event to re-read the key for."""
    try:
        document = json.loads(data)
    except (TypeError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a bare string such as "changed"
    if not isinstance(document, dict) or "storage_elements" not in document:
        return None
    try:
        return ElementList.parse(data)
    except ElementListError as exc:
        log.warning("published element list is invalid (%s); re-reading the key instead", exc)
        return None


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


async def _close(pubsub: PubSub) -> None:
    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # unannotated before redis-py 8.2


def _where(url: str | None) -> str:
    """host:port of a Redis URL, for logs: the URL itself may carry a password."""
    if url is None:
        return "(none)"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
