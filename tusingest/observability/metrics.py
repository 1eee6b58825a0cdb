"""Prometheus metrics with the ArtStore names (docs/operations.md, "Metrics").

One ``Metrics`` per app, on its own registry (not prometheus-client's global one), so several
apps in one process (the tests) do not share counters. app.py builds it and hands it to the parts
that record; ``GET /metrics`` renders ``Metrics.render()``. ``serve`` runs one process per node,
so prometheus-client's multiprocess mode is not used.

Labels never carry a token, a subject or a raw path: requests are labelled by route template.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX: Final = "artstore_ingester_"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

KIB: Final = 1 << 10
# 64 KiB .. 5 GiB: every fourfold step, then 5 GiB (the largest file ArtStore takes in one piece).
SIZE_BUCKETS: Final = (*(64 * KIB * 4**i for i in range(8)), 5 * (1 << 30))
DURATION_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
FAST_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
RATIO_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# artstore_ingester_circuit_breaker_state values.
BREAKER_VALUES: Final = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    """Every series the node exports. The parts call the plain prometheus-client objects."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- ArtStore names -------------------------------------------------------------------
        self.uploads = Counter(PREFIX + "uploads_total", "Finalised uploads by status", ["status"], registry=r)
        self.upload_duration = Histogram(
            PREFIX + "upload_duration_seconds",
            "Upload creation to settled finalisation",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upload_size = Histogram(
            PREFIX + "upload_size_bytes", "Size of finalised uploads", buckets=SIZE_BUCKETS, registry=r
        )
        self.storage_selection = Histogram(
            PREFIX + "storage_selection_duration_seconds",
            "Time to choose a storage element",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.compression_ratio = Histogram(
            PREFIX + "compression_ratio",
            "Stored size / original size of compressed files",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.saga_transactions = Counter(
            PREFIX + "saga_transactions_total", "Sagas settled, by kind and outcome", ["saga", "outcome"], registry=r
        )
        self.saga_compensations = Counter(
            PREFIX + "saga_compensations_total", "Compensating steps run", ["saga", "step"], registry=r
        )
        # --- tus level --------------------------------------------------------------------------
        self.requests = Counter(
            PREFIX + "http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request duration by method and route template",
            ["method", "route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(PREFIX + "http_requests_in_flight", "HTTP requests being served", registry=r)
        self.bytes_received = Counter(
            PREFIX + "tus_bytes_received_total", "Upload bytes made durable in staging", registry=r
        )
        self.tus_uploads = Counter(
            PREFIX + "tus_uploads_total",
            "tus uploads by event: created, completed, terminated, expired",
            ["event"],
            registry=r,
        )
        self.lock_waits = Counter(PREFIX + "lock_waits_total", "Requests that waited for an upload's lock", registry=r)
        self.lock_release_requests = Counter(
            PREFIX + "lock_release_requests_total", "Requests asking a lock holder to let go", registry=r
        )
        self.lock_timeouts = Counter(PREFIX + "lock_timeouts_total", "Lock waits that timed out", registry=r)
        self.finalise_stage = Histogram(
            PREFIX + "finalise_stage_duration_seconds",
            "Duration of each finalisation stage",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.virus_detections = Counter(PREFIX + "virus_detections_total", "Uploads refused as infected", registry=r)
        self.outbox_backlog = Gauge(
            PREFIX + "outbox_backlog", "Outbox messages not delivered yet (after the relay's last round)", registry=r
        )
        self.webhook_failures = Counter(
            PREFIX + "webhook_delivery_failures_total", "Webhook deliveries that failed", registry=r
        )

    def watch(self, collector: Collector) -> None:
        """Register a collect-time collector (breaker states, outbox backlog)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BreakerStates(Collector):
    """artstore_ingester_circuit_breaker_state{element}, read from the pool when scraped."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "circuit_breaker_state", "Breaker per element: 0 closed, 1 half-open, 2 open", labels=["element"]
        )
        for element, state in self._states():
            family.add_metric([element], BREAKER_VALUES.get(state, 2))
        yield family


class ReadGauge(Collector):
    """A gauge read when scraped (e.g. artstore_ingester_staging_free_bytes); a failing read omits it."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = PREFIX + name, documentation, read

    def collect(self) -> Iterator[Metric]:
        try:
            reading = self._read()
        except OSError:
            return
        yield GaugeMetricFamily(self._name, self._documentation, value=reading)
