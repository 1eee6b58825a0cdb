"""Structured logs: structlog renders every stdlib ``logging`` record (the code keeps using
``logging.getLogger``) as one JSON object or, on a terminal, one readable line; and the ASGI
facts a request's access line reports (observability/middleware.py writes the line).

Every line carries timestamp, level, logger and event; inside a span its trace_id and span_id;
inside a request on an upload (and the saga tasks it starts) the upload_id.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from tusingest.observability import tracing

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
    """Route the root logger through structlog's ProcessorFormatter onto stderr (replacing its handlers)."""
    json_lines = settings.format == "json" or (settings.format is None and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(json_lines=json_lines))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())


def formatter(*, json_lines: bool) -> logging.Formatter:
    """The formatter that turns a stdlib record into one JSON object (or one readable line)."""
    shared: list[structlog.types.Processor] = [
        structlog.stdlib.ExtraAdder(),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_context,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json_lines else _keep,
            renderer,
        ],
    )


def _keep(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


access_log = logging.getLogger(ACCESS_LOGGER)


__all__ = [
    "ACCESS_LOGGER",
    "LogSettings",
    "RequestFacts",
    "configure",
    "formatter",
    "note_bytes_in",
    "note_upload",
    "request_facts",
]
