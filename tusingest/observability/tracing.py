"""OpenTelemetry traces: one TracerProvider per app, and ``span()`` for the few places that make spans.

The app's tracer travels in a context variable that app.py sets for each request and for the
lifespan (whose tasks inherit it), so two apps in one process (tests, two nodes) keep apart and
no part needs a tracer handed in. Without OPENTELEMETRY_ENABLED every span is a no-op. Enabled, every
span has its trace and span ids (logs carry them, ``traceparent`` propagates them), but a span is only
recorded (attributes, events, timing) while something exports it: an OTLP endpoint, or a processor a test
attached. Without one, recording would cost each request about as much as its access line, for nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, NoOpTracer, Span, SpanKind, Tracer, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

Attributes = Mapping[str, AttributeValue | None]

UPLOAD = "artstore.ingester.upload"
VALIDATION = "artstore.ingester.validation"
COMPRESSION = "artstore.ingester.compression"
STORAGE_SELECTION = "artstore.ingester.storage_selection"
TRANSFER = "artstore.ingester.transfer"
CLIENT = SpanKind.CLIENT  # S3 calls, webhook deliveries

_NO_TRACER = NoOpTracer()
_TRACER: ContextVar[Tracer | None] = ContextVar("tusingest_tracer", default=None)
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class TracingSettings:
    enabled: bool = True
    otlp_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT, the collector's base URL
    service_name: str = "artstore-ingester"


class WhileExported(Sampler):
    """The SDK's default choice (``ParentBased(ALWAYS_ON)``) once a span processor is attached; until then
    every span is dropped: not recorded, but with valid ids that logs and propagation use."""

    def __init__(self) -> None:
        self.exported = False
        self._sampler = ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes | None = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if self.exported:
            return self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "WhileExported{ParentBased{root:AlwaysOnSampler}}"


class _Provider(TracerProvider):
    """A TracerProvider that starts recording when its first span processor is attached."""

    def __init__(self, resource: Resource) -> None:
        self.gate = WhileExported()
        super().__init__(sampler=self.gate, resource=resource)

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.gate.exported = True


class Tracing:
    """One app's tracer provider. ``provider`` is None when tracing is off; tests add their own
    span processor to it (an InMemorySpanExporter)."""

    def __init__(self, settings: TracingSettings) -> None:
        self.provider: TracerProvider | None = None
        self.tracer: Tracer = NoOpTracer()
        if not settings.enabled:
            return
        self.provider = _Provider(resource=Resource.create({"service.name": settings.service_name}))
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # The generic endpoint variable names the collector; traces go to its /v1/traces.
            endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("tusingest")

    def activate(self) -> Token[Tracer | None]:
        """Make this app's tracer the one ``span()`` uses in the current context (and tasks started from it)."""
        return _TRACER.set(self.tracer)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what the batch processor still holds


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, AttributeValue | None] | None = None,
    *,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    links: list[Link] | None = None,
) -> Iterator[Span]:
    """A span named ``name`` under the current one (or ``parent``); None attributes are left out.
    An exception escaping it is recorded and marks the span as failed."""
    kept = {key: value for key, value in (attributes or {}).items() if value is not None}
    with (_TRACER.get() or _NO_TRACER).start_as_current_span(
        name, context=parent, kind=kind, attributes=kept, links=links
    ) as made:
        yield made


def incoming_context(headers: Mapping[str, str]) -> Context:
    """The caller's trace from its W3C ``traceparent`` header (an empty context without one)."""
    return _PROPAGATOR.extract(carrier=headers)


def traceparent() -> str | None:
    """The current span as a W3C ``traceparent`` value (None outside a recording span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def link_to(traceparent_value: object) -> list[Link]:
    """A link to the span a stored W3C ``traceparent`` names (none for a missing or malformed value)."""
    if not isinstance(traceparent_value, str):
        return []
    context = trace.get_current_span(_PROPAGATOR.extract(carrier={"traceparent": traceparent_value})).get_span_context()
    return [Link(context)] if context.is_valid else []


def annotate(attributes: Mapping[str, AttributeValue | None]) -> None:
    """Set attributes on the current span (None values are left out)."""
    current = trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key, value)


def current_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id in hex, or None outside a valid span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def record(name: str, started_ns: int, attributes: Mapping[str, AttributeValue | None]) -> None:
    """A span that ends now and began at ``started_ns`` (time.time_ns()): work that ran inside
    another (compression, within the one validation pass) and is told apart afterwards."""
    kept = {key: value for key, value in attributes.items() if value is not None}
    (_TRACER.get() or _NO_TRACER).start_span(name, start_time=started_ns, attributes=kept).end()
