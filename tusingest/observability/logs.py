"""Structured logs: structlog renders every stdlib ``logging`` record (the code keeps using
``logging.getLogger``) as one JSON object or, on a terminal, one readable line; and the ASGI
middleware that opens each request's span and writes its access line.

Every line carries timestamp, level, logger and event; inside a span its trace_id and span_id;
inside a request on an upload (and the saga tasks it starts) the upload_id.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


_REQUEST: ContextVar[RequestFacts | None] = ContextVar("tusingest_request", default=None)


def note_upload(upload_id: str) -> None:
    """The request (and every log line and span it makes from now on) is about ``upload_id``."""
    facts = _REQUEST.get()
    if facts is not None:
        facts.upload_id = upload_id
    tracing.annotate({"upload.id": upload_id})


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


class RequestTelemetry:
    """ASGI middleware, outermost: the app's tracer for the request, its span (``artstore.ingester.upload``
    on the upload routes, honouring an incoming ``traceparent``), and one access line at info when it ends:
    method, route template, status, duration_ms, upload_id, subject, bytes in and out, client."""

    def __init__(
        self,
        app: ASGIApp,
        traces: tracing.Tracing,
        upload_paths: tuple[str, ...],
        subject_of: Callable[[Scope], str | None],
    ) -> None:
        self.app = app
        self.traces = traces
        self.upload_paths = upload_paths
        self.subject_of = subject_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.traces.activate()
        facts = RequestFacts()
        _REQUEST.set(facts)
        path: str = scope.get("path", "")
        method: str = scope["method"]
        started = time.perf_counter()
        status = 500
        sizes = [0, 0]  # bytes in, bytes out

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes[0] += len(message.get("body", b""))
            return message

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                location = Headers(raw=message.get("headers", [])).get("location")
                if location and facts.upload_id is None and path.startswith(self.upload_paths):
                    note_upload(location.rstrip("/").rsplit("/", 1)[-1])
            elif message["type"] == "http.response.body":
                sizes[1] += len(message.get("body", b""))
            await send(message)

        is_upload = path.startswith(self.upload_paths)
        name = tracing.UPLOAD if is_upload else method  # other requests are named by route once it is known
        attributes = {"http.request.method": method, "url.path": path}
        parent = tracing.incoming_context(Headers(scope=scope))
        with tracing.span(name, attributes, parent=parent, kind=SpanKind.SERVER) as current:
            try:
                await self.app(scope, counting_receive, recording_send)
            finally:
                route = _route_template(path, scope.get("path_params") or {})
                current.set_attribute("http.route", route)
                if not is_upload:
                    current.update_name(f"{method} {route}")
                current.set_attribute("http.response.status_code", status)
                if status >= 500:
                    current.set_status(Status(StatusCode.ERROR))
                client = scope.get("client")
                access_log.info(
                    "request",
                    extra={
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                        "upload_id": facts.upload_id,
                        "subject": self.subject_of(scope),
                        "bytes_in": sizes[0],
                        "bytes_out": sizes[1],
                        "client": client[0] if client else None,
                    },
                )


def _route_template(path: str, path_params: dict[str, Any]) -> str:
    """The matched route with its parameters named (``/files/{upload_id}``): the path never carries ids."""
    for key, value in path_params.items():
        if isinstance(value, str) and value:
            path = path.replace(value, "{" + key + "}")
    return path


__all__ = ["ACCESS_LOGGER", "LogSettings", "RequestFacts", "RequestTelemetry", "configure", "formatter", "note_upload"]
