"""The audit log of every file operation and every refused authorization (issue 12, point 5).

An ``AuditEvent`` is handed to the store method that makes the change it records (session store:
``create``, ``set_state``; saga store: ``register_file``, ``set_state``), which writes its row into
``audit_events`` in the same transaction; a refusal changes nothing and goes through ``record_audit``.
Once the row is committed the store hands the event to its ``Auditor``, which writes one JSON line on
the ``tusingest.audit`` logger and, with Redis configured, adds it to the ``artstore:audit`` stream.
Never a token or a secret: the fields below are all an event carries.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tusingest.observability.tracing import current_ids
from tusingest.sessions.model import Upload

if TYPE_CHECKING:  # imported where used, so that a server without PostgreSQL or Redis does not load them
    import aiosqlite
    import asyncpg
    import redis.asyncio as aioredis
    from asyncpg.pool import PoolConnectionProxy

audit_log = logging.getLogger("tusingest.audit")
log = logging.getLogger(__name__)

AUDIT_STREAM = "artstore:audit"
STREAM_MAXLEN = 100_000  # approximate (MAXLEN ~): Redis trims whole nodes, cheaply
ANONYMOUS = "anonymous"


class Action(enum.StrEnum):
    UPLOAD_CREATED = "upload.created"
    UPLOAD_COMPLETED = "upload.completed"  # the file is registered
    UPLOAD_FAILED = "upload.failed"  # finalisation refused or failed
    UPLOAD_TERMINATED = "upload.terminated"  # tus DELETE, or expiry
    FILE_DELETED = "file.deleted"
    FILE_TRANSFERRED = "file.transferred"
    REFUSED = "authorization.refused"  # 401, 403, or 404 for somebody else's upload or file


class Outcome(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


def _now() -> datetime:
    return datetime.now(UTC)


def _trace_id() -> str | None:
    ids = current_ids()
    return ids[0] if ids else None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    action: str
    outcome: str = Outcome.OK
    subject: str = ANONYMOUS  # the token's sub
    subject_name: str | None = None
    client_address: str | None = None
    upload_id: str | None = None
    file_id: str | None = None
    element_ids: tuple[str, ...] = ()
    reason: str | None = None  # an error code or why
    request_id: str | None = field(default_factory=_trace_id)  # the trace of the request (or saga) that made it
    at: datetime = field(default_factory=_now)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def for_owner(cls, action: str, upload: Upload, *, outcome: str = Outcome.OK, **fields: Any) -> AuditEvent:
        """An event nobody's request makes now (expiry, finalisation): recorded under the upload's owner,
        the token subject that created it (never what its metadata claims)."""
        subject = upload.owner_id or ANONYMOUS
        return cls(action, outcome, subject, upload.owner_name, upload_id=upload.id, **fields)

    def fields(self) -> dict[str, Any]:
        """The event as JSON-ready fields (the log line, the stream entry, ``tusingest audit --json``)."""
        # Every field is immutable (text, a tuple of text, a datetime): a shallow copy, not asdict's deep one.
        values = {name: getattr(self, name) for name in _EVENT_FIELDS}
        values["at"] = self.at.astimezone(UTC).isoformat(timespec="microseconds")
        values["element_ids"] = list(self.element_ids)
        return values


_EVENT_FIELDS = tuple(f.name for f in fields(AuditEvent))
_COLUMNS = (
    "id, at, action, outcome, subject, subject_name, client_address, upload_id, file_id, element_ids, reason, "
    "request_id"
)


def _from_row(values: Sequence[Any], element_ids: Sequence[str], at: datetime) -> AuditEvent:
    (id_, _, action, outcome, subject, name, address, upload_id, file_id, _, reason, request_id) = values
    return AuditEvent(
        id=id_,
        at=at,
        action=action,
        outcome=outcome,
        subject=subject,
        subject_name=name,
        client_address=address,
        upload_id=upload_id,
        file_id=file_id,
        element_ids=tuple(element_ids),
        reason=reason,
        request_id=request_id,
    )


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """What ``list_audit`` asks for: events at or after ``since`` and before ``until``, oldest first."""

    since: datetime
    until: datetime | None = None
    limit: int = 1000
    subject: str | None = None
    upload_id: str | None = None

    def select(self, mark: Callable[[int], str], time: Callable[[datetime], object]) -> tuple[str, list[object]]:
        """The SELECT and its parameters, in a driver's placeholders (``mark(n)``) and time encoding."""
        params: list[object] = [time(self.since), time(self.until or datetime.max.replace(tzinfo=UTC))]
        where = f"at >= {mark(1)} AND at < {mark(2)}"
        for column, value in (("subject", self.subject), ("upload_id", self.upload_id)):
            if value is not None:
                params.append(value)
                where += f" AND {column} = {mark(len(params))}"
        params.append(self.limit)
        return f"SELECT {_COLUMNS} FROM audit_events WHERE {where} ORDER BY at, id LIMIT {mark(len(params))}", params


