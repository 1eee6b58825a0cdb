"""The Upload: everything the server remembers about one resumable upload between requests.

The committed ``offset`` is the truth about how many bytes the upload holds (invariant 1):
staging may hold more, never less, and anything past the offset is garbage.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime


class UploadState(enum.StrEnum):
    ACTIVE = "active"  # accepting bytes
    COMPLETE = "complete"  # offset == length; owed to, or taken over by, the completion hook
    TERMINATED = "terminated"  # deleted by the client (tus termination)
    EXPIRED = "expired"  # no activity for UPLOAD_SESSION_TTL_HOURS; staged bytes removed
    FAILED = "failed"  # refused or could not be stored; the reason is kept by the completion hooks
    # A body ran past the upload's known length (IETF draft -11): the resource is marked invalid and
    # refuses every later request; its staged bytes are removed at once.
    INVALID = "invalid"


class UploadKind(enum.StrEnum):
    SINGLE = "single"
    PARTIAL = "partial"  # Upload-Concat: partial
    FINAL = "final"  # Upload-Concat: final;<partials>


def new_upload_id() -> str:
    """128 random bits as 32 hex characters: unguessable, URL-safe, fixed length."""
    return secrets.token_hex(16)


# One namespace holds the ids this server makes (new_upload_id) and the ones facade clients
# choose (X-Upload-Session-ID), so one rule covers both: the 32 hex characters fit it.
UPLOAD_ID_RULE = "8-64 of A-Z a-z 0-9 _ -"
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def is_upload_id(value: str) -> bool:
    """Whether ``value`` can name an upload. Checked where an id enters (path, header, URL), so
    text no upload can have (a NUL PostgreSQL refuses, non-ASCII, kilobytes) never reaches a store."""
    return _UPLOAD_ID.fullmatch(value) is not None


def utcnow() -> datetime:
    return datetime.now(UTC)


def utc_iso(moment: datetime) -> str:
    """An aware moment as ISO 8601 in UTC with a ``Z``: the one form every document, event and API
    answer carries (attr.json, webhooks, file and session JSON)."""
    if moment.utcoffset() is None:
        raise ValueError("the moment must be timezone-aware")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    length: int | None  # None while the length is deferred
    offset: int = 0
    metadata: str = ""  # the Upload-Metadata header, normalised (canonical base64 values)
    state: UploadState = UploadState.ACTIVE
    kind: UploadKind = UploadKind.SINGLE
    parts: tuple[str, ...] = ()  # ids of the partial uploads of a final upload, in order
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    # Set by the commit that brings a single or final upload to its length, in that same statement;
    # cleared once the completion hook has durably taken the upload over. While set, completion is
    # owed: recovery on any node runs it (a crash between the two can never strand the upload).
    completion_pending: bool = False
    # Who created it (the token's subject) and their display name (the token's name). Only they or an
    # admin may touch it (invariant 7); None on uploads made before owners were recorded: admin only.
    owner_id: str | None = None
    owner_name: str | None = None

    @property
    def is_complete(self) -> bool:
        return self.length is not None and self.offset == self.length

    def is_expired(self, now: datetime) -> bool:
        return self.state is UploadState.EXPIRED or (
            self.state is UploadState.ACTIVE and self.expires_at is not None and self.expires_at <= now
        )

    def as_stored(self) -> Upload:
        """What a store keeps for this upload: one that holds all its bytes is COMPLETE, and a single
        or final one owes its completion (``completion_pending``), in the same write as its offset."""
        if self.state is UploadState.ACTIVE and self.is_complete:
            return replace(self, state=UploadState.COMPLETE, completion_pending=self.kind is not UploadKind.PARTIAL)
        return self

    def evolve(self, **changes: object) -> Upload:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A creation's ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header): the upload the
    first request with it made (its id chosen before its body was read), for whom, what that
    request looked like (``fingerprint``), and until when a repeat finds it."""

    subject: str  # the token's subject: keys of different callers never meet
    key: str
    fingerprint: str
    upload_id: str
    created_at: datetime
    expires_at: datetime
