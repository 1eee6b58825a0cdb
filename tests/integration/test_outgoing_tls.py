"""Outgoing TLS (ELEMENT_TLS_MIN_VERSION): webhooks and S3 elements refuse an https endpoint that
speaks only TLS 1.2 unless the setting lowers the minimum to 1.2. The parts are built by app.py's
own wiring from Settings, so the test covers the setting's path, not only the clients.

The endpoints are on loopback with a fresh self-signed certificate; the clients trust it through
SSL_CERT_FILE (webhooks) or the element's CA bundle (S3). S3 is moto behind a small TLS proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from botocore.exceptions import EndpointConnectionError

from tests.fixtures.jwt import self_signed_tls
from tests.fixtures.s3 import MOTO_CREDENTIALS, MOTO_REGION, MotoServer, create_bucket
from tests.fixtures.server import base_settings
from tusingest.app import build_parts, element_settings
from tusingest.elements.s3 import S3Access, S3ClientPool
from tusingest.saga.outbox import DeliveryReport
from tusingest.saga.webhooks import UPLOAD_COMPLETED, webhook_event, webhook_messages

# (server's highest version, ELEMENT_TLS_MIN_VERSION or None for the default, accepted)
CASES = [
    (ssl.TLSVersion.TLSv1_2, None, False),
    (ssl.TLSVersion.TLSv1_2, "1.2", True),
    (ssl.TLSVersion.TLSv1_3, None, True),
]
IDS = ["tls-1.2-server-refused-by-default", "tls-1.2-server-with-minimum-1.2", "tls-1.3-server-by-default"]


@contextlib.asynccontextmanager
async def https_receiver(tls: ssl.SSLContext) -> AsyncIterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/hook", received
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("server_max", "minimum", "accepted"), CASES, ids=IDS)
async def test_a_webhook_receiver_below_the_tls_minimum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_max: ssl.TLSVersion, minimum: str | None, accepted: bool
) -> None:
    tls, certificate = self_signed_tls(tmp_path, max_version=server_max)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # the receiver's certificate is trusted
    overrides = {"element_tls_min_version": minimum} if minimum else {}
    async with https_receiver(tls) as (url, received):
        parts = build_parts(base_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", **overrides))
        await parts.saga_store.open()
        try:
            await parts.saga_store.enqueue(webhook_messages(webhook_event(UPLOAD_COMPLETED, {}), [url]))
            await parts.relay.open()
            report = await parts.relay.deliver_due()
            later = datetime.now(UTC) + timedelta(days=1)  # past any backoff
            undelivered = await parts.saga_store.claim_due_messages(limit=10, lease_seconds=0, now=later)
        finally:
            await parts.relay.close()
            await parts.saga_store.close()
    if accepted:
        assert report == DeliveryReport(delivered=1)
        assert len(received) == 1
    else:
        assert report == DeliveryReport(failed=1)
        assert received == []
        (message,) = undelivered
        assert message.last_error is not None
        # The handshake is cut (a TLS 1.2-only server resets a 1.3-only hello): a connection failure, on the
        # very endpoint that the 1.2 case reaches, so the minimum version is the only difference.
        assert "Cannot connect to host" in message.last_error, message.last_error


@contextlib.asynccontextmanager
async def tls_proxy(tls: ssl.SSLContext, upstream_port: int) -> AsyncIterator[int]:
    """TLS in front of a plain TCP server on loopback: the port to connect to."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize(("server_max", "minimum", "accepted"), CASES, ids=IDS)
async def test_an_s3_endpoint_below_the_tls_minimum_is_refused(
    tmp_path: Path, moto_server: MotoServer, server_max: ssl.TLSVersion, minimum: str | None, accepted: bool
) -> None:
    bucket = create_bucket(moto_server.url)
    tls, certificate = self_signed_tls(tmp_path, max_version=server_max)
    overrides = {"element_tls_min_version": minimum} if minimum else {}
    settings = base_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", **overrides)
    pool = S3ClientPool.from_settings(element_settings(settings, environ={}).s3)
    async with tls_proxy(tls, int(moto_server.url.rsplit(":", 1)[1])) as port:
        access = S3Access(
            endpoint_url=f"https://127.0.0.1:{port}",
            region=MOTO_REGION,
            access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            verify=str(certificate),
        )
        try:
            client = await pool.client(access)
            if accepted:
                assert (await client.head_bucket(Bucket=bucket))["ResponseMetadata"]["HTTPStatusCode"] == 200
            else:
                with pytest.raises(EndpointConnectionError):  # the handshake is cut, as for webhooks
                    await client.head_bucket(Bucket=bucket)
        finally:
            await pool.close()
