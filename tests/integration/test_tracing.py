"""OpenTelemetry traces of a real server over a socket, read from an in-memory exporter attached to the
app's own provider: one upload's named spans and their parents, and one trace across two nodes when the
client resumes on the second with the first request's ``traceparent``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import OCTETS, TUS, LiveServer, _server_factory, base_settings, live_server
from tusingest.observability import tracing

# Text larger than COMPRESSION_MIN_SIZE_MB (1 MiB in the tests' settings): compressed, so every stage has its span.
PAYLOAD = b"a tale of two cities, " * 100_000
FINALISER_SPANS = (tracing.VALIDATION, tracing.COMPRESSION, tracing.STORAGE_SELECTION, tracing.TRANSFER)


def exported(server: LiveServer) -> InMemorySpanExporter:
    provider = server.parts.tracing.provider
    assert provider is not None  # OPENTELEMETRY_ENABLED is on by default
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def requests(spans: Sequence[ReadableSpan], method: str) -> list[ReadableSpan]:
    return [
        span for span in named(spans, tracing.UPLOAD) if (span.attributes or {}).get("http.request.method") == method
    ]


def request_span(spans: Sequence[ReadableSpan], method: str) -> ReadableSpan:
    (found,) = requests(spans, method)
    return found


async def ended_request(exporter: InMemorySpanExporter, method: str) -> ReadableSpan:
    """The one request span of ``method`` once it has ended (it ends after the answer is sent)."""

    async def spans() -> tuple[ReadableSpan, ...]:
        return exporter.get_finished_spans()

    return request_span(await eventually(spans, lambda got: bool(requests(got, method)), timeout=20), method)


async def finished(exporter: InMemorySpanExporter, *names: str) -> tuple[ReadableSpan, ...]:
    """The exported spans once every one of ``names`` has ended (the request span ends after its answer)."""

    async def spans() -> tuple[ReadableSpan, ...]:
        return exporter.get_finished_spans()

    return await eventually(spans, lambda got: all(named(got, name) for name in names), timeout=20)


def assert_finalised_under(spans: Sequence[ReadableSpan], request: ReadableSpan, upload_id: str) -> None:
    """The finaliser's spans are in the completing request's trace: validation, selection and transfer are its
    children, compression (one pass with validation) a child of validation."""
    assert request.context is not None
    by_name = {name: named(spans, name)[0] for name in FINALISER_SPANS}
    for name, span in by_name.items():
        assert span.context is not None and span.context.trace_id == request.context.trace_id, name
        assert span.parent is not None
        expected_parent = by_name[tracing.VALIDATION] if name == tracing.COMPRESSION else request
        assert expected_parent.context is not None
        assert span.parent.span_id == expected_parent.context.span_id, name
    for name in (tracing.VALIDATION, tracing.STORAGE_SELECTION, tracing.TRANSFER):
        assert by_name[name].attributes is not None and by_name[name].attributes["upload.id"] == upload_id
    transfer = by_name[tracing.TRANSFER].attributes
    assert transfer is not None and transfer["element.id"] == "local"
    assert transfer["size.original"] == len(PAYLOAD) and 0 < int(str(transfer["size.stored"])) < len(PAYLOAD)
    compression = by_name[tracing.COMPRESSION].attributes
    assert compression is not None and compression["size.original"] == len(PAYLOAD)


async def test_one_upload_makes_the_named_spans_under_its_completing_request(tmp_path: Path, sqlite_url: str) -> None:
    async with _server_factory(tmp_path, sqlite_url) as start:
        server = await start()
        exporter = exported(server)
        async with server.client() as client:
            created = await client.post(server.files_url, headers=TUS | {"Upload-Length": str(len(PAYLOAD))})
            upload_id = created.headers["Location"].rsplit("/", 1)[-1]
            done = await client.patch(
                created.headers["Location"],
                content=PAYLOAD,
                headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS},
            )
        assert done.status_code == 204 and done.headers["ArtStore-Upload-Status"] == "completed"

        patch = await ended_request(exporter, "PATCH")
        spans = await finished(exporter, *FINALISER_SPANS)
        post = request_span(spans, "POST")
        assert post.attributes is not None and post.attributes["upload.id"] == upload_id
        assert patch.attributes is not None and patch.attributes["upload.id"] == upload_id
        assert patch.attributes["http.route"] == "/files/{upload_id}"
        assert patch.attributes["http.response.status_code"] == 204
        assert patch.parent is None  # the client sent no traceparent: the request starts the trace
        assert post.context is not None and patch.context is not None
        assert post.context.trace_id != patch.context.trace_id
        assert_finalised_under(spans, patch, upload_id)


async def test_a_resume_on_a_second_node_with_the_first_traceparent_joins_the_first_trace(
    tmp_path: Path, postgres_url: str
) -> None:
    half = len(PAYLOAD) // 2
    async with _server_factory(tmp_path, postgres_url) as start:
        first, second = await start(), await start()
        first_spans, second_spans = exported(first), exported(second)
        async with first.client() as client:
            created = await client.post(first.files_url, headers=TUS | {"Upload-Length": str(len(PAYLOAD))})
            path = created.headers["Location"].removeprefix(first.url)
            upload_id = path.rsplit("/", 1)[-1]
            began = await client.patch(
                first.url + path,
                content=PAYLOAD[:half],
                headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS},
            )
        assert began.status_code == 204
        resumed_from = await ended_request(first_spans, "PATCH")
        assert resumed_from.context is not None
        traceparent = f"00-{resumed_from.context.trace_id:032x}-{resumed_from.context.span_id:016x}-01"
        async with second.client() as client:
            done = await client.patch(
                second.url + path,
                content=PAYLOAD[half:],
                headers=TUS | {"Upload-Offset": str(half), "Content-Type": OCTETS, "traceparent": traceparent},
            )
        assert done.status_code == 204 and done.headers["ArtStore-Upload-Status"] == "completed"

        patch = await ended_request(second_spans, "PATCH")
        spans = await finished(second_spans, *FINALISER_SPANS)
        assert patch.context is not None and patch.parent is not None
        assert patch.context.trace_id == resumed_from.context.trace_id  # one trace across both nodes
        assert patch.parent.span_id == resumed_from.context.span_id and patch.parent.is_remote
        assert_finalised_under(spans, patch, upload_id)
        assert not named(first_spans.get_finished_spans(), tracing.TRANSFER)  # the second node finalised it


async def test_a_saga_carried_on_by_recovery_on_another_node_links_to_the_request_that_began_it(
    tmp_path: Path, postgres_url: str
) -> None:
    payload = b"x" * 5000
    # The first node completes the upload, its saga stops at a failpoint, and the node goes away.
    # A short lease, so that it lapses soon after the node has gone (and not before the second node's exporter is on).
    paused = base_settings(
        tmp_path, postgres_url, saga_failpoints="inspected=pause", finalise_wait_seconds=0, saga_lease_seconds=2
    )
    async with live_server(paused) as first:
        first_spans = exported(first)
        async with first.client() as client:
            created = await client.post(first.files_url, headers=TUS | {"Upload-Length": str(len(payload))})
            upload_id = created.headers["Location"].rsplit("/", 1)[-1]
            done = await client.patch(
                created.headers["Location"],
                content=payload,
                headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS},
            )
        assert done.status_code == 204 and done.headers["ArtStore-Upload-Status"] == "finalizing"
        began = await ended_request(first_spans, "PATCH")
        assert began.context is not None
    # The second node's recovery takes the saga over once its lease has lapsed and finishes it.
    recovering = base_settings(tmp_path, postgres_url, saga_lease_seconds=2, saga_recovery_interval_seconds=0.2)
    async with live_server(recovering) as second:
        second_spans = exported(second)
        (run,) = named(await finished(second_spans, "saga.upload", tracing.TRANSFER), "saga.upload")
        record = await second.parts.saga_store.file_for_upload(upload_id)
    assert record is not None
    assert run.context is not None and run.context.trace_id != began.context.trace_id  # a trace of its own
    (link,) = run.links
    assert link.context.trace_id == began.context.trace_id and link.context.span_id == began.context.span_id
    transfer = named(second_spans.get_finished_spans(), tracing.TRANSFER)[0]
    assert transfer.parent is not None and transfer.parent.span_id == run.context.span_id


async def test_a_session_status_request_is_not_an_upload_span(tmp_path: Path, sqlite_url: str) -> None:
    async with _server_factory(tmp_path, sqlite_url) as start:
        server = await start()
        exporter = exported(server)
        async with server.client() as client:
            created = await client.post(server.files_url, headers=TUS | {"Upload-Length": "5"})
            upload_id = created.headers["Location"].rsplit("/", 1)[-1]
            status = await client.get(f"/api/files/upload/session/{upload_id}")
        assert status.status_code == 200
        name = "GET /api/files/upload/session/{session_id}"
        spans = await finished(exporter, name)
        assert len(requests(spans, "POST")) == 1 and not requests(spans, "GET")


async def test_with_opentelemetry_disabled_no_provider_is_made_and_requests_are_served(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with _server_factory(tmp_path, sqlite_url) as start:
        server = await start(opentelemetry_enabled=False)
        assert server.parts.tracing.provider is None
        async with server.client() as client:
            created = await client.post(server.files_url, headers=TUS | {"Upload-Length": "5"})
        assert created.status_code == 201
