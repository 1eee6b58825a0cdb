"""The outbox relay: sends the messages that sagas queued in the SagaStore (file events to the Redis stream, signed
webhooks) at least once, retrying failures with exponential backoff, in the background of uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tusingest.observability import tracing
from tusingest.observability.metrics import Metrics
from tusingest.saga.records import OutboxMessage
from tusingest.saga.runner import cancel_and_wait
from tusingest.saga.store import SagaStore
from tusingest.saga.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, USER_AGENT, sign, webhook_body

if TYPE_CHECKING:  # imported where used: a node without REDIS_URL or webhooks loads neither
    import aiohttp
    from redis.asyncio import Redis
    from redis.typing import EncodableT, FieldT

log = logging.getLogger(__name__)

# Deliveries in flight at once per round: enough to hide a slow receiver, few enough to spare the receivers.
MAX_CONCURRENT_DELIVERIES = 8
# 2**62 seconds is far beyond any cap; the exponent stops there so the arithmetic cannot overflow.
_MAX_EXPONENT = 62
_ERROR_BODY_CHARS = 200


def full_jitter(ceiling: float) -> float:
    """A delay drawn uniformly from [0, ceiling], so senders that failed together do not retry together."""
    return random.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What one round did: messages delivered (marked so) and messages that failed (rescheduled)."""

    delivered: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class _Failure:
    error: str  # kept in the outbox row as last_error
    destination_down: bool  # unreachable or timed out, rather than one message refused
    status: int | None = None  # the HTTP status of a webhook that answered


