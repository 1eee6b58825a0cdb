"""Rate limits against floods: creations per subject and per client address, bytes per second per
subject, uploads writing at once per subject. Each check answers allowed or a Retry-After.

Windows are the ``limits`` library's, in Redis when a URL is given (shared by every node) or in
this process's memory otherwise. The byte budget is paid in quanta (at most 1 MiB) so the PATCH
hot path costs one addition per chunk and one storage call per quantum. Concurrent uploads are
leased slots (``limits`` has no semaphore): a Redis sorted set of lease expiries, so a node that
dies mid-upload frees its slots when their leases run out. A storage that cannot be reached lets
requests through (logged): a Redis outage must not become an outage of uploads.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Final, Protocol

from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

log = logging.getLogger(__name__)

MAX_QUANTUM: Final = 1 << 20
QUANTA_PER_SECOND_MIN: Final = 4  # below 4 MiB/s the quantum shrinks so one never outweighs a second's budget


@dataclass(frozen=True)
class RateLimitSettings:
    """Cut from the settings by app.py; 0 turns a limit off, and all are off by default."""

    creations_per_minute: int = 0  # per token subject
    creations_per_minute_per_address: int = 0  # per client address
    bytes_per_second: int = 0  # per token subject, all its uploads together
    bytes_window_seconds: int = 1  # the budget is bytes_per_second x this, so bursts within it are fine
    concurrent_uploads: int = 0  # requests writing at once, per token subject
    redis_url: str | None = None
    key_prefix: str = "tusingest:ratelimit"
    slot_lease_seconds: float = 300.0  # a slot not renewed this long (its node died) is free again
    concurrent_retry_after_seconds: float = 5.0  # no way to know when another upload ends: a fixed hint

    @property
    def enabled(self) -> bool:
        return bool(
            self.creations_per_minute
            or self.creations_per_minute_per_address
            or self.bytes_per_second
            or self.concurrent_uploads
        )


@dataclass(frozen=True)
class Decision:
    """Allowed, or refused with how many seconds to wait (a float; the header wants whole seconds)."""

    allowed: bool
    retry_after: float = 0.0
    limit: str = ""  # which limit refused: creations, creations_per_address, bytes, concurrent_uploads

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


ALLOWED: Final = Decision(True)


# --- concurrent upload slots --------------------------------------------------------------------


class SlotGate(Protocol):
    """Leased slots under a key: at most ``limit`` unexpired leases at once."""

    async def acquire(self, key: str, limit: int, lease_seconds: float) -> str | None: ...
    async def renew(self, key: str, token: str, lease_seconds: float) -> None: ...
    async def release(self, key: str, token: str) -> None: ...
    async def aclose(self) -> None: ...


class MemorySlotGate:
    """Slots in this process: enough for one node (the memory storage is per process too)."""

    def __init__(self) -> None:
        self._leases: dict[str, dict[str, float]] = {}
        self._clock = time.monotonic

    async def acquire(self, key: str, limit: int, lease_seconds: float) -> str | None:
        now = self._clock()
        leases = self._leases.setdefault(key, {})
        for token in [token for token, expires in leases.items() if expires <= now]:
            del leases[token]
        if len(leases) >= limit:
            return None
        token = uuid.uuid4().hex
        leases[token] = now + lease_seconds
        return token

    async def renew(self, key: str, token: str, lease_seconds: float) -> None:
        leases = self._leases.get(key, {})
        if token in leases:
            leases[token] = self._clock() + lease_seconds

    async def release(self, key: str, token: str) -> None:
        leases = self._leases.get(key)
        if leases is not None:
            leases.pop(token, None)
            if not leases:
                del self._leases[key]

    async def aclose(self) -> None:
        return None


# Redis' own clock decides expiry, so nodes with skewed clocks agree on when a lease ends.
_ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""
_RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[2]) == 1 then
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
end
return 1
"""


