"""Tokens and secrets never reach the logs: a live server holding a JWT secret, a webhook secret, a
webhook URL with credentials and a token in it, and an S3 element's secret key, is sent tokens and
made to fail (a bad token, a webhook nobody answers, an S3 element whose bucket does not exist);
nothing it logs holds any of them."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from tests.fixtures.rawhttp import eventually
from tests.fixtures.redis import free_port
from tests.fixtures.s3 import MotoServer
from tests.fixtures.server import OCTETS, TUS, base_settings, live_server
from tusingest.observability.logs import formatter

JWT_SECRET = "jwt-secret-0123456789abcdef0123456789abcdef"
WEBHOOK_SECRET = "webhook-secret-5f1e2d3c4b5a69788796a5b4c3d2e1f0"
URL_PASSWORD = "url-password-8c7b6a5948372615"
URL_TOKEN = "url-token-1a2b3c4d5e6f7a8b9c0d"
S3_SECRET = "s3-secret-key-0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c"


async def test_no_token_or_secret_appears_in_the_logs_when_things_fail(
    tmp_path: Path, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tusingest")
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("ELEMENT_SE_BROKEN_AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("ELEMENT_SE_BROKEN_AWS_SECRET_ACCESS_KEY", S3_SECRET)
    elements = tmp_path / "elements.json"
    local = {"element_id": "se-local", "mode": "edit", "backend": "directory", "path": str(tmp_path / "local")}
    broken = {"element_id": "se-broken", "mode": "edit", "backend": "s3", "endpoint": moto_server.url}
    elements.write_text(json.dumps({"version": 1, "storage_elements": [local, broken | {"bucket": "no-such"}]}))
    webhook = f"http://hook:{URL_PASSWORD}@127.0.0.1:{free_port()}/hook?token={URL_TOKEN}"
    settings = base_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        jwt_secret=JWT_SECRET,
        webhook_secret=WEBHOOK_SECRET,
        webhook_urls=webhook,
        service_discovery_fallback_config=str(elements),
        storage_selection_strategy="priority",
    )
    forged = jwt.encode({"sub": "mallory", "exp": 2**31}, "another-secret-of-at-least-32-bytes!!", "HS256")
    valid = jwt.encode({"sub": "alice", "type": "service_account", "role": "USER", "exp": 2**31}, JWT_SECRET, "HS256")
    async with live_server(settings) as server, server.client() as client:
        for token in (forged, valid, "not-a-jwt"):
            created = await client.post(
                server.files_url,
                headers=TUS | {"Upload-Length": "5", "Authorization": f"Bearer {token}"},
            )
            location = created.headers.get("Location", server.files_url + "0" * 32)
            await client.patch(
                location,
                content=b"hello",
                headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Authorization": f"Bearer {token}"},
            )

        async def failed_deliveries() -> int:
            later = datetime.now(UTC) + timedelta(days=1)
            due = await server.parts.saga_store.claim_due_messages(limit=100, lease_seconds=0, now=later)
            return sum(1 for message in due if message.last_error)

        await eventually(failed_deliveries, lambda failed: failed > 0, timeout=30)
        assert (await server.parts.elements.pool.probe_all())["se-broken"] is False  # S3 refuses: no bucket

    # The lines as an operator sees them: JSON with every field (access lines, saga steps, trace ids).
    as_json = formatter(json_lines=True)
    logged = caplog.text + "\n".join(as_json.format(record) for record in caplog.records)
    assert '"logger":"tusingest.access"' in logged and '"subject":"alice"' in logged
    # The failures were logged, so the check below looked at them.
    assert "is failing" in logged
    assert "se-broken" in logged
    for secret in (JWT_SECRET, WEBHOOK_SECRET, URL_PASSWORD, URL_TOKEN, S3_SECRET, forged, valid):
        assert secret not in logged
    assert "Bearer" not in logged
