"""What the delete and transfer sagas share: one task per running saga that holds the saga's lease, and the
refusals a client is given before a saga starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from tusingest.saga.records import Saga
from tusingest.saga.store import SagaOwnershipLost, SagaStore

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request the saga will not start; ``status`` and ``code`` are what the client is told."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FileNotFound(Refused):
    status = 404
    code = "file_not_found"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"no file {file_id} in the registry")


class StorageElementUnknown(Refused):
    """The file's element is not in the current element list, so nothing can be done with it now."""

    status = 409
    code = "storage_element_unknown"

    def __init__(self, file_id: str, element_id: str) -> None:
        super().__init__(f"file {file_id} is on storage element {element_id}, which is not in the element list")


class TransferInProgress(Refused):
    status = 409
    code = "transfer_in_progress"

    def __init__(self, file_id: str, transfer_id: str) -> None:
        super().__init__(f"transfer {transfer_id} of file {file_id} is still running")
        self.transfer_id = transfer_id


class DeleteInProgress(Refused):
    status = 409
    code = "delete_in_progress"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"file {file_id} is being deleted")


class SagaTasks:
    """The sagas this node runs right now, by saga id. Each runs in its own task, which renews the saga's lease
    every third of ``lease_seconds`` while it runs; when the task ends (or the node dies) the lease lapses and
    recovery, here or on another node, may carry the saga on.
    """

    def __init__(self, store: SagaStore, *, owner: str, lease_seconds: float) -> None:
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def launch(self, saga: Saga, run: Callable[[Saga], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``run(saga)`` in a task, unless a task for this saga is running already (then that one)."""
        running = self._tasks.get(saga.saga_id)
        if running is not None and not running.done():
            return running
        task = asyncio.create_task(self._holding_lease(saga, run), name=f"{saga.kind}-saga-{saga.saga_id}")
        self._tasks[saga.saga_id] = task
        task.add_done_callback(lambda done: self._forget(saga.saga_id, done))
        return task

    def get(self, saga_id: str) -> asyncio.Task[None] | None:
        task = self._tasks.get(saga_id)
        return None if task is None or task.done() else task

    def _forget(self, saga_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(saga_id) is task:
            del self._tasks[saga_id]

    async def _holding_lease(self, saga: Saga, run: Callable[[Saga], Awaitable[None]]) -> None:
        keeper = asyncio.create_task(self._keep_lease(saga.saga_id))
        try:
            await run(saga)
        except SagaOwnershipLost:
            log.warning("%s saga %s was taken over by another node; stopping here", saga.kind, saga.saga_id)
        except Exception:  # a bug must not kill the node; the lease lapses and recovery tries again
            log.exception("%s saga %s stopped unexpectedly; recovery will carry it on", saga.kind, saga.saga_id)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_lease(self, saga_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(Exception):  # a missed renewal is retried; fencing catches a lost lease
                await self.store.renew_lease(saga_id, owner=self.owner, lease_seconds=self.lease_seconds)

    async def close(self) -> None:
        """Stop every running saga where it is: its lease lapses and recovery resumes it."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
