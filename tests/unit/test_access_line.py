"""The access line's direct path (no LogRecord, straight onto the configured JSON handler's stream) writes the
same JSON object an ordinary logging call renders, and steps aside for any other handler set-up."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from tusingest.observability import logs
from tusingest.observability.logs import ACCESS_LOGGER, LogSettings, access_line, configure

FIELDS: dict[str, Any] = {
    "method": "PATCH",
    "route": "/files/{upload_id}",
    "status": 204,
    "duration_ms": 1.5,
    "upload_id": "u1",
    "subject": "alice",
    "bytes_in": 5,
    "bytes_out": 0,
    "client": "127.0.0.1",
}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure(LogSettings(level="info", format="json"))
    out = io.StringIO()
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]
    try:
        yield out
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logs._ONLY_HANDLER = None


def without_time(line: str) -> dict[str, Any]:
    entry = json.loads(line)
    assert entry.pop("timestamp").endswith("Z")
    return entry


def test_the_direct_line_is_the_json_a_log_record_gives(stream: io.StringIO) -> None:
    access_line(dict(FIELDS))
    logging.getLogger(ACCESS_LOGGER).info("request", extra=dict(FIELDS))
    direct, recorded = stream.getvalue().splitlines()
    expected = FIELDS | {"event": "request", "level": "info", "logger": ACCESS_LOGGER}
    assert without_time(direct) == without_time(recorded) == expected


def test_another_handler_gets_an_ordinary_record(stream: io.StringIO) -> None:
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    extra = Capture()
    logging.getLogger().addHandler(extra)
    try:
        access_line(dict(FIELDS))
    finally:
        logging.getLogger().removeHandler(extra)
    (record,) = captured
    assert record.name == ACCESS_LOGGER and record.__dict__["subject"] == "alice"
    assert json.loads(stream.getvalue())["subject"] == "alice"  # and the configured handler still wrote it


def test_below_info_nothing_is_written(stream: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    access_line(dict(FIELDS))
    assert stream.getvalue() == ""


def test_what_orjson_refuses_is_still_one_json_line(stream: io.StringIO) -> None:
    logging.getLogger("tusingest.example").info("big", extra={"huge": 2**70, "odd": object()})
    entry = json.loads(stream.getvalue())
    assert entry["huge"] == 2**70 and entry["odd"].startswith("<object")
