"""The one saga runner (saga/runner.py) on a real SQLite saga store: retries with backoff counted in the store,
permanent failures settled at once, the time limit, fencing, recovery and closing, and typed saga data that reads
rows of the previous version."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tusingest.app import open_database
from tusingest.finalise.delete import DeleteSagaData
from tusingest.finalise.transfer import TransferSagaData
from tusingest.finalise.upload import UploadSagaData
from tusingest.observability.tracing import Tracing, TracingSettings
from tusingest.saga import SagaState, SagaStore
from tusingest.saga.records import Saga, SagaData, SagaKind
from tusingest.saga.runner import Failure, SagaRunner, SagaSettings, cancel_and_wait, no_admission


class Flaky(Exception):
    pass


class Broken(Exception):
    pass


class Counted(SagaData):
    note: str = ""


class ScriptedSteps:
    """A saga kind whose forward fails ``failures`` times with Flaky, then finishes; Broken is permanent."""

    kind: SagaKind = "delete"

    def __init__(self, store: SagaStore, owner: str, *, failures: int = 0, error: type[Exception] = Flaky) -> None:
        self.store = store
        self.owner = owner
        self.failures = failures
        self.error = error
        self.calls = 0
        self.release = asyncio.Event()
        self.block = False
        self.settled: list[tuple[str, int]] = []

    def admission(self, saga: Saga) -> contextlib.AbstractAsyncContextManager[object]:
        return no_admission()

    async def forward(self, saga: Saga) -> str:
        self.calls += 1
        if self.block:
            await self.release.wait()
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        await self.store.set_state(saga.saga_id, owner=self.owner, state=SagaState.COMPLETED)
        return "done"

    def failure(self, saga: Saga, exc: Exception) -> Failure | None:
        if isinstance(exc, Flaky):
            return Failure.TRANSIENT
        return Failure.PERMANENT if isinstance(exc, Broken) else None

    async def failing(self, saga: Saga, exc: Exception) -> None:
        return None

    async def failed(self, saga: Saga, exc: Exception, attempts: int) -> str:
        self.settled.append((type(exc).__name__, attempts))
        await self.store.set_state(saga.saga_id, owner=self.owner, state=SagaState.COMPENSATED, error=str(exc))
        return "failed"

    async def timed_out(self, saga: Saga) -> str:
        return "timed out"

    async def current(self, saga: Saga) -> str:
        return f"current:{saga.state.value}"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SagaStore]:
    saga_store = open_database(f"sqlite:///{tmp_path / 'sagas.db'}").sagas
    await saga_store.open()
    yield saga_store
    await saga_store.close()


def settings(**overrides: float) -> SagaSettings:
    values: dict[str, float] = {"lease_seconds": 30.0, "retry_attempts": 3, "retry_base_delay": 0.0} | overrides
    return SagaSettings(owner="node-a", **values)  # type: ignore[arg-type]


async def test_a_transient_failure_is_retried_and_each_attempt_is_counted_in_the_store(store: SagaStore) -> None:
    steps = ScriptedSteps(store, "node-a", failures=2)
    runner = SagaRunner(steps, store, settings())

    saga, task = await runner.start("file-1", Counted(note="x"))

    assert await task == "done"
    assert steps.calls == 3
    finished = await store.get_saga(saga.saga_id)
    assert finished is not None and finished.state is SagaState.COMPLETED and finished.attempts == 2


async def test_transient_failures_that_outlast_the_attempts_settle_the_saga_with_the_attempt_count(
    store: SagaStore,
) -> None:
    steps = ScriptedSteps(store, "node-a", failures=10)
    runner = SagaRunner(steps, store, settings(retry_attempts=3))

    _, task = await runner.start("file-1", Counted())

    assert await task == "failed"
    assert steps.calls == 3
    assert steps.settled == [("Flaky", 3)]


async def test_a_permanent_failure_is_settled_at_once_without_a_retry(store: SagaStore) -> None:
    steps = ScriptedSteps(store, "node-a", failures=1, error=Broken)
    runner = SagaRunner(steps, store, settings())

    saga, task = await runner.start("file-1", Counted())

    assert await task == "failed"
    assert steps.calls == 1 and steps.settled == [("Broken", 1)]
    assert (await store.get_saga(saga.saga_id)).attempts == 0  # type: ignore[union-attr]


async def test_a_run_past_the_time_limit_is_handed_to_timed_out(store: SagaStore) -> None:
    steps = ScriptedSteps(store, "node-a")
    steps.block = True
    runner = SagaRunner(steps, store, settings(timeout=0.2))

    _, task = await runner.start("file-1", Counted())

    assert await asyncio.wait_for(task, 5) == "timed out"


async def test_a_saga_taken_over_by_another_node_stops_here(store: SagaStore) -> None:
    steps = ScriptedSteps(store, "node-a")
    steps.block = True
    runner = SagaRunner(steps, store, settings(lease_seconds=30.0))
    saga, task = await runner.start("file-1", Counted())
    # node-b claims it as if node-a's lease had run out; node-a's next write is refused (fencing)
    later = datetime.now(UTC) + timedelta(seconds=60)
    (claimed,) = await store.claim_stale("node-b", lease_seconds=30.0, limit=5, now=later)
    assert claimed.saga_id == saga.saga_id

    steps.release.set()

    assert await asyncio.wait_for(task, 5) == "current:running"
    current = await store.get_saga(saga.saga_id)
    assert current is not None and current.owner == "node-b" and current.state is SagaState.RUNNING


async def test_recovery_resumes_a_saga_this_node_owns_that_no_task_runs(store: SagaStore) -> None:
    steps = ScriptedSteps(store, "node-a")
    runner = SagaRunner(steps, store, settings())
    saga = await store.create_saga("delete", "file-1", Counted().to_data(), owner="node-a", lease_seconds=30.0)

    assert await runner.recover() == 1
    task = runner.task(saga.saga_id)

    assert task is not None and await task == "done"
    assert await runner.recover() == 0  # finished: nothing left to resume


async def test_a_recovered_saga_runs_in_a_trace_of_its_own(store: SagaStore) -> None:
    tracing = Tracing(TracingSettings())
    assert tracing.provider is not None
    exporter = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.activate()
    runner = SagaRunner(ScriptedSteps(store, "node-a"), store, settings())
    saga = await store.create_saga("delete", "file-1", Counted().to_data(), owner="node-a", lease_seconds=30.0)

    assert await runner.recover() == 1
    task = runner.task(saga.saga_id)
    assert task is not None and await task == "done"

    (span,) = exporter.get_finished_spans()
    assert span.name == "saga.delete" and span.parent is None
    assert span.attributes is not None and span.attributes["saga.id"] == saga.saga_id


async def test_close_stops_running_sagas_and_leaves_them_to_recovery(store: SagaStore) -> None:
    steps = ScriptedSteps(store, "node-a")
    steps.block = True
    runner = SagaRunner(steps, store, settings())
    saga, task = await runner.start("file-1", Counted())

    await runner.close()

    assert task.cancelled()
    current = await store.get_saga(saga.saga_id)
    assert current is not None and current.state is SagaState.RUNNING


async def test_cancel_and_wait_ends_every_task_and_ignores_none() -> None:
    never = asyncio.create_task(asyncio.Event().wait())
    failing = asyncio.create_task(asyncio.sleep(0, result=None))

    await cancel_and_wait(never, None, failing)

    assert never.cancelled() and failing.done()


def test_saga_data_of_the_previous_version_reads_with_unknown_keys_ignored_and_missing_ones_defaulted() -> None:
    # Rows as the dict-based sagas wrote them: a refusal on the first bytes, a placed upload, a transfer.
    refused = UploadSagaData.from_data({"upload_id": "u1", "file_id": None, "http_status": 415, "retired": 1})
    placed = UploadSagaData.from_data(
        {
            "upload_id": "u2",
            "file_id": "f2",
            "length": 10,
            "metadata": {"filename": "a.txt"},
            "compression": {"algorithm": "br", "stored_size": 4, "spool": "/s"},
            "tried": ["se-1"],
            "element_id": "se-2",
        }
    )
    transfer = TransferSagaData.from_data({"file_id": "f3", "bytes_total": 7, "copy": "streamed"})
    delete = DeleteSagaData.from_data({"file_id": "f4", "element_id": "se-1", "key": "k"})

    assert (refused.file_id, refused.http_status, refused.tried) == (None, 415, [])
    assert placed.compression is not None and placed.placed_size() == 4 and placed.tried == ["se-1"]
    assert (transfer.copied_by, transfer.bytes_transferred, transfer.started_at) == ("streamed", 0, None)
    assert transfer.to_data()["copy"] == "streamed"  # written back under the key the previous version used
    assert (delete.actor, delete.size_bytes) == ("anonymous", 0)
    assert UploadSagaData.from_data(placed.to_data()) == placed
