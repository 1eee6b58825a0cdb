"""The delete saga: a file on an edit Storage Element is removed for good (object, attr.json, registry row), and a
``file:deleted`` event and an audit row (written with the saga's completion) say so. Its steps run on
``saga.runner.SagaRunner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from tusingest.auth import Identity, is_owner_or_admin
from tusingest.elements.backend import BackendError
from tusingest.elements.pool import ElementPool, ElementUnavailable
from tusingest.finalise.naming import sidecar_key
from tusingest.finalise.refusals import (
    AuditRecorder,
    DeleteInProgress,
    FileNotFound,
    Refused,
    StorageElementUnknown,
    TransferInProgress,
    not_owner,
)
from tusingest.observability.metrics import Metrics
from tusingest.saga.failpoints import Failpoints
from tusingest.saga.outbox import OutboxRelay
from tusingest.saga.records import FileRecord, NewOutboxMessage, Saga, SagaData, SagaState
from tusingest.saga.runner import Failure, SagaRunner, SagaSettings, no_admission
from tusingest.saga.store import DuplicateSaga, SagaStore
from tusingest.saga.webhooks import FILE_DELETED, file_event_message
from tusingest.sessions.audit import Action, AuditEvent
from tusingest.sessions.store import StoreError

log = logging.getLogger(__name__)

KIND: Final = "delete"
STEPS: Final = ("object_deleted", "sidecar_deleted", "announced", "unregistered")
ELEMENT_UNAVAILABLE: Final = "storage_element_unavailable"
_POLL_SECONDS = 0.05


class FileInReadonlyStorage(Refused):
    code = "file_in_readonly_storage"

    def __init__(self, file_id: str, element_id: str, mode: str) -> None:
        super().__init__(
            f"file {file_id} is on storage element {element_id} in mode {mode}; only edit elements allow deletes"
        )


@dataclass(frozen=True, slots=True)
class DeleteOutcome:
    """Where a delete stands for the client: done, or still to be finished in the background."""

    status: Literal["deleted", "pending"]
    error_code: str | None = None
    error: str | None = None


class DeleteSagaData(SagaData):
    """The delete saga's working memory: where the file is, and what the event and the audit row say."""

    file_id: str = ""
    element_id: str = ""
    key: str = ""
    storage_filename: str = ""
    original_filename: str = ""
    size_bytes: int = 0
    actor: str = "anonymous"  # the subject of the token that asked for the delete
    actor_name: str | None = None
    actor_address: str | None = None
    owner_id: str | None = None  # the file's created_by_id: who else may join this delete
    requested_at: str = ""  # ISO 8601, UTC

    @classmethod
    def of(cls, record: FileRecord, actor: Identity, address: str | None) -> DeleteSagaData:
        return cls(
            file_id=record.file_id,
            element_id=record.storage_element_id,
            key=record.storage_key,
            storage_filename=record.storage_filename,
            original_filename=record.original_filename,
            size_bytes=record.size_bytes,
            actor=actor.subject,
            actor_name=actor.name or None,
            actor_address=address,
            owner_id=record.created_by_id,
            requested_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        )


_TRANSIENT = (BackendError, ElementUnavailable, StoreError, OSError)