class OutboxRelay:
    """Claims due outbox messages, sends them and marks them delivered or reschedules them.

    Delivery is at least once: a message sent but not yet marked (a crash, a lost store connection) is sent
    again once its claim lease passes, so receivers drop duplicates by the event id. Messages are sent
    concurrently, so their order is not kept. With ``redis_url`` None, ``redis_stream`` messages are marked
    delivered without being sent (logged once): the sagas queue none when Redis is not configured, so only
    messages queued before Redis was removed from the configuration meet this, and they must not pile up.

    ``claim_lease_seconds`` must outlast a round (a batch at ``MAX_CONCURRENT_DELIVERIES`` at a time, each up to
    ``webhook_timeout``), or another node may claim and send messages still in flight; a destination that
    times out once in a round is not tried again in that round, which keeps rounds short during an outage.
    ``jitter`` turns the backoff ceiling into the delay (tests pass ``lambda ceiling: ceiling``).
    """

    def __init__(
        self,
        store: SagaStore,
        *,
        redis_url: str | None,
        webhook_secret: str | None,
        webhook_timeout: float,
        retry_max_seconds: float,
        poll_interval: float,
        batch_size: int = 50,
        claim_lease_seconds: float = 60.0,
        base_delay: float = 1.0,
        jitter: Callable[[float], float] = full_jitter,
        tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._tls_min_version = tls_min_version
        self._redis_url = redis_url
        self._secret = webhook_secret or None  # an empty WEBHOOK_SECRET means none, not signing with ""
        self._timeout = webhook_timeout
        self._retry_max_seconds = retry_max_seconds
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._claim_lease_seconds = claim_lease_seconds
        self._base_delay = base_delay
        self._jitter = jitter
        self._opened = False
        self._http: aiohttp.ClientSession | None = None  # made for the first webhook
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failing: dict[str, str] = {}  # destination -> the error that started its outage (logged once)
        self._store_failing = False
        self._warned_unsigned = False
        self._warned_no_redis = False

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the Redis client; ``deliver_due`` needs it (the HTTP session comes with the first webhook).
        ``start`` calls this."""
        if self._opened:
            return
        self._opened = True
        if self._redis_url is not None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError

            self._redis = Redis.from_url(
                self._redis_url,
                socket_connect_timeout=self._timeout,
                socket_timeout=self._timeout,
                # One immediate retry on a broken connection: a pooled one dies with a Redis restart, and the
                # first XADD after it should not count as a failed delivery. No retry on a timeout: that
                # would double the wait on a hung server. Backoff beyond that is the outbox's.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                client_name="tusingest-outbox",
            )

    def _webhook_session(self) -> aiohttp.ClientSession:
        if self._http is None:
            import aiohttp

            # https receivers: the certificate verified (system CAs, or SSL_CERT_FILE) at ELEMENT_TLS_MIN_VERSION
            # at least; an http:// webhook URL stays plain.
            tls = ssl.create_default_context()
            tls.minimum_version = self._tls_min_version
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": USER_AGENT},
                connector=aiohttp.TCPConnector(ssl=tls),
            )
        return self._http

    async def start(self) -> None:
        """Open, then deliver in the background: at once, after each ``notify()``, and every ``poll_interval``."""
        if self._task is not None:
            raise RuntimeError("OutboxRelay.start() was already called")
        await self.open()
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def close(self) -> None:
        """Stop the loop and close the clients. Messages in flight stay claimed; they are sent again after the lease."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        self._opened = False
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def ping_redis(self) -> str | None:
        """For readiness: None when Redis answers (or none is configured), else why not."""
        if self._redis is None:
            return None if self._redis_url is None else "not connected"
        from redis.exceptions import RedisError

        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            return f"redis does not answer: {type(exc).__name__}"
        return None

    def notify(self) -> None:
        """Deliver now: called after a transaction that queued messages committed, so they need not wait a poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            # Cleared before the claim: a notify() arriving during the round then causes one more round.
            self._wake.clear()
            report = DeliveryReport()
            try:
                report = await self.deliver_due()
                self._metrics.outbox_backlog.set(await self._store.count_undelivered())
            except Exception as exc:  # the store is unavailable: a background loop must outlive that
                if not self._store_failing:
                    log.warning("outbox: cannot claim messages (%s); retrying every %g s", exc, self._poll_interval)
                    self._store_failing = True
            else:
                if self._store_failing:
                    log.info("outbox: the saga store answers again")
                    self._store_failing = False
            # A full batch that made progress suggests more are due; a full batch of failures does not.
            if report.delivered and report.delivered + report.failed >= self._batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_interval)

    # --- one round ---------------------------------------------------------------------------------------

    async def deliver_due(self, now: datetime | None = None) -> DeliveryReport:
        """Claim up to ``batch_size`` due messages and deliver them, ``MAX_CONCURRENT_DELIVERIES`` at a time.

        ``now`` (default: this node's clock) is when the round happens: messages due then are claimed, and
        the backoff and delivery times count from it. Store errors while claiming are raised; everything
        that goes wrong with one message is recorded on it.
        """
        if not self._opened:
            raise RuntimeError("OutboxRelay is not open: call open() or start() first")

        def clock() -> datetime:
            return datetime.now(UTC) if now is None else now

        messages = await self._store.claim_due_messages(
            limit=self._batch_size, lease_seconds=self._claim_lease_seconds, now=clock()
        )
        slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        down: dict[str, str] = {}  # destinations found unreachable in this round -> why
        outcomes = await asyncio.gather(*(self._deliver_one(m, clock, slots, down) for m in messages))
        delivered = sum(outcomes)
        return DeliveryReport(delivered=delivered, failed=len(outcomes) - delivered)

    async def _deliver_one(
        self, message: OutboxMessage, clock: Callable[[], datetime], slots: asyncio.Semaphore, down: dict[str, str]
    ) -> bool:
        """Send one message and record the outcome in the store; True when it is delivered."""
        key = _destination_key(message)
        async with slots:
            # Checked once a slot is ours: a message waiting for one learns what the ones before it found.
            attempted = key not in down
            if not attempted:
                failure: _Failure | None = _Failure(f"not attempted: failing in this round ({down[key]})", True)
            else:
                try:
                    failure = await self._send(message)
                except Exception as exc:  # a bug or an odd payload must not stop the other messages
                    log.exception("outbox: message %d could not be sent", message.message_id)
                    failure = _Failure(f"{type(exc).__name__}: {exc}", destination_down=False)
                if failure is not None and failure.destination_down:
                    down[key] = failure.error
        if failure is None:
            self._recovered(key, message)
        elif attempted:  # the message that found the destination down speaks for those skipped after it
            self._failed(key, message, failure)
        if failure is not None and message.kind == "webhook":
            self._metrics.webhook_failures.inc()
        try:
            if failure is None:
                await self._store.mark_delivered(message.message_id, now=clock())
                return True
            # Not tenacity: it paces retries within one call, while these attempts are counted in the outbox row
            # and outlive the process; the delay is computed from that count instead.
            ceiling = min(self._retry_max_seconds, self._base_delay * 2 ** min(message.attempts, _MAX_EXPONENT))
            next_attempt_at = clock() + timedelta(seconds=self._jitter(ceiling))
            await self._store.reschedule(message.message_id, next_attempt_at=next_attempt_at, error=failure.error)
            return False
        except Exception as exc:  # the claim lease brings the message back; say so, but keep going
            log.warning(
                "outbox: message %d was %s but the store could not record it (%s); it will be tried again",
                message.message_id,
                "sent" if failure is None else "not delivered",
                exc,
            )
            return False

    async def _send(self, message: OutboxMessage) -> _Failure | None:
        if message.kind == "redis_stream":
            return await self._add_to_stream(message)
        if message.kind == "webhook":
            return await self._post_webhook(message)
        return _Failure(f"unknown outbox message kind {message.kind!r}", destination_down=False)

    async def _add_to_stream(self, message: OutboxMessage) -> _Failure | None:
        if self._redis is None:
            if not self._warned_no_redis:
                log.info("file events are not published: no REDIS_URL (dropping those queued before)")
                self._warned_no_redis = True
            return None
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            fields: dict[FieldT, EncodableT] = {name: value for name, value in stream_fields(message.payload).items()}
            await self._redis.xadd(message.destination, fields)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            return _Failure(_describe(exc), destination_down=True)
        except RedisError as exc:  # e.g. the key holds something other than a stream
            return _Failure(f"Redis refused XADD: {_describe(exc)}", destination_down=False)
        return None

    async def _post_webhook(self, message: OutboxMessage) -> _Failure | None:
        from aiohttp import ClientError

        http = self._webhook_session()
        body = webhook_body(message.payload)
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: str(message.message_id)}
        event_type = message.payload.get("type")
        if isinstance(event_type, str):
            headers[EVENT_HEADER] = event_type
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(body, self._secret)
        elif not self._warned_unsigned:
            log.warning("webhooks are sent unsigned: WEBHOOK_SECRET is not set")
            self._warned_unsigned = True
        try:
            # Redirects are not followed: a POST would turn into a GET, and the body would be lost on the way.
            attributes = {"http.request.method": "POST", "webhook.event": event_type, "outbox.id": message.message_id}
            with tracing.span("webhook.deliver", attributes, kind=tracing.CLIENT) as delivery:
                post = http.post(message.destination, data=body, headers=headers, allow_redirects=False)
                async with post as r:
                    delivery.set_attribute("http.response.status_code", r.status)
                    if 200 <= r.status < 300:
                        return None
                    excerpt = (await r.content.read(_ERROR_BODY_CHARS)).decode(errors="replace").strip()
                    error = f"HTTP {r.status} {r.reason or ''}".rstrip() + (f": {excerpt}" if excerpt else "")
                    return _Failure(error, destination_down=False, status=r.status)
        except TimeoutError:
            return _Failure(f"no answer within {self._timeout:g} s", destination_down=True)
        except (ClientError, OSError) as exc:
            return _Failure(_describe(exc), destination_down=True)

    # --- logging once per outage ----------------------------------------------------------------------------

    def _failed(self, key: str, message: OutboxMessage, failure: _Failure) -> None:
        if key in self._failing:
            return
        self._failing[key] = failure.error
        where = _where(message)
        if failure.status is not None and 400 <= failure.status < 500:
            log.warning(
                "%s refuses deliveries (%s): check the URL and the secret the receiver expects; "
                "retrying with backoff up to %g s, logged again when it accepts",
                where,
                failure.error,
                self._retry_max_seconds,
            )
        else:
            log.warning(
                "%s is failing (%s); retrying with backoff up to %g s, logged again when it recovers",
                where,
                failure.error,
                self._retry_max_seconds,
            )

    def _recovered(self, key: str, message: OutboxMessage) -> None:
        if self._failing.pop(key, None) is not None:
            log.info("%s accepts deliveries again", _where(message))


def stream_fields(payload: Mapping[str, Any]) -> dict[str, str]:
    """A payload as the flat field/value pairs of a stream entry: nested values as JSON, None as ""."""
    return {name: _stream_value(value) for name, value in payload.items()}


def _stream_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):  # before int: bool is an int, and str(True) is not how JSON spells it
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _destination_key(message: OutboxMessage) -> str:
    # Every stream lives on the one Redis server: when it is down, it is down for all of them.
    return "redis" if message.kind == "redis_stream" else message.destination


def _where(message: OutboxMessage) -> str:
    """The destination for a log line, without credentials or query (a URL may carry a token in either)."""
    if message.kind == "redis_stream":
        return f"Redis stream {message.destination}"
    parts = urlsplit(message.destination)
    # netloc minus any user:password@; the port is kept as written (parts.port raises on a bad one).
    host = parts.netloc.rpartition("@")[2]
    return f"webhook {parts.scheme}://{host}{parts.path}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