class RedisSlotGate:
    """Slots shared by every node: one sorted set per key, member = lease token, score = lease expiry."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis  # here: a node without REDIS_URL never loads redis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)

    async def acquire(self, key: str, limit: int, lease_seconds: float) -> str | None:
        token = uuid.uuid4().hex
        acquired = await self._acquire(keys=[key], args=[limit, lease_seconds, token])
        return token if acquired == 1 else None

    async def renew(self, key: str, token: str, lease_seconds: float) -> None:
        await self._renew(keys=[key], args=[lease_seconds, token])

    async def release(self, key: str, token: str) -> None:
        await self._redis.zrem(key, token)

    async def aclose(self) -> None:
        await self._redis.aclose()


# --- the limiter ------------------------------------------------------------------------------

_UNREACHABLE: Final[tuple[type[Exception], ...]] = (StorageError, OSError, TimeoutError)


class RateLimiter:
    """The checks app.py wires in front of creation and around every write."""

    def __init__(self, settings: RateLimitSettings) -> None:
        self.settings = settings
        if settings.redis_url:
            storage = storage_from_string(
                "async+" + settings.redis_url, implementation="redispy", key_prefix=settings.key_prefix,
                wrap_exceptions=True,
            )  # fmt: skip
            self._gate: SlotGate = RedisSlotGate(settings.redis_url)
            from redis.exceptions import RedisError

            self.unreachable: tuple[type[Exception], ...] = (*_UNREACHABLE, RedisError)  # the slot gate's own
        else:
            storage = storage_from_string("async+memory://", wrap_exceptions=True)
            self._gate = MemorySlotGate()
            self.unreachable = _UNREACHABLE
        assert isinstance(storage, Storage)
        self._storage = storage
        self._moving = MovingWindowRateLimiter(storage)
        self._sliding = SlidingWindowCounterRateLimiter(storage)
        self._per_subject = (
            RateLimitItemPerMinute(settings.creations_per_minute) if settings.creations_per_minute else None
        )
        self._per_address = (
            RateLimitItemPerMinute(settings.creations_per_minute_per_address)
            if settings.creations_per_minute_per_address
            else None
        )
        rate, window = settings.bytes_per_second, settings.bytes_window_seconds
        self._bytes = RateLimitItemPerSecond(rate * window, window) if rate else None
        self.quantum = min(MAX_QUANTUM, max(1, rate // QUANTA_PER_SECOND_MIN)) if rate else 0

    async def check_creation(self, subject: str, address: str) -> Decision:
        """One creation by ``subject`` from ``address``: counted and allowed, or refused with a wait."""
        if self._per_address is not None:
            decision = await self._hit_moving(self._per_address, "creations_per_address", "address", address)
            if not decision.allowed:
                return decision
        if self._per_subject is not None:
            return await self._hit_moving(self._per_subject, "creations", "subject", subject)
        return ALLOWED

    async def _hit_moving(self, item: RateLimitItemPerMinute, limit: str, *identifiers: str) -> Decision:
        try:
            if await self._moving.hit(item, "creations", *identifiers):
                return ALLOWED
            stats = await self._moving.get_window_stats(item, "creations", *identifiers)
        except self.unreachable as exc:
            log.warning("rate limit storage unreachable (%s); creation allowed", exc.__class__.__name__)
            return ALLOWED
        return Decision(False, max(0.0, stats.reset_time - time.time()), limit)

    async def begin_upload(self, subject: str) -> UploadAllowance:
        """Take a concurrent-upload slot (when limited) and open the byte budget of one write request."""
        token: str | None = None
        if self.settings.concurrent_uploads:
            try:
                token = await self._gate.acquire(
                    self._slot_key(subject), self.settings.concurrent_uploads, self.settings.slot_lease_seconds
                )
            except self.unreachable as exc:
                log.warning("rate limit storage unreachable (%s); upload allowed", exc.__class__.__name__)
                return UploadAllowance(self, subject, None, ALLOWED)
            if token is None:
                refused = Decision(False, self.settings.concurrent_retry_after_seconds, "concurrent_uploads")
                return UploadAllowance(self, subject, None, refused)
        return UploadAllowance(self, subject, token, ALLOWED)

    def _slot_key(self, subject: str) -> str:
        return f"{self.settings.key_prefix}:slots:{subject}"

    async def _spend(self, subject: str, cost: int) -> Decision:
        assert self._bytes is not None
        try:
            if await self._sliding.hit(self._bytes, "bytes", subject, cost=cost):
                return ALLOWED
        except self.unreachable as exc:
            log.warning("rate limit storage unreachable (%s); bytes allowed", exc.__class__.__name__)
            return ALLOWED
        # The budget refills at bytes_per_second: this much waiting earns ``cost`` again.
        return Decision(False, cost / self.settings.bytes_per_second, "bytes")

    async def bytes_remaining(self, subject: str) -> int | None:
        """What is left of ``subject``'s byte budget now (None: no byte limit); for status pages and tests."""
        if self._bytes is None:
            return None
        return (await self._sliding.get_window_stats(self._bytes, "bytes", subject)).remaining

    async def aclose(self) -> None:
        await self._gate.aclose()


