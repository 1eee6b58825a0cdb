"""The SagaStore protocol: the saga log, the files registry and the outbox, written together in one database.

Implementations: ``sqlite.SQLiteSagaStore`` (embedded default) and ``postgres.PostgresSagaStore`` (several
nodes); ``tests/contract/test_saga_store.py`` holds both to the same behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from tusingest.saga.records import FileRecord, NewOutboxMessage, OutboxMessage, Saga, SagaKind, SagaState
from tusingest.sessions.audit import AuditEvent, Auditor

# Times: every method that stamps or compares a time takes ``now`` (default: this node's clock, UTC), so
# callers and tests decide what "now" is and leases expire without anyone sleeping. Opening raises
# tusingest.sessions.store.StoreError (unreachable, not migrated), like the other stores.


class SagaStoreError(Exception):
    """A saga store call was refused; the subclass says why."""


class SagaNotFound(SagaStoreError):
    def __init__(self, saga_id: str) -> None:
        super().__init__(f"saga {saga_id} not found")
        self.saga_id = saga_id


class SagaOwnershipLost(SagaStoreError):
    """Another node took the saga over (its lease had expired): this node must stop working on it."""

    def __init__(self, saga_id: str, owner: str, current_owner: str | None) -> None:
        super().__init__(f"saga {saga_id} is no longer owned by {owner} (owner now: {current_owner or 'nobody'})")
        self.saga_id = saga_id
        self.owner = owner
        self.current_owner = current_owner


class DuplicateSaga(SagaStoreError):
    """A saga of this kind is already running or compensating for this subject."""

    def __init__(self, kind: str, subject_id: str) -> None:
        super().__init__(f"an unfinished {kind} saga for {subject_id} exists already")
        self.kind = kind
        self.subject_id = subject_id


class DuplicateFile(SagaStoreError):
    """The file id is registered already, for another upload."""

    def __init__(self, file_id: str) -> None:
        super().__init__(f"file {file_id} is registered already for another upload")
        self.file_id = file_id


class SagaStore(Protocol):
    auditor: Auditor  # publishes each committed audit event (app.py sets the one it built)

    async def open(self) -> None:
        """Connect (and on PostgreSQL check the schema revision); raise StoreError with an operator-facing message."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the store answers (readiness probe)."""

    # --- the saga log ----------------------------------------------------------------------------

    async def create_saga(
        self,
        kind: SagaKind,
        subject_id: str,
        data: Mapping[str, Any],
        *,
        owner: str,
        lease_seconds: float,
        now: datetime | None = None,
        first: bool = False,
    ) -> Saga:
        """Start a RUNNING saga owned by ``owner`` until now + lease_seconds.

        Raises DuplicateSaga while another saga of ``kind`` for ``subject_id`` is running or compensating;
        with ``first``, also when one is on record in any state (finished too): the check and the insert are
        one statement, so a saga begun at most once per subject costs one round trip, not a read and a write.
        """

    async def get_saga(self, saga_id: str) -> Saga | None: ...

    async def latest_saga(self, kind: SagaKind, subject_id: str) -> Saga | None:
        """The most recently created saga of ``kind`` for ``subject_id``, in any state."""

    async def advance(
        self,
        saga_id: str,
        *,
        owner: str,
        step: str,
        data_update: Mapping[str, Any],
        lease_seconds: float,
        now: datetime | None = None,
    ) -> Saga:
        """Record that ``step`` is done: merge ``data_update`` into data (top-level keys replaced) and renew the lease.

        Fenced: raises SagaOwnershipLost when ``owner`` no longer owns the saga, SagaNotFound when it is gone.
        """

    async def set_state(
        self,
        saga_id: str,
        *,
        owner: str,
        state: SagaState,
        error_code: str | None = None,
        error: str | None = None,
        now: datetime | None = None,
        audit: AuditEvent | None = None,
        durable: bool = True,
    ) -> Saga:
        """Move the saga to ``state`` with the given error (None clears it); a finished state drops the lease.

        With ``audit`` (a delete or transfer saga done), its row is written in the same transaction.
        ``durable=False`` (for a change recovery can make again, such as completing a registered upload):
        committed without waiting for it to reach the disk, so a crash may lose it but never reorders it
        after a later durable commit (PostgreSQL: synchronous_commit off for that transaction).

        Fenced like ``advance``. Raises DuplicateSaga when moving back to an unfinished state would make
        a second unfinished saga for the subject.
        """

    async def bump_attempts(self, saga_id: str, *, owner: str, now: datetime | None = None) -> Saga:
        """Count one more attempt at the current step. Fenced like ``advance``."""

    async def renew_lease(self, saga_id: str, *, owner: str, lease_seconds: float, now: datetime | None = None) -> bool:
        """Extend the lease to now + lease_seconds; False when ``owner`` does not own the unfinished saga."""

    async def claim_stale(
        self,
        owner: str,
        *,
        lease_seconds: float,
        limit: int,
        kinds: Sequence[SagaKind] | None = None,
        now: datetime | None = None,
    ) -> list[Saga]:
        """Take over up to ``limit`` unfinished sagas whose lease has expired (at or before now) or that have
        no owner: each becomes ``owner``'s until now + lease_seconds. Across nodes, a saga goes to one claimer.
        With ``kinds``, only sagas of those kinds are taken, so each saga runner claims only what it can run.
        """

    async def enqueue(self, messages: Sequence[NewOutboxMessage], *, now: datetime | None = None) -> None:
        """Add outbox messages outside a registration (e.g. the upload.failed webhook). Callers
        enqueue before they record the outcome, so a crash in between repeats, never loses, them."""

    # --- the files registry ----------------------------------------------------------------------

    async def register_file(
        self,
        saga_id: str,
        *,
        owner: str,
        record: FileRecord,
        messages: Sequence[NewOutboxMessage],
        step: str,
        data_update: Mapping[str, Any],
        lease_seconds: float,
        now: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> Saga:
        """In one transaction: add ``record`` to the registry, queue ``messages`` in the outbox, write the
        ``audit`` row (upload completed) and ``advance``. The audit row goes with the registry row: written once.

        Idempotent: when the saga's step is ``step`` already nothing is written; when ``record.file_id`` is
        registered for the same upload already, neither the row nor the messages are written again (the
        saga still advances). Raises DuplicateFile when the id is registered for another upload. Fenced.
        """

    async def get_file(self, file_id: str) -> FileRecord | None: ...

    async def file_for_upload(self, upload_id: str) -> FileRecord | None:
        """The file registered for a tus upload (the latest, should there be several)."""

    async def delete_file(self, file_id: str) -> bool:
        """Remove the row; False when there was none."""

    async def update_file_location(
        self, file_id: str, *, storage_element_id: str, storage_key: str
    ) -> FileRecord | None:
        """Point the file at its new element and key (a transfer); None when the file is not registered."""

    # --- the outbox --------------------------------------------------------------------------------

    async def claim_due_messages(
        self, *, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> list[OutboxMessage]:
        """Claim up to ``limit`` undelivered messages due at ``now`` (the longest due first) by moving their
        next_attempt_at to now + lease_seconds: a sender that dies gives them back when that passes.
        Across nodes, a message goes to one claimer. Returned in message id (insertion) order.
        """

    async def mark_delivered(self, message_id: int, *, now: datetime | None = None) -> bool:
        """Record the delivery; False when the message is unknown or was delivered already."""

    async def purge_delivered(self, *, delivered_before: datetime) -> int:
        """Delete messages delivered before that time; how many went. Undelivered ones always stay."""

    async def reschedule(self, message_id: int, *, next_attempt_at: datetime, error: str) -> bool:
        """A delivery failed: count the attempt, keep the error, try again at ``next_attempt_at``.

        False when the message is unknown or was delivered already.
        """

    # --- for tests and operators -------------------------------------------------------------------

    async def list_sagas(self, states: Sequence[SagaState] | None = None) -> list[Saga]:
        """Sagas in ``states`` (all when None), oldest first."""

    async def count_files(self) -> int: ...

    async def count_undelivered(self) -> int:
        """Outbox messages not delivered yet (the backlog)."""
