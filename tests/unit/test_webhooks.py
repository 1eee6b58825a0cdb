"""The webhook and file-event wire formats: signatures, the event envelope and the outbox messages carrying them."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tusingest.saga.records import NewOutboxMessage
from tusingest.saga.webhooks import (
    FILE_CREATED,
    FILE_DELETED,
    SIGNATURE_HEADER,
    UPLOAD_COMPLETED,
    file_event_message,
    sign,
    verify,
    webhook_body,
    webhook_event,
    webhook_messages,
)

SECRET = "s3cret-🔑"
BODY = b'{"id":"e1","type":"upload.completed","data":{"name":"\xd0\x81\xd0\xbb\xd0\xba\xd0\xb0.pdf"}}'
T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def test_signature_is_sha256_prefix_and_hex_hmac_sha256_of_the_body() -> None:
    expected = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()

    assert sign(BODY, SECRET) == f"sha256={expected}"
    assert SIGNATURE_HEADER == "X-ArtStore-Signature"


def test_signature_verifies_against_the_same_body_and_secret() -> None:
    assert verify(BODY, SECRET, sign(BODY, SECRET)) is True


def test_signature_of_a_tampered_body_does_not_verify() -> None:
    signature = sign(BODY, SECRET)

    assert verify(BODY.replace(b"upload.completed", b"upload.failed"), SECRET, signature) is False
    assert verify(BODY + b" ", SECRET, signature) is False


def test_signature_under_another_secret_does_not_verify() -> None:
    assert verify(BODY, "another secret", sign(BODY, SECRET)) is False


@pytest.mark.parametrize(
    "header",
    [
        hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest(),  # the bare digest, no "sha256="
        "sha1=" + hmac.new(SECRET.encode(), BODY, hashlib.sha1).hexdigest(),
        "SHA256=" + hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest(),
        "sha256=",
        "",
        "sha256=ünïcödé",
    ],
)
def test_header_without_a_sha256_signature_of_the_body_does_not_verify(header: str) -> None:
    assert verify(BODY, SECRET, header) is False


def test_missing_header_does_not_verify() -> None:
    assert verify(BODY, SECRET, None) is False


def test_webhook_event_has_a_random_uuid_hex_id_type_utc_creation_time_and_the_data() -> None:
    event = webhook_event(UPLOAD_COMPLETED, {"file_id": "f1", "size": 5 * 2**40}, now=T0)
    other = webhook_event(UPLOAD_COMPLETED, {"file_id": "f1", "size": 5 * 2**40}, now=T0)

    assert event == {
        "id": event["id"],
        "type": "upload.completed",
        "created_at": "2025-03-04T05:06:07.123456Z",
        "data": {"file_id": "f1", "size": 5 * 2**40},
    }
    assert re.fullmatch(r"[0-9a-f]{32}", event["id"])
    assert other["id"] != event["id"]


def test_webhook_event_keeps_a_given_id_and_states_a_local_time_in_utc() -> None:
    event = webhook_event("upload.failed", {}, event_id="e-42", now=T0.astimezone(timezone(timedelta(hours=2))))

    assert (event["id"], event["created_at"]) == ("e-42", "2025-03-04T05:06:07.123456Z")


def test_webhook_event_without_now_is_stamped_with_the_current_time() -> None:
    before = datetime.now(UTC)
    event = webhook_event(UPLOAD_COMPLETED, {})
    after = datetime.now(UTC)

    assert before <= datetime.fromisoformat(event["created_at"]) <= after


def test_webhook_event_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        webhook_event(UPLOAD_COMPLETED, {}, now=datetime(2025, 3, 4, 5, 6, 7))


def test_webhook_body_is_compact_utf8_json_of_the_event() -> None:
    event = webhook_event(UPLOAD_COMPLETED, {"name": "Ёлка.pdf"}, event_id="e1", now=T0)

    body = webhook_body(event)

    assert json.loads(body) == event
    assert b": " not in body and b", " not in body
    assert "Ёлка".encode() in body


def test_webhook_messages_are_one_webhook_message_per_url_carrying_the_event() -> None:
    event = webhook_event(UPLOAD_COMPLETED, {"file_id": "f1"}, now=T0)
    urls = ["https://a.example/hook", "http://b.example:8080/x?token=t", "https://a.example/hook"]

    messages = webhook_messages(event, urls)

    assert messages == [
        NewOutboxMessage("webhook", "https://a.example/hook", event),
        NewOutboxMessage("webhook", "http://b.example:8080/x?token=t", event),
    ]


def test_webhook_messages_for_no_urls_are_none() -> None:
    assert webhook_messages(webhook_event(UPLOAD_COMPLETED, {}), []) == []


def test_file_event_message_is_a_stream_message_with_event_type_fields_and_timestamp() -> None:
    fields = {"file_id": "f1", "storage_element_id": "se-01", "size": 42, "metadata": {"a": "b"}}

    message = file_event_message(FILE_CREATED, fields, "file-events", now=T0)

    assert message == NewOutboxMessage(
        "redis_stream",
        "file-events",
        {
            "event_type": "file:created",
            "file_id": "f1",
            "storage_element_id": "se-01",
            "size": 42,
            "metadata": {"a": "b"},
            "timestamp": "2025-03-04T05:06:07.123456Z",
        },
    )
    assert next(iter(message.payload)) == "event_type"


def test_file_event_message_keeps_a_timestamp_given_in_the_fields() -> None:
    fields = {"file_id": "f1", "storage_element_id": "se-01", "timestamp": "2025-01-01T00:00:00Z"}

    message = file_event_message(FILE_DELETED, fields, "events", now=T0)

    assert message.payload["timestamp"] == "2025-01-01T00:00:00Z"
    assert message.payload["event_type"] == "file:deleted"


@pytest.mark.parametrize("missing", ["file_id", "storage_element_id"])
def test_file_event_message_without_a_required_field_raises_value_error(missing: str) -> None:
    fields = {"file_id": "f1", "storage_element_id": "se-01"}
    del fields[missing]

    with pytest.raises(ValueError, match=missing):
        file_event_message(FILE_CREATED, fields, "file-events")


def test_file_event_message_refuses_an_event_type_among_the_fields() -> None:
    with pytest.raises(ValueError, match="event_type"):
        file_event_message(
            FILE_CREATED, {"file_id": "f1", "storage_element_id": "se-01", "event_type": "x"}, "file-events"
        )
