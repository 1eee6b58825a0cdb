"""The one saga runner: every saga (upload, delete, transfer) runs here, in a task of its own.

The runner owns what all sagas share: launching a saga as a task (and knowing which run on this node), keeping
its lease (renewed every third of SAGA_LEASE_SECONDS), retrying transient failures with exponential backoff
and full jitter (tenacity), counting attempts in the saga log, the time limit (SAGA_TIMEOUT_SECONDS), recovery
(take over sagas whose node died, resume those this node owns but no task runs) and fencing (a saga taken over
by another node stops here). A saga kind supplies only its ``SagaSteps``: the way forward from the last
recorded step, and what a failure means for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from tusingest.observability import tracing
from tusingest.saga.records import UNFINISHED_STATES, Saga, SagaData, SagaKind
from tusingest.saga.store import SagaOwnershipLost, SagaStore
from tusingest.sessions.store import StoreError

log = logging.getLogger(__name__)

RECOVERY_BATCH = 20  # stale sagas one recovery round takes over, per kind


@dataclass(frozen=True, slots=True)
class SagaSettings:
    """The sagas' settings, built once in app.py."""

    owner: str  # this node's id in the saga log
    lease_seconds: float = 60.0
    retry_attempts: int = 5
    retry_base_delay: float = 0.5
    timeout: float = 3600.0
    webhook_urls: tuple[str, ...] = ()
    events_stream: str | None = None  # None: no Redis, no file events
    default_username: str = "anonymous"
    concurrency: int = 4  # upload sagas reading, scanning, compressing and putting at once; the others queue


class Failure(enum.Enum):
    TRANSIENT = "transient"  # try again after a backoff, until the attempts run out
    PERMANENT = "permanent"  # trying again gives the same answer: settle the saga now


class SagaSteps[R](Protocol):
    """What one saga kind supplies; the runner calls it, ``R`` is what a run ends with."""

    @property
    def kind(self) -> SagaKind: ...

    def admission(self, saga: Saga) -> contextlib.AbstractAsyncContextManager[object]:
        """Entered before the run, outside its time limit: a kind bounds how many of its sagas run at once."""

    async def forward(self, saga: Saga) -> R:
        """One attempt: carry the saga on from its last recorded step (or go on compensating) to its end."""

    def failure(self, saga: Saga, exc: Exception) -> Failure | None:
        """What ``exc``, raised by ``forward``, means; None: not a saga failure (a bug), let it through."""

    async def failing(self, saga: Saga, exc: Exception) -> None:
        """Called on each transient failure, after it is counted: a kind may write down what went wrong."""

    async def failed(self, saga: Saga, exc: Exception, attempts: int) -> R:
        """Settle a saga after a permanent failure, or a transient one that ``attempts`` tries did not overcome."""

    async def timed_out(self, saga: Saga) -> R:
        """The run took longer than SAGA_TIMEOUT_SECONDS."""

    async def current(self, saga: Saga) -> R:
        """Where the saga stands by its log, for a run that stopped without settling it (taken over, a bug)."""


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel the tasks and wait until each has ended; what they raise on the way out is dropped."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class _Transient(Exception):
    def __init__(self, saga: Saga, error: Exception, attempts: int) -> None:
        super().__init__(str(error))
        self.saga = saga
        self.error = error
        self.attempts = attempts