class UploadAllowance:
    """One write request's share: its concurrency slot and its byte budget, paid quantum by quantum.

    Use: ``allowance = await limiter.begin_upload(sub)``; refuse with 429 unless ``allowance.allowed``;
    ``await allowance.charge(len(chunk))`` as chunks pass (a refusal says how long to wait: sleep
    that long and call ``charge(0)`` to pay the debt, or stop with 429); ``await allowance.release()``
    in a finally.
    """

    def __init__(self, limiter: RateLimiter, subject: str, token: str | None, decision: Decision) -> None:
        self._limiter = limiter
        self._subject = subject
        self._token = token
        self.decision = decision
        self._pending = 0
        self._quantum = limiter.quantum or math.inf
        lease = limiter.settings.slot_lease_seconds
        self._renew_every = lease / 3
        self._renew_at = time.monotonic() + self._renew_every if token is not None else math.inf

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def retry_after(self) -> float:
        return self.decision.retry_after

    async def charge(self, nbytes: int) -> Decision:
        """Count ``nbytes`` that passed; a storage call only once a quantum has gathered (or a lease is due)."""
        self._pending += nbytes
        if self._pending < self._quantum and self._renew_at == math.inf:
            return ALLOWED
        if self._token is not None and time.monotonic() >= self._renew_at:
            await self._renew()
        if self._pending < self._quantum:
            return ALLOWED
        return await self._pay()

    async def _pay(self) -> Decision:
        settings = self._limiter.settings
        limit = settings.bytes_per_second * settings.bytes_window_seconds
        while self._pending > 0:
            cost = min(self._pending, limit)  # a hit above the limit could never succeed
            decision = await self._limiter._spend(self._subject, cost)
            if not decision.allowed:
                return decision  # the debt stays: the next charge pays it first
            self._pending -= cost
        return ALLOWED

    async def _renew(self) -> None:
        assert self._token is not None
        self._renew_at = time.monotonic() + self._renew_every
        try:
            await self._limiter._gate.renew(
                self._limiter._slot_key(self._subject), self._token, self._limiter.settings.slot_lease_seconds
            )
        except self._limiter.unreachable as exc:
            log.warning("rate limit storage unreachable (%s); slot lease not renewed", exc.__class__.__name__)

    async def release(self) -> None:
        """Give the slot back and pay what is left of the budget (tiny requests pay too). Idempotent."""
        if self._pending and self._limiter.quantum:
            await self._pay()  # refused or not, these bytes already passed; a refusal's debt is forgiven
            self._pending = 0
        token, self._token = self._token, None
        if token is not None:
            try:
                await self._limiter._gate.release(self._limiter._slot_key(self._subject), token)
            except self._limiter.unreachable as exc:
                log.warning("rate limit storage unreachable (%s); slot left to its lease", exc.__class__.__name__)
