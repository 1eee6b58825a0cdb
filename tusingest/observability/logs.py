"""Structured logs: structlog renders every stdlib ``logging`` record (the code keeps using
``logging.getLogger``) as one JSON object or, on a terminal, one readable line; and the ASGI
facts a request's access line reports (observability/middleware.py writes the line).

Every line carries timestamp, level, logger and event; inside a span its trace_id and span_id;
inside a request on an upload (and the saga tasks it starts) the upload_id.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson

from tusingest.observability import tracing

if TYPE_CHECKING:
    import structlog

ACCESS_LOGGER = "tusingest.access"


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    format: Literal["json", "console"] | None = None  # None: console on a terminal, else JSON


@dataclass(slots=True)
class RequestFacts:
    """What the access line says about a request, filled in while it runs (shared with the tasks it starts)."""

    upload_id: str | None = None
    bytes_in: int = 0  # the request body's bytes, counted by the one wrapper around every body


_REQUEST: ContextVar[RequestFacts | None] = ContextVar("tusingest_request", default=None)


def request_facts() -> RequestFacts:
    """Begin the facts of a new request in the current context (the request middleware calls it)."""
    facts = RequestFacts()
    _REQUEST.set(facts)
    return facts


def note_upload(upload_id: str) -> None:
    """The request (and every log line and span it makes from now on) is about ``upload_id``."""
    facts = _REQUEST.get()
    if facts is not None:
        facts.upload_id = upload_id
    tracing.annotate({"upload.id": upload_id})


def note_bytes_in(count: int) -> None:
    """The request's body brought ``count`` bytes (read by the app, or drained after an early answer)."""
    facts = _REQUEST.get()
    if facts is not None:
        facts.bytes_in = count


def _add_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ids = tracing.current_ids()
    if ids is not None:
        event.setdefault("trace_id", ids[0])
        event.setdefault("span_id", ids[1])
    facts = _REQUEST.get()
    if facts is not None and facts.upload_id is not None:
        event.setdefault("upload_id", facts.upload_id)
    return event


def configure(settings: LogSettings) -> None:
    """Route the root logger onto stderr as JSON lines or, on a terminal, structlog's readable lines
    (replacing its handlers)."""
    global _ONLY_HANDLER
    json_lines = settings.format == "json" or (settings.format is None and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(json_lines=json_lines))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    _ONLY_HANDLER = handler


_ONLY_HANDLER: logging.StreamHandler[Any] | None = None  # the handler configure() installed
_access_log = logging.getLogger(ACCESS_LOGGER)


def access_line(fields: dict[str, Any]) -> None:
    """Write one request's access line (``tusingest.access``, at info) with ``fields``.

    The line is written once per request, so it is made cheaply: where the root logger's only handler is the
    JSON one ``configure`` installed (a node in production), the line goes straight to its stream, under its
    lock, without a LogRecord; the same JSON a record would give. Anywhere else (console lines, a test's
    capturing handler, a handler an operator added), it is an ordinary ``logging`` call.
    """
    if not _access_log.isEnabledFor(logging.INFO):
        return
    handler = _ONLY_HANDLER
    formatter_ = handler.formatter if handler is not None else None
    if (
        handler is None
        or not isinstance(formatter_, JsonLines)
        or logging.getLogger().handlers != [handler]
        or _access_log.handlers
        or not _access_log.propagate
    ):
        _access_log.info("request", extra=fields)
        return
    event = dict(fields)
    _described(event, "request", "info", ACCESS_LOGGER, datetime.now(UTC))
    line = formatter_.render(event) + handler.terminator
    handler.acquire()
    try:
        handler.stream.write(line)
        handler.flush()
    except (OSError, ValueError):  # stderr closed: as logging does, a lost line never fails the request
        pass
    finally:
        handler.release()


def formatter(*, json_lines: bool) -> logging.Formatter:
    """The formatter that turns a stdlib record into one JSON object (``JsonLines``) or, for a terminal,
    one readable line (structlog's console renderer)."""
    if json_lines:
        return JsonLines()
    # Imported only here: structlog imports rich and pygments when they are installed (about 7 MiB of
    # resident memory), and a node that writes JSON lines, as every server does, needs none of them.
    import structlog

    shared: list[structlog.types.Processor] = [
        structlog.stdlib.ExtraAdder(),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_context,
    ]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=False),  # renders an exception's traceback itself
        ],
    )


def _described(event: dict[str, Any], message: str, level: str, logger: str, at: datetime | float) -> None:
    """The fields every JSON line has, added to ``event``: its message, level, logger, UTC time, trace, upload."""
    event["event"] = message
    event["level"] = level
    event["logger"] = logger
    moment = at if isinstance(at, datetime) else datetime.fromtimestamp(at, UTC)
    event["timestamp"] = moment.isoformat().replace("+00:00", "Z")
    _add_context(None, "", event)


# The attributes every LogRecord has; the rest of a record's __dict__ is what ``extra=`` added.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, event, the record's extra fields, the trace and the
    upload it belongs to, and an exception's traceback. The same fields structlog's ProcessorFormatter chain
    (ExtraAdder, add_log_level, add_logger_name, TimeStamper, JSONRenderer) produces, rendered by orjson, at a
    tenth of its cost: the access line is written once per request, so its price is paid by every upload
    (benchmarks/instrumentation.py measures it)."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRIBUTES and key[0] != "_"
        }
        _described(event, record.getMessage(), record.levelname.lower(), record.name, record.created)
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return self.render(event)

    def render(self, event: dict[str, Any]) -> str:
        try:
            return orjson.dumps(event, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
        except orjson.JSONEncodeError:  # what orjson refuses (an int beyond 64 bits, say), json writes
            return json.dumps(event, default=repr)


access_log = logging.getLogger(ACCESS_LOGGER)


__all__ = [
    "ACCESS_LOGGER",
    "JsonLines",
    "LogSettings",
    "RequestFacts",
    "access_line",
    "configure",
    "formatter",
    "note_bytes_in",
    "note_upload",
    "request_facts",
]
