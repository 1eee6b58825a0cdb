"""The `tusingest` command as operators run it: a real process, real signals, real config."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest
from tusclient.client import TusClient
from tusclient.uploader import Uploader

from tests.fixtures import granian
from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import ASGI_SERVER, OCTETS, TUS

TUSINGEST = [sys.executable, "-m", "tusingest"]
# TUSINGEST_TEST_ASGI=granian: every `tusingest serve` of the tests runs on Granian (tests/fixtures/granian.py).
SERVE = [*granian.COMMAND, "serve"] if ASGI_SERVER == "granian" else [*TUSINGEST, "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**values: str) -> dict[str, str]:
    """The environment without any tusingest setting, plus ``values``."""
    prefixes = ("DATABASE_", "STAGING_", "TUS_", "UPLOAD_", "REDIS_", "SERVICE_DISCOVERY_", "STORAGE_", "ELEMENT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return env | values


@asynccontextmanager
async def running(
    cwd: Path, env: dict[str, str], port: int, stderr: int | IO[bytes] = subprocess.PIPE
) -> AsyncIterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([*SERVE, "--port", str(port)], cwd=cwd, env=env, stderr=stderr)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def ready() -> int:
                if process.poll() is not None:
                    raise AssertionError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
                try:
                    return (await client.get("/health/ready")).status_code
                except httpx.TransportError:
                    return 0

            await eventually(ready, lambda status: status == 200, timeout=20)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=20)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def test_serve_with_no_configuration_takes_a_tus_upload_into_data(workdir: Path) -> None:
    port = free_port()
    payload = os.urandom(300_000)
    async with running(workdir, clean_env(), port):

        def upload() -> str:
            uploader = Uploader(
                file_stream=__import__("io").BytesIO(payload),
                client=TusClient(f"http://127.0.0.1:{port}/files/"),
                chunk_size=100_000,
            )
            uploader.upload()
            return str(uploader.url)

        url = await asyncio.to_thread(upload)
    upload_id = url.rsplit("/", 1)[1]
    # The upload became a file in the default directory element, with its attr.json and a registry row.
    element = workdir / "data" / "elements" / "local"
    stored = sorted(p for p in element.rglob("*") if p.is_file())
    assert [p.name.endswith(".attr.json") for p in stored] == [False, True]
    assert stored[0].read_bytes() == payload
    attr = json.loads(stored[1].read_bytes())
    assert attr["sha256"] == hashlib.sha256(payload).hexdigest() and attr["file_size"] == len(payload)
    with sqlite3.connect(workdir / "data" / "tusingest.db") as db:
        rows = db.execute("SELECT file_id, storage_key, sha256 FROM files WHERE upload_id = ?", (upload_id,)).fetchall()
    assert rows == [(attr["file_id"], attr["storage_path"], attr["sha256"])]
    assert not (workdir / "data" / "staging" / upload_id).exists()  # staged bytes are freed once placed


async def test_sigterm_lets_an_in_flight_patch_commit_what_it_received(workdir: Path) -> None:
    port = free_port()
    env = clean_env(STAGING_WRITE_BUFFER_KB="64")
    payload = os.urandom(1 << 20)
    sent = 256 << 10
    async with running(workdir, env, port) as process:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            created = await client.post("/files/", headers=TUS | {"Upload-Length": str(len(payload))})
        url = created.headers["Location"]
        upload_dir = workdir / "data" / "staging" / url.rsplit("/", 1)[1]
        headers = TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Content-Length": str(len(payload))}
        reader, writer = await open_request(url, "PATCH", headers)
        writer.write(payload[:sent])
        await writer.drain()

        async def staged_bytes() -> int:
            return sum(p.stat().st_size for p in upload_dir.glob("*.chunk")) if upload_dir.exists() else 0

        await eventually(staged_bytes, lambda size: size > sent - (64 << 10))
        process.send_signal(signal.SIGTERM)
        status, response_headers = await asyncio.wait_for(read_response(reader), 20)
        writer.close()
        exit_code = await asyncio.to_thread(process.wait, 20)
    committed = int(response_headers["upload-offset"])
    assert status == 204 and exit_code == 0
    assert sent - (64 << 10) < committed <= sent

    async with running(workdir, env, port):
        async with httpx.AsyncClient() as client:
            after = await client.head(url, headers=TUS)
            rest = await client.patch(
                url,
                headers=TUS | {"Upload-Offset": str(committed), "Content-Type": OCTETS},
                content=payload[committed:],
            )
    assert after.headers["Upload-Offset"] == str(committed)
    assert rest.status_code == 204 and rest.headers["ArtStore-Upload-Status"] == "completed"
    (stored,) = [p for p in (workdir / "data" / "elements").rglob("*") if p.is_file() and p.suffix != ".json"]
    assert stored.read_bytes() == payload


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("MAX_FILE_SIZE_MB", "lots", "MAX_FILE_SIZE_MB='lots'"),
        ("PORT", "99999", "PORT"),
        ("TUS_EXTENSIONS", "creation,teleport", "unknown tus extension(s) teleport"),
        ("DATABASE_URL", "mysql://db/x", "must start with sqlite:/// or postgresql://"),
    ],
)
def test_serve_refuses_a_bad_setting_with_a_message_naming_it(
    workdir: Path, variable: str, value: str, words: str
) -> None:
    result = subprocess.run([*SERVE], cwd=workdir, env=clean_env(**{variable: value}), capture_output=True, timeout=30)
    assert result.returncode == 2
    assert words in result.stderr.decode()


def test_serve_on_a_port_in_use_exits_2_with_one_line_and_never_says_it_listens(workdir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*SERVE, "--port", str(port)], cwd=workdir, env=clean_env(), capture_output=True, timeout=30
        )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [f"tusingest cannot listen on 127.0.0.1:{port}: the address is already in use"]
    assert not (workdir / "data").exists()  # refused before anything was created


def test_serve_refuses_an_unmigrated_database_and_says_to_migrate(workdir: Path, empty_postgres_url: str) -> None:
    result = subprocess.run(
        [*SERVE, "--port", str(free_port())],
        cwd=workdir,
        env=clean_env(DATABASE_URL=empty_postgres_url),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "tusingest migrate" in result.stderr.decode()


async def test_migrate_then_serve_on_postgresql(workdir: Path, empty_postgres_url: str) -> None:
    env = clean_env(DATABASE_URL=empty_postgres_url)
    migrated = subprocess.run([*TUSINGEST, "migrate"], cwd=workdir, env=env, capture_output=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr.decode()
    port = free_port()
    async with running(workdir, env, port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            created = await client.post(
                "/files/", headers=TUS | {"Upload-Length": "3", "Content-Type": OCTETS}, content=b"abc"
            )
    assert created.status_code == 201 and created.headers["Upload-Offset"] == "3"


async def test_cleanup_command_expires_idle_uploads_and_removes_their_bytes(workdir: Path) -> None:
    port = free_port()
    env = clean_env(UPLOAD_SESSION_TTL_HOURS="0.0001")  # 0.36 s
    async with running(workdir, env, port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            created = await client.post(
                "/files/", headers=TUS | {"Upload-Length": "10", "Content-Type": OCTETS}, content=b"abc"
            )
    upload_dir = workdir / "data" / "staging" / created.headers["Location"].rsplit("/", 1)[1]
    assert upload_dir.exists()

    async def cleanup_output() -> str:
        result = await asyncio.to_thread(
            subprocess.run, [*TUSINGEST, "cleanup"], cwd=workdir, env=env, capture_output=True, timeout=30
        )
        return result.stdout.decode()

    output = await eventually(cleanup_output, lambda out: "expired 1 upload(s)" in out)
    assert "expired 1 upload(s)" in output
    assert not upload_dir.exists()


def serve_on_all_addresses(workdir: Path, port: int, env: dict[str, str], *flags: str) -> list[str]:
    """`serve --host 0.0.0.0`, which must exit 2 here; returns its stderr lines."""
    result = subprocess.run(
        [*SERVE, "--host", "0.0.0.0", "--port", str(port), *flags],
        cwd=workdir,
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr.decode()
    return result.stderr.decode().strip().splitlines()


def test_serve_beyond_loopback_without_a_key_exits_2_with_one_line(workdir: Path) -> None:
    lines = serve_on_all_addresses(workdir, free_port(), clean_env())
    assert lines == [
        "tusingest: refusing to serve on 0.0.0.0 without authentication: set JWT_PUBLIC_KEY_PATH or "
        "JWT_JWKS_URL, bind to 127.0.0.1, or pass --insecure-no-auth"
    ]
    assert not (workdir / "data").exists()  # refused before anything was created


@pytest.mark.parametrize("how", ["insecure-no-auth", "key-file"])
def test_serve_beyond_loopback_with_a_key_or_insecure_no_auth_gets_past_the_refusal(workdir: Path, how: str) -> None:
    from tests.fixtures.jwt import rsa_key, write_pem

    flags, env = ("--insecure-no-auth",), clean_env()
    if how == "key-file":
        flags, env = (), clean_env(JWT_PUBLIC_KEY_PATH=str(write_pem(workdir / "jwt.pem", rsa_key())))
    # The port is taken (bound, never listening, so nothing is reachable from the network): serve gets as
    # far as binding, which proves the refusal let it through, and stops there.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        lines = serve_on_all_addresses(workdir, port, env, *flags)
    assert lines == [f"tusingest cannot listen on 0.0.0.0:{port}: the address is already in use"]
