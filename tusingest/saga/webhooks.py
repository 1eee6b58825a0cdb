"""The wire formats of what tusingest tells others: signed webhook events and the file events of the Redis stream,
and the outbox messages that carry them (``saga.outbox.OutboxRelay`` delivers those).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tusingest import __version__
from tusingest.saga.records import NewOutboxMessage
from tusingest.sessions.model import utc_iso

# Webhook requests carry these headers; receivers verify the signature over the raw request body.
SIGNATURE_HEADER = "X-ArtStore-Signature"
EVENT_HEADER = "X-ArtStore-Event"  # the event's "type"
DELIVERY_HEADER = "X-ArtStore-Delivery"  # the outbox message id: the same on every retry of one delivery
USER_AGENT = f"tusingest/{__version__}"
SIGNATURE_PREFIX = "sha256="

# Webhook event types ("type").
UPLOAD_COMPLETED = "upload.completed"
UPLOAD_FAILED = "upload.failed"

# File event types ("event_type" in the Redis stream), as the Admin Module reads them.
FILE_CREATED = "file:created"
FILE_DELETED = "file:deleted"
FILE_EVENT_REQUIRED_FIELDS = ("file_id", "storage_element_id")


def sign(body: bytes, secret: str) -> str:
    """The signature header value of ``body``: ``sha256=`` and the hex HMAC-SHA256 under ``secret``."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header_value: str | None) -> bool:
    """True when ``header_value`` is the signature of ``body`` under ``secret``; compared in constant time."""
    if header_value is None or not header_value.startswith(SIGNATURE_PREFIX):
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters, and a header may hold any.
    return hmac.compare_digest(sign(body, secret).encode(), header_value.encode("utf-8", "surrogateescape"))


def webhook_body(event: Mapping[str, Any]) -> bytes:
    """The request body of a webhook: compact UTF-8 JSON. Serialised once per delivery; the signature covers it."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def _utc_iso(now: datetime | None) -> str:
    return utc_iso(datetime.now(UTC) if now is None else now)


def webhook_event(
    event_type: str, data: Mapping[str, Any], *, event_id: str | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """The envelope every webhook receives: ``{"id", "type", "created_at", "data"}``.

    ``id`` (a random UUID in hex unless given) is the same for every URL and every retry, so receivers can
    drop duplicates by it: delivery is at least once. ``created_at`` is ISO 8601 in UTC (``...Z``).
    """
    return {
        "id": uuid.uuid4().hex if event_id is None else event_id,
        "type": event_type,
        "created_at": _utc_iso(now),
        "data": dict(data),
    }


def webhook_messages(event: Mapping[str, Any], urls: Sequence[str]) -> list[NewOutboxMessage]:
    """One outbox message per webhook URL (a URL listed twice is sent to once), each carrying ``event``."""
    return [NewOutboxMessage("webhook", url, dict(event)) for url in dict.fromkeys(urls)]


def file_event_message(
    event_type: str, fields: Mapping[str, Any], stream: str, *, now: datetime | None = None
) -> NewOutboxMessage:
    """The outbox message that appends a file event to the Redis ``stream``.

    The entry is ``{event_type, file_id, storage_element_id, ...fields, timestamp}``; ``timestamp`` (ISO 8601,
    UTC) is now unless ``fields`` has one. Raises ValueError when a required field is missing or ``fields``
    names its own ``event_type``.
    """
    missing = [name for name in FILE_EVENT_REQUIRED_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"a {event_type} event needs {', '.join(missing)}")
    if "event_type" in fields:
        raise ValueError("the event type is the event_type argument, not a field")
    payload: dict[str, Any] = {"event_type": event_type, **fields}
    payload.setdefault("timestamp", _utc_iso(now))
    return NewOutboxMessage("redis_stream", stream, payload)