class DeleteSagas:
    """Steps, each recorded in the saga log before the next begins: ``object_deleted`` → ``sidecar_deleted`` →
    ``announced`` (the file event queued in the outbox) → ``unregistered`` (the registry row
    removed). Deleting is idempotent, so after a crash a step is simply done again. The saga never rolls back: an
    element that cannot be reached is tried again with backoff, then by recovery, until the file is gone.
    """

    kind: Final = KIND

    def __init__(
        self,
        *,
        store: SagaStore,
        pool: ElementPool,
        relay: OutboxRelay | None,
        settings: SagaSettings,
        failpoints: Failpoints | None = None,
        record_audit: AuditRecorder | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.relay = relay
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.record_audit = record_audit  # where a refusal goes (the file is somebody else's)
        self.failpoints = failpoints or Failpoints()
        self.runner: SagaRunner[None] = SagaRunner(self, store, settings)

    async def delete(self, file_id: str, *, actor: Identity, wait: float, address: str | None = None) -> DeleteOutcome:
        """Delete the file (or join the delete already under way) and wait up to ``wait`` seconds for the outcome.

        Raises a ``Refused`` when the file cannot be deleted. A file deleted before answers "deleted" again.
        Only the file's creator or an admin may (invariant 7): anyone else is told it does not exist.
        """
        latest = await self.store.latest_saga(KIND, file_id)
        owner_before = DeleteSagaData.from_data(latest.data).owner_id if latest is not None else None
        if latest is not None and not latest.state.is_finished:
            if not is_owner_or_admin(actor, owner_before):
                raise await not_owner(self.record_audit, actor.subject, actor.name, address, file_id)
            return await self._wait(latest, wait)
        record = await self.store.get_file(file_id)
        if record is None:
            if latest is not None and latest.state is SagaState.COMPLETED and is_owner_or_admin(actor, owner_before):
                return DeleteOutcome("deleted")
            raise FileNotFound(file_id)
        if not is_owner_or_admin(actor, record.created_by_id):
            raise await not_owner(self.record_audit, actor.subject, actor.name, address, file_id)
        await self._refuse_if_moving(file_id)
        try:
            element = self.pool.state(record.storage_element_id).element
        except ElementUnavailable:
            raise StorageElementUnknown(file_id, record.storage_element_id) from None
        if not element.mode.allows_delete:
            raise FileInReadonlyStorage(file_id, element.element_id, element.mode.value)
        try:
            saga, _ = await self.runner.start(file_id, DeleteSagaData.of(record, actor, address))
        except DuplicateSaga:
            # Another request (here or on another node) started the same delete a moment ago: join it.
            existing = await self.store.latest_saga(KIND, file_id)
            if existing is None:
                raise FileNotFound(file_id) from None
            return await self._wait(existing, wait)
        return await self._wait(saga, wait)

    async def _refuse_if_moving(self, file_id: str) -> None:
        # A transfer that switched the row after this delete removed the object would leave the copy behind.
        transfer = await self.store.latest_saga("transfer", file_id)
        if transfer is not None and not transfer.state.is_finished:
            raise TransferInProgress(file_id, transfer.saga_id)

    async def recover(self) -> int:
        return await self.runner.recover()

    async def close(self) -> None:
        await self.runner.close()

    async def _wait(self, saga: Saga, wait: float) -> DeleteOutcome:
        """Poll the saga log until the delete finished, an attempt made during the wait failed, or time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        attempts_before = saga.attempts
        if saga.owner == self.settings.owner and not self.runner.running(saga.subject_id):
            self.runner.launch(saga)  # ours, but no task runs it (an earlier run gave up): try again now
        while True:
            current = await self.store.get_saga(saga.saga_id) or saga
            if current.state is SagaState.COMPLETED:
                return DeleteOutcome("deleted")
            failed_meanwhile = current.error_code is not None and current.attempts > attempts_before
            remaining = deadline - loop.time()
            if failed_meanwhile or current.state.is_finished or remaining <= 0:
                if current.error_code is None:
                    return DeleteOutcome(
                        "pending", DeleteInProgress.code, f"the delete of file {saga.subject_id} is still running"
                    )
                return DeleteOutcome("pending", current.error_code, current.error)
            task = self.runner.task(saga.saga_id)
            pause = min(_POLL_SECONDS, remaining)
            if task is None:
                await asyncio.sleep(pause)
            else:
                await asyncio.wait({task}, timeout=pause)

    # -- the saga's steps (SagaSteps) ---------------------------------------------------------

    def admission(self, saga: Saga) -> contextlib.AbstractAsyncContextManager[object]:
        return no_admission()

    def failure(self, saga: Saga, exc: Exception) -> Failure | None:
        return Failure.TRANSIENT if isinstance(exc, _TRANSIENT) else None

    async def failing(self, saga: Saga, exc: Exception) -> None:
        if isinstance(exc, StoreError):
            return  # the store is what failed: there is nowhere to write it down
        element_id = DeleteSagaData.from_data(saga.data).element_id
        message = f"storage element {element_id} cannot be reached; the delete continues in the background: {exc}"
        await self.store.set_state(
            saga.saga_id,
            owner=self.settings.owner,
            state=SagaState.RUNNING,
            error_code=ELEMENT_UNAVAILABLE,
            error=message,
        )

    async def failed(self, saga: Saga, exc: Exception, attempts: int) -> None:
        # Never undone: rest until the next recovery round (or a repeated DELETE) starts another run.
        log.warning("delete saga %s: %s; leaving it to recovery", saga.saga_id, exc)

    async def timed_out(self, saga: Saga) -> None:
        log.warning("delete saga %s ran out of time at step %s; recovery carries it on", saga.saga_id, saga.step)

    async def current(self, saga: Saga) -> None:
        return None

    async def forward(self, saga: Saga) -> None:
        data = DeleteSagaData.from_data(saga.data)
        element_id, key = data.element_id, data.key
        done = STEPS.index(saga.step) + 1 if saga.step in STEPS else 0
        if done <= 0:
            await self._delete_object(element_id, key)
            saga = await self._advance(saga, "object_deleted", data)
        if done <= 1:
            await self._delete_object(element_id, sidecar_key(key))
            saga = await self._advance(saga, "sidecar_deleted", data)
        if done <= 2:
            # Queued before the row goes: a crash in between repeats the messages rather than losing them.
            await self.store.enqueue(self._messages(data))
            saga = await self._advance(saga, "announced", data)
            if self.relay is not None:
                self.relay.notify()
        if done <= 3:
            await self._unregister(data)
            saga = await self._advance(saga, "unregistered", data)
        deleted = AuditEvent(
            Action.FILE_DELETED,
            subject=data.actor,
            subject_name=data.actor_name,
            client_address=data.actor_address,
            file_id=data.file_id,
            element_ids=(data.element_id,),
        )
        await self.store.set_state(saga.saga_id, owner=self.settings.owner, state=SagaState.COMPLETED, audit=deleted)
        self.metrics.saga_transactions.labels(KIND, "completed").inc()

    async def _delete_object(self, element_id: str, key: str) -> None:
        await self.pool.call(element_id, lambda backend: backend.delete(key))

    async def _unregister(self, data: DeleteSagaData) -> None:
        record = await self.store.get_file(data.file_id)
        if record is None:
            return
        if (record.storage_element_id, record.storage_key) != (data.element_id, data.key):
            # Moved by a transfer that raced this delete: remove the file where the registry now has it too.
            await self._delete_object(record.storage_element_id, record.storage_key)
            await self._delete_object(record.storage_element_id, sidecar_key(record.storage_key))
        await self.store.delete_file(data.file_id)

    def _messages(self, data: DeleteSagaData) -> list[NewOutboxMessage]:
        messages = []
        if self.settings.events_stream:
            fields = {
                "file_id": data.file_id,
                "storage_element_id": data.element_id,
                "storage_filename": data.storage_filename,
                "original_filename": data.original_filename,
                "size_bytes": data.size_bytes,
                "deleted_by": data.actor,
            }
            messages.append(file_event_message(FILE_DELETED, fields, self.settings.events_stream))
        return messages

    async def _advance(self, saga: Saga, step: str, data: DeleteSagaData) -> Saga:
        # Nothing of the delete's data changes on the way; the step is what is recorded.
        saga = await self.runner.advance(saga, step)
        await self.failpoints.reach(f"delete_{step}", data.element_id)
        return saga
