"""The delete saga: a file on an edit Storage Element is removed for good (object, attr.json, registry row), and a
``file:deleted`` event and an audit entry say so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from tusingest.elements.backend import BackendError
from tusingest.elements.pool import ElementPool, ElementUnavailable
from tusingest.finalise.naming import sidecar_key
from tusingest.saga.failpoints import Failpoints
from tusingest.saga.outbox import OutboxRelay
from tusingest.saga.records import FileRecord, NewOutboxMessage, Saga, SagaState
from tusingest.finalise.refusals import (
    DeleteInProgress,
    FileNotFound,
    Refused,
    SagaTasks,
    StorageElementUnknown,
    TransferInProgress,
)
from tusingest.saga.store import DuplicateSaga, SagaStore
from tusingest.finalise.upload import SagaSettings
from tusingest.sessions.store import StoreError
from tusingest.saga.webhooks import FILE_DELETED, file_event_message

log = logging.getLogger(__name__)
audit_log = logging.getLogger("tusingest.audit")

KIND: Final = "delete"
STEPS: Final = ("object_deleted", "sidecar_deleted", "announced", "unregistered")
AUDIT_STREAM: Final = "audit-events"
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


class DeleteSagas:
    """Steps, each recorded in the saga log before the next begins: ``object_deleted`` → ``sidecar_deleted`` →
    ``announced`` (the file event and the audit message queued in the outbox) → ``unregistered`` (the registry row
    removed). Deleting is idempotent, so after a crash a step is simply done again. The saga never rolls back: an
    element that cannot be reached is tried again with backoff, then by recovery, until the file is gone.
    """

    def __init__(
        self,
        *,
        store: SagaStore,
        pool: ElementPool,
        relay: OutboxRelay | None,
        tasks: SagaTasks,
        settings: SagaSettings,
        audit_stream: str | None = None,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.relay = relay
        self.tasks = tasks
        self.settings = settings
        self.audit_stream = audit_stream  # None: no Redis, the audit entry goes to the log only
        self.failpoints = failpoints or Failpoints()

    async def delete(self, file_id: str, *, actor: str, wait: float) -> DeleteOutcome:
        """Delete the file (or join the delete already under way) and wait up to ``wait`` seconds for the outcome.

        Raises a ``Refused`` when the file cannot be deleted. A file deleted before answers "deleted" again.
        """
        latest = await self.store.latest_saga(KIND, file_id)
        if latest is not None and not latest.state.is_finished:
            return await self._wait(latest, wait)
        record = await self.store.get_file(file_id)
        if record is None:
            if latest is not None and latest.state is SagaState.COMPLETED:
                return DeleteOutcome("deleted")
            raise FileNotFound(file_id)
        await self._refuse_if_moving(file_id)
        try:
            element = self.pool.state(record.storage_element_id).element
        except ElementUnavailable:
            raise StorageElementUnknown(file_id, record.storage_element_id) from None
        if not element.mode.allows_delete:
            raise FileInReadonlyStorage(file_id, element.element_id, element.mode.value)
        try:
            saga = await self.store.create_saga(
                KIND,
                file_id,
                _saga_data(record, actor),
                owner=self.settings.owner,
                lease_seconds=self.settings.lease_seconds,
            )
        except DuplicateSaga:
            # Another request (here or on another node) started the same delete a moment ago: join it.
            existing = await self.store.latest_saga(KIND, file_id)
            if existing is None:
                raise FileNotFound(file_id) from None
            return await self._wait(existing, wait)
        self.resume(saga)
        return await self._wait(saga, wait)

    async def _refuse_if_moving(self, file_id: str) -> None:
        # A transfer that switched the row after this delete removed the object would leave the copy behind.
        transfer = await self.store.latest_saga("transfer", file_id)
        if transfer is not None and not transfer.state.is_finished:
            raise TransferInProgress(file_id, transfer.saga_id)

    def resume(self, saga: Saga) -> asyncio.Task[None]:
        """Run the saga here from its last step (or join the task that already does)."""
        return self.tasks.launch(saga, self._run)

    async def _wait(self, saga: Saga, wait: float) -> DeleteOutcome:
        """Poll the saga log until the delete finished, an attempt made during the wait failed, or time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        attempts_before = saga.attempts
        if saga.owner == self.settings.owner and self.tasks.get(saga.saga_id) is None:
            self.resume(saga)  # ours, but no task runs it (an earlier run gave up): try again now
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
            task = self.tasks.get(saga.saga_id)
            pause = min(_POLL_SECONDS, remaining)
            if task is None:
                await asyncio.sleep(pause)
            else:
                await asyncio.wait({task}, timeout=pause)

    # -- the saga ----------------------------------------------------------------------------

    async def _run(self, saga: Saga) -> None:
        failures = 0
        while True:
            current = await self.store.get_saga(saga.saga_id)
            if current is None or current.state.is_finished:
                return
            try:
                await self._forward(current)
                return
            except (BackendError, ElementUnavailable, StoreError, OSError) as exc:
                failures += 1
                await self._record_failure(current, exc)
                if failures >= self.settings.retry_attempts:
                    # Rest until the next recovery round (or a repeated DELETE) starts another run.
                    log.warning("delete saga %s: %s; leaving it to recovery", saga.saga_id, exc)
                    return
                delay = random.uniform(0, self.settings.retry_base_delay * 2 ** (failures - 1))
                log.warning("delete saga %s: %s; retrying in %.1fs", saga.saga_id, exc, delay)
                await asyncio.sleep(delay)

    async def _record_failure(self, saga: Saga, exc: Exception) -> None:
        if isinstance(exc, StoreError):
            return  # the store is what failed: there is nowhere to write it down
        owner = self.settings.owner
        await self.store.bump_attempts(saga.saga_id, owner=owner)
        element_id = saga.data["element_id"]
        message = f"storage element {element_id} cannot be reached; the delete continues in the background: {exc}"
        await self.store.set_state(
            saga.saga_id, owner=owner, state=SagaState.RUNNING, error_code=ELEMENT_UNAVAILABLE, error=message
        )

    async def _forward(self, saga: Saga) -> None:
        data = saga.data
        element_id, key = data["element_id"], data["key"]
        done = STEPS.index(saga.step) + 1 if saga.step in STEPS else 0
        if done <= 0:
            await self._delete_object(element_id, key)
            saga = await self._advance(saga, "object_deleted")
        if done <= 1:
            await self._delete_object(element_id, sidecar_key(key))
            saga = await self._advance(saga, "sidecar_deleted")
        if done <= 2:
            # Queued before the row goes: a crash in between repeats the messages rather than losing them.
            await self.store.enqueue(self._messages(saga))
            saga = await self._advance(saga, "announced")
            if self.relay is not None:
                self.relay.notify()
        if done <= 3:
            await self._unregister(saga)
            saga = await self._advance(saga, "unregistered")
        _audit(data)
        await self.store.set_state(saga.saga_id, owner=self.settings.owner, state=SagaState.COMPLETED)

    async def _delete_object(self, element_id: str, key: str) -> None:
        await self.pool.call(element_id, lambda backend: backend.delete(key))

    async def _unregister(self, saga: Saga) -> None:
        file_id = saga.data["file_id"]
        record = await self.store.get_file(file_id)
        if record is None:
            return
        if (record.storage_element_id, record.storage_key) != (saga.data["element_id"], saga.data["key"]):
            # Moved by a transfer that raced this delete: remove the file where the registry now has it too.
            await self._delete_object(record.storage_element_id, record.storage_key)
            await self._delete_object(record.storage_element_id, sidecar_key(record.storage_key))
        await self.store.delete_file(file_id)

    def _messages(self, saga: Saga) -> list[NewOutboxMessage]:
        data = saga.data
        messages = []
        if self.settings.events_stream:
            fields = {
                "file_id": data["file_id"],
                "storage_element_id": data["element_id"],
                "storage_filename": data["storage_filename"],
                "original_filename": data["original_filename"],
                "size_bytes": data["size_bytes"],
                "deleted_by": data["actor"],
            }
            messages.append(file_event_message(FILE_DELETED, fields, self.settings.events_stream))
        if self.audit_stream:
            messages.append(NewOutboxMessage("redis_stream", self.audit_stream, _audit_entry(data)))
        return messages

    async def _advance(self, saga: Saga, step: str) -> Saga:
        saga = await self.store.advance(
            saga.saga_id,
            owner=self.settings.owner,
            step=step,
            data_update={},
            lease_seconds=self.settings.lease_seconds,
        )
        await self.failpoints.reach(f"delete_{step}", saga.data["element_id"])
        return saga


def _saga_data(record: FileRecord, actor: str) -> dict[str, Any]:
    return {
        "file_id": record.file_id,
        "element_id": record.storage_element_id,
        "key": record.storage_key,
        "storage_filename": record.storage_filename,
        "original_filename": record.original_filename,
        "size_bytes": record.size_bytes,
        "actor": actor,
        "requested_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }


def _audit_entry(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": "file.delete",
        "file_id": data["file_id"],
        "element": data["element_id"],
        "actor": data["actor"],
        "storage_filename": data["storage_filename"],
        "requested_at": data["requested_at"],
    }


def _audit(data: dict[str, Any]) -> None:
    entry = _audit_entry(data)
    # One JSON object per line for log shippers; ``extra`` for handlers that want the fields themselves.
    audit_log.info(json.dumps(entry, ensure_ascii=False, sort_keys=True), extra={"audit": entry})
