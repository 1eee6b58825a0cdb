"""`tusingest upload` as a user runs it: a real process against a real server over TCP, killed and rerun,
refused, authenticated, and behind a connection that drops. Store-independent: runs on SQLite only."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.jwt import rsa_key, token
from tests.fixtures.rawhttp import eventually
from tests.fixtures.relay import CountingProxy
from tests.fixtures.server import LiveServer, base_settings, live_server
from tusingest.sessions import UploadKind

TUSINGEST = [sys.executable, "-m", "tusingest", "upload"]
CHUNK = 128 << 10
# Generous room for a request's line and headers, when bytes on the wire are compared with bytes of files.
HEADER_ROOM = 2048


def write_files(folder: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Random files under ``folder``; their SHA-256 by absolute path."""
    digests = {}
    for name, size in sizes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = os.urandom(size)
        path.write_bytes(payload)
        digests[str(path)] = hashlib.sha256(payload).hexdigest()
    return digests


def env(**values: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k != "TUSINGEST_TOKEN"}
    return clean | values


async def run_upload(*args: str, environment: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *TUSINGEST, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment or env()
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def events(stdout: str, kind: str) -> list[dict[str, object]]:
    parsed = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return [event for event in parsed if event["event"] == kind]


async def registered_sha256(server: LiveServer, url: str) -> str | None:
    record = await server.parts.saga_store.file_for_upload(url.rsplit("/", 1)[1])
    return None if record is None else record.sha256


def port_of(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def test_upload_of_a_folder_registers_every_file_with_its_sha256(
    sqlite_server: LiveServer, tmp_path: Path
) -> None:
    digests = write_files(
        tmp_path / "scans", {"a.bin": 1 << 20, "b.bin": (3 << 20) + 7, "deep/c.bin": 555_555, "deep/d.bin": 1}
    )
    (tmp_path / "scans" / "skip.log").write_text("not this one")
    state = tmp_path / "state.json"

    code, stdout, _ = await run_upload(
        str(tmp_path / "scans"), "--endpoint", sqlite_server.files_url, "--chunk-size", "256KiB",
        "--jobs", "3", "--exclude", "*.log", "--metadata", "project=bridge", "--state-file", str(state), "--json",
    )  # fmt: skip

    assert code == 0, stdout
    completed = {event["path"]: event for event in events(stdout, "completed")}
    assert set(completed) == set(digests)
    for path, digest in digests.items():
        event = completed[path]
        assert event["sha256"] == digest and event["status"] == "completed" and event["file_id"]
        assert await registered_sha256(sqlite_server, str(event["url"])) == digest
    assert json.loads(state.read_text()) == {}  # nothing left to resume


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
async def test_a_stopped_upload_resumes_on_rerun_and_sends_at_most_one_chunk_twice(
    sqlite_server: LiveServer, tmp_path: Path, stop: signal.Signals
) -> None:
    digests = write_files(tmp_path / "big", {f"{n}.bin": 3 << 20 for n in range(3)})
    state = tmp_path / "state.json"
    async with CountingProxy(port_of(sqlite_server)).running(sqlite_server.settings.tus_base_path) as proxy:
        args = [str(tmp_path / "big"), "--endpoint", proxy.url, "--chunk-size", str(CHUNK), "--jobs", "3"]
        args += ["--state-file", str(state), "--json"]
        first = await asyncio.create_subprocess_exec(*TUSINGEST, *args, stdout=asyncio.subprocess.PIPE, env=env())
        assert first.stdout is not None
        progressed: set[str] = set()
        while len(progressed) < len(digests):  # every file has some bytes on the server
            line = await asyncio.wait_for(first.stdout.readline(), timeout=60)
            assert line, "the command ended before every file made progress"
            event = json.loads(line)
            assert event["event"] != "completed", "finished before it could be killed"
            if event["event"] == "progress":
                progressed.add(str(event["path"]))
        first.send_signal(stop)
        assert await asyncio.wait_for(first.wait(), timeout=30) == (130 if stop is signal.SIGINT else -signal.SIGKILL)

        code, stdout, _ = await run_upload(*args)

    assert code == 0, stdout
    completed = {event["path"]: event for event in events(stdout, "completed")}
    assert {path: event["sha256"] for path, event in completed.items()} == digests
    for event in completed.values():
        assert int(str(event["resumed_from"])) > 0
        assert await registered_sha256(sqlite_server, str(event["url"])) == event["sha256"]
    total = sum(3 << 20 for _ in digests)
    requests = total // CHUNK + 4 * len(digests)  # PATCHes, plus OPTIONS, POST and HEADs
    assert proxy.sent <= total + len(digests) * CHUNK + requests * HEADER_ROOM


async def test_upload_completes_through_a_connection_that_drops_every_megabyte(
    sqlite_server: LiveServer, tmp_path: Path
) -> None:
    digests = write_files(tmp_path / "files", {"flaky.bin": 5 << 20})
    async with CountingProxy(port_of(sqlite_server), drop_every=1 << 20).running(
        sqlite_server.settings.tus_base_path
    ) as proxy:
        code, stdout, _ = await run_upload(
            str(tmp_path / "files"), "--endpoint", proxy.url, "--chunk-size", "2MiB",
            "--state-file", str(tmp_path / "state.json"), "--json",
        )  # fmt: skip

    assert code == 0, stdout
    assert proxy.drops >= 3
    (event,) = events(stdout, "completed")
    assert event["sha256"] == next(iter(digests.values()))


async def test_a_refused_file_fails_with_its_reason_and_a_nonzero_exit(tmp_path: Path, sqlite_url: str) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    (folder / "photo.png").write_bytes(png + os.urandom(4096))
    (folder / "notes.txt").write_text("plain text, not an image\n" * 100)
    settings = base_settings(tmp_path, sqlite_url, allowed_mime_types="image/*")
    async with live_server(settings) as server:
        code, stdout, _ = await run_upload(
            str(folder), "--endpoint", server.files_url, "--state-file", str(tmp_path / "state.json")
        )

    assert code == 1
    lines = {line.split()[1].rstrip(":"): line for line in stdout.splitlines()}
    assert lines[str(folder / "photo.png")].startswith("ok ")
    refused = lines[str(folder / "notes.txt")]
    assert refused.startswith("FAILED ") and "415" in refused and refused.endswith("[mime_type_not_allowed]")


async def test_token_is_sent_as_bearer_and_without_one_the_upload_fails_clearly(
    keyed_server: LiveServer, tmp_path: Path
) -> None:
    write_files(tmp_path / "one", {"x.bin": 300_000})
    args = [str(tmp_path / "one"), "--endpoint", keyed_server.files_url, "--state-file", str(tmp_path / "s.json")]

    code, stdout, _ = await run_upload(*args, environment=env(TUSINGEST_TOKEN=token(rsa_key())))
    refused_code, refused_out, _ = await run_upload(*args)

    assert code == 0, stdout
    assert stdout.startswith("ok ")
    assert refused_code == 1
    assert refused_out.startswith("FAILED ") and "401" in refused_out


async def test_parallel_parts_are_joined_by_concatenation_and_resume_after_sigkill(
    sqlite_server: LiveServer, tmp_path: Path
) -> None:
    digests = write_files(tmp_path / "p", {"parts.bin": (4 << 20) + 3})
    args = [str(tmp_path / "p"), "--endpoint", sqlite_server.files_url, "--chunk-size", str(CHUNK)]
    args += ["--parallel", "3", "--state-file", str(tmp_path / "state.json"), "--json"]
    first = await asyncio.create_subprocess_exec(*TUSINGEST, *args, stdout=asyncio.subprocess.PIPE, env=env())
    assert first.stdout is not None
    while json.loads(await asyncio.wait_for(first.stdout.readline(), timeout=60))["event"] != "progress":
        pass
    first.kill()
    await first.wait()

    code, stdout, _ = await run_upload(*args)

    assert code == 0, stdout
    (event,) = events(stdout, "completed")
    assert event["sha256"] == next(iter(digests.values())) and event["file_id"]
    assert int(str(event["resumed_from"])) > 0
    final = await sqlite_server.parts.store.get(str(event["url"]).rsplit("/", 1)[1])
    assert final is not None and final.kind is UploadKind.FINAL
    assert await registered_sha256(sqlite_server, str(event["url"])) == event["sha256"]


NODE_REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "node_reference"


@pytest.fixture
async def tus_node_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """@tus/server with @tus/file-store (``benchmarks/node_reference``, ``npm ci`` there; .ci/run does):
    its files URL and its directory, where each upload's bytes are ``<id>``."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed: the @tus/server test needs Node >= 20")
    if not (NODE_REFERENCE / "node_modules" / "@tus" / "server").is_dir():
        pytest.fail(f"@tus/server is not installed: run `npm ci` in {NODE_REFERENCE}")
    directory = tmp_path / "tusnode"
    directory.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = await asyncio.create_subprocess_exec(
        "node", str(NODE_REFERENCE / "server.mjs"), "--host", "127.0.0.1", "--port", str(port),
        env=env(STAGING_DIR=str(directory)), stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(base + "/health/ready")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(ready, bool, timeout=30)
        yield base + "/files/", directory
    finally:
        node.kill()
        await node.wait()


async def test_upload_to_tus_node_server_completes_and_resumes_after_sigkill(
    tus_node_server: tuple[str, Path], tmp_path: Path
) -> None:
    endpoint, directory = tus_node_server
    digests = write_files(tmp_path / "n", {"one.bin": 3 << 20, "two.bin": 200_001})
    state = tmp_path / "state.json"
    args = [str(tmp_path / "n"), "--endpoint", endpoint, "--chunk-size", str(CHUNK), "--state-file", str(state)]
    first = await asyncio.create_subprocess_exec(
        *TUSINGEST, *args, "--jobs", "1", "--json", stdout=asyncio.subprocess.PIPE, env=env()
    )
    assert first.stdout is not None
    while True:  # the first file has some bytes on the server
        event = json.loads(await asyncio.wait_for(first.stdout.readline(), timeout=60))
        if event["event"] == "progress":
            break
    first.kill()
    await first.wait()

    code, stdout, _ = await run_upload(*args, "--json")

    assert code == 0, stdout
    completed = {event["path"]: event for event in events(stdout, "completed")}
    assert {path: event["sha256"] for path, event in completed.items()} == digests
    assert int(str(completed[str(tmp_path / "n" / "one.bin")]["resumed_from"])) > 0
    for path, event in completed.items():
        assert event["status"] == "completed" and event["file_id"] is None  # no ArtStore answer from @tus/server
        stored = directory / str(event["url"]).rsplit("/", 1)[1]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digests[path]
