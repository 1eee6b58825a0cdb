"""Structured logs of a real `tusingest serve` process with LOG_FORMAT=json: every line on stderr is one
JSON object with timestamp, level, logger and event, and the access line of a PATCH names its route
template, status, sizes, the upload and the trace of its span (the one the client's traceparent began)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.test_serve_cli import clean_env, free_port, running
from tests.fixtures.server import OCTETS, TUS

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def log_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    assert lines, "the server logged nothing"
    parsed = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    for entry in parsed:
        assert {"timestamp", "level", "logger", "event"} <= entry.keys(), entry
    return parsed


async def test_every_line_is_json_and_the_patch_access_line_has_its_upload_and_trace(tmp_path: Path) -> None:
    port, stderr_path = free_port(), tmp_path / "stderr.log"
    env = clean_env(LOG_FORMAT="json", LOG_LEVEL="debug")  # debug: the saga step lines too
    with stderr_path.open("wb") as stderr:
        async with running(tmp_path, env, port, stderr=stderr):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                created = await client.post("/files/", headers=TUS | {"Upload-Length": "5"})
                assert created.status_code == 201
                upload_id = created.headers["Location"].rsplit("/", 1)[-1]
                patched = await client.patch(
                    f"/files/{upload_id}",
                    content=b"hello",
                    headers=TUS
                    | {
                        "Upload-Offset": "0",
                        "Content-Type": OCTETS,
                        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                        "X-Forwarded-For": "203.0.113.9",  # not trusted without TRUST_PROXY_HEADERS
                    },
                )
                assert patched.status_code == 204
    # The process has ended (SIGTERM): every line it wrote is in the file.
    entries = log_lines(stderr_path)
    access = [entry for entry in entries if entry["logger"] == "tusingest.access"]
    (patch,) = [entry for entry in access if entry["method"] == "PATCH"]
    assert patch["level"] == "info" and patch["event"] == "request"
    assert patch["route"] == "/files/{upload_id}" and patch["status"] == 204
    assert patch["upload_id"] == upload_id
    assert patch["trace_id"] == CLIENT_TRACE  # the request's span continues the client's trace
    assert len(patch["span_id"]) == 16 and patch["span_id"] != CLIENT_SPAN  # the server's own span
    assert patch["bytes_in"] == 5 and patch["client"] == "127.0.0.1"
    assert isinstance(patch["duration_ms"], float | int) and patch["duration_ms"] >= 0
    (post,) = [entry for entry in access if entry["method"] == "POST"]
    assert post["upload_id"] == upload_id and post["status"] == 201 and post["route"] == "/files/"
    assert post["trace_id"] != CLIENT_TRACE
    # Lines written inside the request's saga (its steps, at debug) carry the upload and the same trace.
    steps = [entry for entry in entries if entry.get("step") and entry.get("upload_id") == upload_id]
    assert steps and all(entry["trace_id"] == CLIENT_TRACE for entry in steps)


async def test_behind_a_trusted_proxy_the_access_line_names_the_forwarded_client(tmp_path: Path) -> None:
    port, stderr_path = free_port(), tmp_path / "stderr.log"
    env = clean_env(LOG_FORMAT="json", LOG_LEVEL="info", TRUST_PROXY_HEADERS="true")
    with stderr_path.open("wb") as stderr:
        async with running(tmp_path, env, port, stderr=stderr):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                created = await client.post(
                    "/files/", headers=TUS | {"Upload-Length": "5", "X-Forwarded-For": "203.0.113.7, 10.0.0.2"}
                )
                assert created.status_code == 201
                refused = await client.patch(
                    created.headers["Location"],
                    content=b"hello",
                    headers=TUS | {"Upload-Offset": "3", "Content-Type": OCTETS},
                )
                assert refused.status_code == 409
    access = [entry for entry in log_lines(stderr_path) if entry["logger"] == "tusingest.access"]
    (post,) = [entry for entry in access if entry["method"] == "POST"]
    assert post["client"] == "203.0.113.7" and post["bytes_in"] == 0
    (patch,) = [entry for entry in access if entry["method"] == "PATCH"]
    assert patch["client"] == "127.0.0.1" and patch["status"] == 409


CONSOLE_SCRIPT = """
import logging
from tusingest.observability.logs import LogSettings, configure
configure(LogSettings(format="console"))
logging.getLogger("tusingest.example").info("hello %s", "there")
"""


def test_log_format_console_writes_readable_lines() -> None:
    result = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT], capture_output=True, timeout=30)
    line = result.stderr.decode().strip()
    assert "hello there" in line and "[info" in line and not line.startswith("{")
