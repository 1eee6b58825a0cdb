"""What the saga store keeps: the saga log entry, the registered file and the outbox message.

Plain values: the stores build them from rows and take them apart again, nothing here talks to a database.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

SagaKind = Literal["upload", "delete", "transfer"]
OutboxKind = Literal["redis_stream", "webhook"]


class SagaState(enum.StrEnum):
    RUNNING = "running"  # moving forward, step by step
    COMPENSATING = "compensating"  # a step failed; undoing the completed ones, newest first
    COMPLETED = "completed"
    COMPENSATED = "compensated"  # failed and fully undone: nothing of it is left behind
    FAILED = "failed"  # compensation itself could not finish: an operator has to look

    @property
    def is_finished(self) -> bool:
        return self not in UNFINISHED_STATES


# A saga in one of these states has an owner working on it (or waiting for recovery to take it over).
UNFINISHED_STATES = frozenset({SagaState.RUNNING, SagaState.COMPENSATING})


def new_saga_id() -> str:
    """128 random bits as 32 hex characters, like upload ids."""
    return secrets.token_hex(16)


class SagaData(BaseModel):
    """A saga's working memory, typed: each saga kind subclasses it with its fields.

    The one place that turns it into the saga log's JSON and back. Rows written by an earlier version keep
    reading: keys this version does not know are ignored, keys it misses take their defaults.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    # The W3C traceparent of the request that began the saga: a run by recovery (another node, after a
    # crash) links its trace to that one, so one upload can be followed from its last PATCH to its file.
    traceparent: str | None = None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        return cls.model_validate(dict(data))

    def to_data(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


@dataclass(frozen=True, slots=True)
class Saga:
    saga_id: str
    kind: SagaKind
    subject_id: str  # the upload id (upload saga) or the file id (delete, transfer)
    state: SagaState
    step: str | None  # the last step completed; None before the first
    data: dict[str, Any]  # the saga's working memory (element id, object key, hashes...), JSON-serialisable
    attempts: int
    error_code: str | None
    error: str | None
    owner: str | None  # the node running it; writes from any other node are refused (fencing)
    lease_expires_at: datetime | None  # after this, another node may take the saga over; None once finished
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One row of the files registry: a file that is on a Storage Element, verified, with its attr.json."""

    file_id: str
    upload_id: str | None  # the tus upload it came from; None for files that did not arrive over tus
    original_filename: str
    storage_filename: str
    storage_element_id: str
    storage_key: str  # the object key on the element
    size_bytes: int  # original size
    stored_size_bytes: int  # after compression
    content_type: str
    content_encoding: str | None  # "br", "gzip"; None when stored as received
    md5: str
    sha256: str
    created_by_id: str | None
    created_by_username: str
    retention_policy: str | None
    description: str | None
    metadata: dict[str, str]
    uploaded_at: datetime


@dataclass(frozen=True, slots=True)
class NewOutboxMessage:
    """A message to send once the transaction that writes it has committed."""

    kind: OutboxKind
    destination: str  # the Redis stream name or the webhook URL
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    message_id: int
    kind: OutboxKind
    destination: str
    payload: dict[str, Any]
    attempts: int  # failed deliveries so far
    next_attempt_at: datetime  # due then; a claim pushes it forward so a crashed sender's claim comes back
    created_at: datetime
    delivered_at: datetime | None
    last_error: str | None
