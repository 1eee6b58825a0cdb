"""The SessionStore protocol: durable upload state shared by every node.

Implementations: ``sqlite.SQLiteSessionStore`` (embedded default, one process) and
``postgres.PostgresSessionStore`` (several nodes). ``tests/contract/test_session_store.py``
holds both to the same behaviour.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from tusingest.sessions.audit import AuditEvent, Auditor
from tusingest.sessions.model import IdempotencyKey, Upload, UploadState
from tusingest.sessions.progress import ProgressBus


class StoreError(Exception):
    """The store cannot be used (unreachable, not migrated, corrupt)."""


class DatabaseNotMigrated(StoreError):
    pass


class SessionStore(Protocol):
    auditor: Auditor  # publishes each committed audit event (app.py sets the one it built)
    progress: ProgressBus  # hears each committed offset and each ending state (app.py sets the one it built)

    async def open(self) -> None:
        """Connect and check the schema; raise StoreError with an operator-facing message."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the store answers (readiness probe)."""

    async def create(self, upload: Upload, audit: AuditEvent | None = None) -> None:
        """Insert a new upload; its id is unique (collisions raise StoreError).

        With ``audit``, its row is written in the same transaction (and published once committed)."""

    async def get(self, upload_id: str) -> Upload | None: ...

    async def get_many(self, upload_ids: list[str]) -> dict[str, Upload]: ...

    async def commit_offset(
        self, upload_id: str, expected: int, offset: int, updated_at: datetime, expires_at: datetime | None
    ) -> Upload | None:
        """The commit point: move an ACTIVE upload's offset from ``expected`` to ``offset``.

        One round trip. Returns the updated upload, or None when the upload is not ACTIVE at
        ``expected`` any more (another writer or a termination won; nothing is changed).
        The committed offset goes to ``progress`` (on PostgreSQL as a NOTIFY in the same statement).

        When ``offset`` reaches the upload's length, the same statement makes it COMPLETE and, for a
        single or final upload, sets ``completion_pending``: the durable record that its completion
        is owed, so no crash can leave a complete upload that nobody finalises.
        """

    async def claim_idempotency_key(self, claim: IdempotencyKey) -> IdempotencyKey:
        """Record ``claim`` unless its (subject, key) is held by an unexpired claim; returns the holder
        (``claim`` itself when it won). One statement, so of two racing claims on any nodes one wins."""

    async def release_idempotency_key(self, subject: str, key: str, upload_id: str) -> None:
        """Forget the claim of (subject, key) if it still names ``upload_id`` (its creation failed,
        or its upload is gone), so the next request with the key creates anew."""

    async def forget_expired_idempotency_keys(self, now: datetime) -> int:
        """Delete the claims expired by ``now``; returns how many."""

    async def set_length(self, upload_id: str, length: int) -> Upload | None:
        """Fix a deferred length once. None if the upload is gone or its length is already set.

        A length equal to the offset completes the upload in the same statement, as in ``commit_offset``."""

    async def set_state(
        self,
        upload_id: str,
        state: UploadState,
        *,
        only_from: UploadState | None = None,
        audit: AuditEvent | None = None,
    ) -> Upload | None:
        """Move to ``state`` (optionally only from ``only_from``); None if nothing changed.

        With ``audit``, its row is written in the same transaction, and only when the state changed.
        A change to terminated or expired goes to ``progress``."""

    async def record_audit(self, event: AuditEvent) -> None:
        """Write an audit row that records no change (a refused authorization), then publish it."""

    async def list_audit(
        self,
        since: datetime,
        until: datetime | None = None,
        limit: int = 1000,
        *,
        subject: str | None = None,
        upload_id: str | None = None,
    ) -> list[AuditEvent]:
        """Audit events at or after ``since`` (and before ``until``), oldest first."""

    async def list_expired(self, now: datetime, limit: int = 500) -> list[Upload]:
        """ACTIVE uploads whose expires_at has passed."""

    async def list_final_uploads_with_part(self, partial_id: str) -> list[Upload]:
        """Final (concatenated) uploads that refer to ``partial_id``."""

    async def list_expired_partials(self, now: datetime, limit: int = 500) -> list[Upload]:
        """COMPLETE partial uploads whose expires_at has passed (candidates for freeing; see expiry)."""

    async def completion_taken_over(self, upload_id: str) -> None:
        """The completion hook has durably taken the upload over: clear ``completion_pending``."""

    async def list_completion_pending(self, before: datetime, limit: int = 100) -> list[Upload]:
        """Uploads whose completion is owed, last touched at or before ``before``, oldest first."""
