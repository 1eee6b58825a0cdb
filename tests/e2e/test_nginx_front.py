"""The nginx settings of docs/clients.md ("nginx in front"), run for real: the `location /` block is
read out of the page, put into a private nginx in front of a live server (TRUST_PROXY_HEADERS=true),
and a tus client goes through it. A PATCH cut off half way keeps what reached the server, which it
can only if nginx streams the body (with request buffering on, nothing of it would arrive); a body
above nginx's default 1 MiB limit passes; Location names the proxy. nginx missing fails the test.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.server import OCTETS, TUS, LiveServer, base_settings, live_server

CLIENTS_DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
MIB = 1 << 20


def documented_location_block() -> str:
    """The `location / { ... }` block of the nginx example in docs/clients.md."""
    fence = re.search(r"```nginx\n(.*?)```", CLIENTS_DOC.read_text(), re.DOTALL)
    assert fence is not None, "docs/clients.md has no nginx example"
    block = re.search(r"^( *)location / \{\n.*?^\1\}", fence[1], re.DOTALL | re.MULTILINE)
    assert block is not None, "the nginx example has no `location / { ... }` block"
    return block[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def proxied(tmp_path: Path, sqlite_url: str) -> AsyncIterator[tuple[LiveServer, str]]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if nginx is None:
        pytest.fail("nginx is not installed: apt-get install nginx (the docs' proxy settings are tested with it)")
    settings = base_settings(tmp_path, sqlite_url, trust_proxy_headers=True)
    async with live_server(settings) as server:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        port = free_port()
        upstream = server.url.removeprefix("http://")
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the private prefix
        temp = " ".join(
            f"{kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"""{user}
worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{}}
http {{
    access_log off;
    {temp}
    upstream tusingest {{ server {upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
{documented_location_block()}
    }}
}}
"""
        )
        process = await asyncio.create_subprocess_exec(nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"))
        try:

            async def accepts() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    return process.returncode is not None  # nginx died: stop waiting, the assert says so
                writer.close()
                return True

            await eventually(accepts, bool, timeout=15)
            assert process.returncode is None, (prefix / "error.log").read_text()
            yield server, f"http://127.0.0.1:{port}"
        finally:
            if process.returncode is None:
                process.terminate()
            await process.wait()


async def test_through_the_documented_nginx_a_cut_off_patch_keeps_its_bytes_and_location_names_the_proxy(
    proxied: tuple[LiveServer, str],
) -> None:
    server, proxy = proxied
    size = 3 * MIB
    reader, writer = await open_request(
        proxy + server.settings.tus_base_path, "POST", TUS | {"Upload-Length": str(size), "Content-Length": "0"}
    )
    status, headers = await read_response(reader)
    writer.close()
    assert status == 201
    location = headers["location"]
    assert location.startswith(proxy + server.settings.tus_base_path)
    upload_id = location.rsplit("/", 1)[1]

    # Half of the body, then the client hangs up: nginx must have passed those bytes on already.
    reader, writer = await open_request(
        location, "PATCH", TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Content-Length": str(size)}
    )
    half = os.urandom(size // 2)
    writer.write(half)
    await writer.drain()

    async def received() -> int:
        upload = await server.parts.store.get(upload_id)
        return 0 if upload is None else upload.offset

    writer.close()
    kept = await eventually(received, lambda offset: offset > 0, timeout=20)

    # The rest in one body of more than nginx's default client_max_body_size (1 MiB).
    rest = os.urandom(size - kept)
    reader, writer = await open_request(
        location, "PATCH", TUS | {"Upload-Offset": str(kept), "Content-Type": OCTETS, "Content-Length": str(len(rest))}
    )
    writer.write(rest)
    await writer.drain()
    status, headers = await read_response(reader)
    writer.close()

    assert 0 < kept <= size // 2
    assert status == 204 and headers["upload-offset"] == str(size)
    assert headers.get("artstore-upload-status") == "completed"