# --- SQLite (both SQLite stores share one connection, sqlitedb.py) ---------------------------------


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def insert_sqlite(db: sqlite3.Connection, event: AuditEvent) -> None:
    """Write the row on ``db``: call inside the transaction of the change it records (in aiosqlite's thread)."""
    values = event.fields()
    values["at"] = _ts(event.at)
    values["element_ids"] = json.dumps(values["element_ids"])
    marks = ",".join("?" * len(values))
    db.execute(f"INSERT INTO audit_events ({_COLUMNS}) VALUES ({marks})", [values[c] for c in _names()])


async def list_sqlite(db: aiosqlite.Connection, query: AuditQuery) -> list[AuditEvent]:
    async with db.execute(*query.select(lambda _: "?", _ts)) as cursor:
        rows = await cursor.fetchall()
    return [_from_row(tuple(r), json.loads(r[9]), datetime.fromisoformat(r[1])) for r in rows]


# --- PostgreSQL ----------------------------------------------------------------------------------------


async def insert_postgres(
    connection: asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy, event: AuditEvent
) -> None:
    """Write the row on ``connection``: inside the transaction of the change it records (or a pool, alone)."""
    values = event.fields()
    values["at"] = event.at
    marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    await connection.execute(f"INSERT INTO audit_events ({_COLUMNS}) VALUES ({marks})", *(values[c] for c in _names()))


async def list_postgres(pool: asyncpg.Pool, query: AuditQuery) -> list[AuditEvent]:
    sql, params = query.select(lambda n: f"${n}", lambda at: at)
    rows = await pool.fetch(sql, *params)
    return [_from_row(tuple(r), r["element_ids"], r["at"]) for r in rows]


def _names() -> list[str]:
    return [c.strip() for c in _COLUMNS.split(",")]


# --- after the commit ----------------------------------------------------------------------------------


class Auditor:
    """Publishes committed audit events: a JSON log line always, the Redis stream when ``redis_url`` is set.

    Best effort: Redis failing (or slow) costs a warning, never the request. Built once in app.py and
    handed to the stores, which call ``published`` after the transaction that wrote the row commits.
    """

    def __init__(self, redis_url: str | None = None, *, stream: str = AUDIT_STREAM, timeout: float = 2.0) -> None:
        self.stream = stream
        self.timeout = timeout
        self._redis: aioredis.Redis | None = None
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout)

    async def published(self, event: AuditEvent) -> None:
        entry = event.fields()
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True)
        # One JSON object per line for log shippers; ``extra`` for handlers that want the fields themselves.
        audit_log.info(line, extra={"audit": entry})
        if self._redis is None:
            return
        from redis.exceptions import RedisError

        try:
            await asyncio.wait_for(
                self._redis.xadd(self.stream, {"event": line}, maxlen=STREAM_MAXLEN, approximate=True), self.timeout
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("audit event %s not added to the Redis stream %s: %s", event.id, self.stream, exc)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


# Stores made without one (tests, the CLI) still log every event.
LOG_ONLY = Auditor()
