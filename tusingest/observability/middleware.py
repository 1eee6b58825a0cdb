"""The one request middleware of observability, outermost: each request's span, its metrics and its access line.

One layer, so the work every request pays (the route template, the status, the timing) is done once for
all three, and no second wrapper sits around ``send``. The body is not wrapped here: the one wrapper every
body already passes (tus/unread_body.py, just inside this one) counts its bytes into ``RequestFacts.bytes_in``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tusingest.observability import tracing
from tusingest.observability.logs import ACCESS_LOGGER, access_line, note_upload, request_facts
from tusingest.observability.metrics import Metrics

access_log = logging.getLogger(ACCESS_LOGGER)


class RequestTelemetry:
    """ASGI middleware, outermost: the app's tracer for the request; its span (``artstore.ingester.upload``
    on the upload routes: everything under the tus endpoint's ``upload_prefix``, and the facade's
    ``upload_routes`` exactly, so a session's status or event stream is not an upload; honouring an incoming
    ``traceparent``); requests by method, route template and status, their duration and the requests in flight
    (when ``metrics`` is given); and one access line at info when it ends: method, route template, status,
    duration_ms, upload_id, subject, bytes in and out, client.

    ``trust_proxy_headers``: the client is the first address of ``X-Forwarded-For`` (TRUST_PROXY_HEADERS,
    the same setting that lets the tus Location follow ``X-Forwarded-Host``), else the peer's address.
    """

    def __init__(
        self,
        app: ASGIApp,
        traces: tracing.Tracing,
        upload_prefix: str,
        subject_of: Callable[[Scope], str | None],
        upload_routes: Iterable[str] = (),
        metrics: Metrics | None = None,
        trust_proxy_headers: bool = False,
    ) -> None:
        self.app = app
        self.traces = traces
        self.upload_prefix = upload_prefix
        self.upload_routes = frozenset(upload_routes)
        self.subject_of = subject_of
        self.metrics = metrics
        self.trust_proxy_headers = trust_proxy_headers
        # prometheus-client's labels() takes a lock and builds a key per call: the few children are kept here.
        self._counted: dict[tuple[str, str, str], Counter] = {}
        self._timed: dict[tuple[str, str], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.traces.activate()
        facts = request_facts()
        path: str = scope.get("path", "")
        method: str = scope["method"]
        headers = Headers(scope=scope)
        started = time.perf_counter()
        status = 500
        bytes_out = 0
        is_upload = path.startswith(self.upload_prefix) or path in self.upload_routes

        async def recording_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                if is_upload and facts.upload_id is None:
                    location = Headers(raw=message.get("headers", [])).get("location")
                    if location:
                        note_upload(location.rstrip("/").rsplit("/", 1)[-1])
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        name = tracing.UPLOAD if is_upload else method  # other requests are named by route once it is known
        attributes = {"http.request.method": method, "url.path": path}
        parent = tracing.incoming_context(headers)
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.inc()
        with tracing.span(name, attributes, parent=parent, kind=SpanKind.SERVER) as current:
            try:
                await self.app(scope, receive, recording_send)
            finally:
                duration = time.perf_counter() - started
                route = route_template(scope)
                if metrics is not None:
                    metrics.in_flight.dec()
                    self._count(metrics, method, route, status, duration)
                if current.is_recording():
                    current.set_attribute("http.route", route)
                    if not is_upload:
                        current.update_name(f"{method} {route}")
                    current.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        current.set_status(Status(StatusCode.ERROR))
                if access_log.isEnabledFor(logging.INFO):
                    access_line(
                        {
                            "method": method,
                            "route": route if route != UNMATCHED else path,
                            "status": status,
                            "duration_ms": round(duration * 1000, 2),
                            "upload_id": facts.upload_id,
                            "subject": self.subject_of(scope),
                            "bytes_in": facts.bytes_in,
                            "bytes_out": bytes_out,
                            "client": self._client(scope, headers),
                        },
                    )

    def _count(self, metrics: Metrics, method: str, route: str, status: int, duration: float) -> None:
        key = (method, route, str(status))
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = metrics.requests.labels(*key)
        counter.inc()
        timer = self._timed.get(key[:2])
        if timer is None:
            timer = self._timed[key[:2]] = metrics.request_duration.labels(method, route)
        timer.observe(duration)

    def _client(self, scope: Scope, headers: Headers) -> str | None:
        if self.trust_proxy_headers:
            forwarded = headers.get("x-forwarded-for")
            if forwarded:
                return forwarded.split(",", 1)[0].strip() or None
        client = scope.get("client")
        return client[0] if client else None


UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The matched route's template (ids replaced by their parameter names), or "unmatched": a label
    and a span attribute never carry a raw path, whose ids would make one series per upload."""
    if "endpoint" not in scope:
        return UNMATCHED
    path: str = scope.get("path", "")
    for name, value in scope.get("path_params", {}).items():
        if isinstance(value, str) and value:
            path = path.replace(value, "{" + name + "}")
    return path


__all__ = ["RequestTelemetry", "route_template"]