class SagaRunner[R]:
    """Runs the sagas of one kind on this node."""

    def __init__(self, steps: SagaSteps[R], store: SagaStore, settings: SagaSettings) -> None:
        self.steps = steps
        self.store = store
        self.settings = settings
        self.kind: SagaKind = steps.kind
        self._tasks: dict[str, asyncio.Task[R]] = {}  # by saga id
        self._subjects: dict[str, str] = {}  # subject id -> saga id of the task running it
        self._starting: set[str] = set()  # subjects whose saga is being created: recovery leaves them alone

    # -- starting and finding ---------------------------------------------------------------

    async def start(
        self,
        subject_id: str,
        data: SagaData,
        work: Callable[[Saga], Awaitable[R]] | None = None,
        *,
        first: bool = False,
    ) -> tuple[Saga, asyncio.Task[R]]:
        """Record a new saga for ``subject_id`` and run it here: ``forward`` with retries, or ``work`` once.

        Raises DuplicateSaga while another saga of this kind for the subject is unfinished (``first``: while
        any is on record, see ``SagaStore.create_saga``).
        """
        self._starting.add(subject_id)
        if data.traceparent is None:
            data.traceparent = tracing.traceparent()
        try:
            saga = await self.store.create_saga(
                self.kind,
                subject_id,
                data.to_data(),
                owner=self.settings.owner,
                lease_seconds=self.settings.lease_seconds,
                first=first,
            )
            return saga, self.launch(saga, work, fresh=True)
        finally:
            self._starting.discard(subject_id)

    def launch(
        self, saga: Saga, work: Callable[[Saga], Awaitable[R]] | None = None, *, fresh: bool = False
    ) -> asyncio.Task[R]:
        """Run the saga in a task, unless a task for it runs already (then that one).

        ``fresh``: ``saga`` is the row just written, so the first attempt need not read it again.
        """
        running = self.task(saga.saga_id)
        if running is not None:
            return running
        task = asyncio.create_task(self._run(saga, work, fresh), name=f"{saga.kind}-saga-{saga.saga_id}")
        self._tasks[saga.saga_id] = task
        self._subjects[saga.subject_id] = saga.saga_id
        task.add_done_callback(lambda done: self._forget(saga, done))
        return task

    def task(self, saga_id: str) -> asyncio.Task[R] | None:
        task = self._tasks.get(saga_id)
        return None if task is None or task.done() else task

    def task_for(self, subject_id: str) -> asyncio.Task[R] | None:
        saga_id = self._subjects.get(subject_id)
        return None if saga_id is None else self.task(saga_id)

    def running(self, subject_id: str) -> bool:
        return subject_id in self._starting or self.task_for(subject_id) is not None

    def _forget(self, saga: Saga, task: asyncio.Task[R]) -> None:
        if self._tasks.get(saga.saga_id) is task:
            del self._tasks[saga.saga_id]
            if self._subjects.get(saga.subject_id) == saga.saga_id:
                del self._subjects[saga.subject_id]

    # -- what the steps record ---------------------------------------------------------------

    async def advance(self, saga: Saga, step: str, data: SagaData | None = None) -> Saga:
        """Record ``step`` as done, with the saga's data as it is now (None: unchanged); renews the lease. Fenced."""
        # debug: four lines per upload at info would cost more than the rest of the instrumentation together.
        log.debug(
            "%s saga %s: step %s done",
            self.kind,
            saga.saga_id,
            step,
            extra={"saga": self.kind, "saga_id": saga.saga_id, "step": step},
        )
        return await self.store.advance(
            saga.saga_id,
            owner=self.settings.owner,
            step=step,
            data_update={} if data is None else data.to_data(),
            lease_seconds=self.settings.lease_seconds,
        )

    async def fence(self, saga: Saga) -> None:
        """Renew the lease now, or raise SagaOwnershipLost: keeps any other node off the saga for one step."""
        if not await self.store.renew_lease(
            saga.saga_id, owner=self.settings.owner, lease_seconds=self.settings.lease_seconds
        ):
            raise SagaOwnershipLost(saga.saga_id, self.settings.owner, None)

    # -- recovery and closing ---------------------------------------------------------------

    async def recover(self, limit: int = RECOVERY_BATCH) -> int:
        """Take over sagas of this kind whose node died (lease expired), and run every one this node owns but no
        task runs (an earlier run here rested after its attempts ran out). How many were started."""
        await self.store.claim_stale(
            self.settings.owner, lease_seconds=self.settings.lease_seconds, limit=limit, kinds=(self.kind,)
        )
        resumed = 0
        for saga in await self.store.list_sagas(list(UNFINISHED_STATES)):
            if saga.kind != self.kind or saga.owner != self.settings.owner or self.running(saga.subject_id):
                continue
            log.info("carrying on %s saga %s of %s at step %s", saga.kind, saga.saga_id, saga.subject_id, saga.step)
            self.launch(saga)
            resumed += 1
        return resumed

    async def close(self) -> None:
        """Stop every running saga where it is: its lease lapses and recovery, here or elsewhere, resumes it."""
        await cancel_and_wait(*self._tasks.values())

    # -- one run ----------------------------------------------------------------------------

    async def _run(self, saga: Saga, work: Callable[[Saga], Awaitable[R]] | None, fresh: bool = False) -> R:
        if tracing.current_ids() is not None:  # started by a request: its spans are children of the request's
            return await self._run_here(saga, work, fresh)
        # Recovery (its node died, or its attempts rested): a trace of its own, holding this run's spans,
        # linked to the trace of the request that began the saga.
        attributes = {"saga.kind": self.kind, "saga.id": saga.saga_id, "saga.subject": saga.subject_id}
        began_by = tracing.link_to(saga.data.get("traceparent"))
        with tracing.span(f"saga.{self.kind}", attributes | {"saga.step": saga.step}, links=began_by):
            return await self._run_here(saga, work, fresh)

    async def _run_here(self, saga: Saga, work: Callable[[Saga], Awaitable[R]] | None, fresh: bool = False) -> R:
        keeper = asyncio.create_task(self._keep_lease(saga.saga_id), name=f"{saga.kind}-lease-{saga.saga_id}")
        try:
            async with self.steps.admission(saga):
                try:
                    async with asyncio.timeout(self.settings.timeout):
                        return await (work(saga) if work is not None else self._attempts(saga, fresh))
                except TimeoutError:
                    return await self.steps.timed_out(await self._latest(saga))
        except SagaOwnershipLost:
            log.warning("%s saga %s was taken over by another node; stopping here", saga.kind, saga.saga_id)
            return await self.steps.current(await self._latest(saga))
        except Exception:  # a bug must not kill the node; the lease lapses and recovery tries again
            log.exception("%s saga %s stopped unexpectedly; recovery will carry it on", saga.kind, saga.saga_id)
            return await self.steps.current(await self._latest(saga))
        finally:
            await cancel_and_wait(keeper)

    async def _keep_lease(self, saga_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            with contextlib.suppress(Exception):  # a missed renewal is retried; fencing catches a lost lease
                await self.store.renew_lease(
                    saga_id, owner=self.settings.owner, lease_seconds=self.settings.lease_seconds
                )

    async def _attempts(self, saga: Saga, fresh: bool = False) -> R:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.settings.retry_attempts)),
            # uniform(0, base * 2 ** (attempt - 1)): full jitter, so sagas failing together do not retry together
            wait=wait_random_exponential(multiplier=self.settings.retry_base_delay),
            retry=retry_if_exception_type(_Transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    # Each attempt starts from the log as it is now; the first of a saga just begun, from its row.
                    current = saga if fresh and number == 1 else await self._latest(saga)
                    return await self._attempt(current, number)
        except _Transient as exhausted:
            self._log_compensation(exhausted.saga, exhausted.error)
            return await self.steps.failed(exhausted.saga, exhausted.error, exhausted.attempts)
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    async def _attempt(self, saga: Saga, attempts: int) -> R:
        if saga.state.is_finished:
            return await self.steps.current(saga)
        try:
            return await self.steps.forward(saga)
        except SagaOwnershipLost:
            raise
        except Exception as exc:
            failure = self.steps.failure(saga, exc)
            if failure is None:
                raise
            saga = await self._latest(saga)
            if saga.state.is_finished:
                return await self.steps.current(saga)
            if failure is Failure.PERMANENT:
                self._log_compensation(saga, exc)
                return await self.steps.failed(saga, exc, attempts)
            if not isinstance(exc, StoreError):  # when the store failed there is nowhere to count the attempt
                saga = await self.store.bump_attempts(saga.saga_id, owner=self.settings.owner)
            await self.steps.failing(saga, exc)
            raise _Transient(saga, exc, attempts) from exc

    def _log_compensation(self, saga: Saga, error: Exception) -> None:
        log.warning(
            "%s saga %s failed at step %s (%s); compensating",
            self.kind,
            saga.saga_id,
            saga.step,
            type(error).__name__,
            extra={"saga": self.kind, "saga_id": saga.saga_id, "step": saga.step, "outcome": "compensating"},
        )

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, _Transient):
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning("%s saga %s: %s; retrying in %.1fs", self.kind, error.saga.saga_id, error.error, delay)

    async def _latest(self, saga: Saga) -> Saga:
        with contextlib.suppress(StoreError):
            return await self.store.get_saga(saga.saga_id) or saga
        return saga


@contextlib.asynccontextmanager
async def no_admission() -> AsyncIterator[None]:
    """Admission for a kind whose sagas all run at once."""
    yield
