"""GET /metrics over a real server: scripted uploads give exact counts (parsed with prometheus-client's
text parser), the endpoint is guarded by the token policy and absent when disabled. Store-independent:
runs on SQLite only."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fixtures.clamd import EICAR, Clamd
from tests.fixtures.jwt import rsa_key, token, write_pem
from tests.fixtures.postgres import _admin
from tests.fixtures.rawhttp import eventually
from tests.fixtures.redis import RedisServer
from tests.fixtures.server import TUS, LiveServer, ServerFactory, _server_factory, base_settings, live_server
from tests.integration.test_finalise import jpeg_payload, text_payload, upload
from tests.metrics_text import samples

KiB = 1 << 10


async def scrape(server: LiveServer, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    async with server.client() as client:
        response = await client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def value(found: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def settled_counts(server: LiveServer, uploads: int) -> dict[tuple[str, frozenset], float]:
    """The scrape once ``uploads`` finalisations have settled (finalisation runs after the answer)."""

    def settled(found: dict[tuple[str, frozenset], float]) -> bool:
        done = value(found, "artstore_ingester_uploads_total", status="success")
        return done + value(found, "artstore_ingester_uploads_total", status="failure") >= uploads

    return await eventually(lambda: scrape(server), settled, timeout=30)


async def test_scripted_uploads_give_exact_counts(start_sqlite_server: ServerFactory) -> None:
    server = await start_sqlite_server(allowed_mime_types="image/*")
    good = jpeg_payload(300 * KiB)
    async with server.client() as client:
        _, ok = await upload(client, good, "photo.jpg")
        _, refused = await upload(client, text_payload(100 * KiB), "notes.txt")
        await client.post("/files/", headers=TUS | {"Upload-Length": "10"})
    assert (ok.status_code, refused.status_code) == (204, 415)
    found = await settled_counts(server, 2)
    assert value(found, "artstore_ingester_uploads_total", status="success") == 1
    assert value(found, "artstore_ingester_uploads_total", status="failure") == 1
    assert value(found, "artstore_ingester_virus_detections_total") == 0
    assert value(found, "artstore_ingester_saga_transactions_total", saga="upload", outcome="completed") == 1
    assert value(found, "artstore_ingester_saga_transactions_total", saga="upload", outcome="compensated") == 1
    assert value(found, "artstore_ingester_tus_uploads_total", event="created") == 3
    assert value(found, "artstore_ingester_tus_uploads_total", event="completed") == 1  # the refused one never was
    # Every byte of the good upload was made durable; the refused one kept none.
    assert value(found, "artstore_ingester_tus_bytes_received_total") == len(good)
    assert value(found, "artstore_ingester_upload_size_bytes_count") == 1
    assert value(found, "artstore_ingester_upload_size_bytes_sum") == len(good)
    assert value(found, "artstore_ingester_storage_selection_duration_seconds_count") == 1
    assert value(found, "artstore_ingester_compression_ratio_count") == 0  # a JPEG is stored as received
    # One pass through each stage: the refused upload was refused from its first bytes, before its saga ran them.
    stage = "artstore_ingester_finalise_stage_duration_seconds_count"
    assert (value(found, stage, stage="validation"), value(found, stage, stage="transfer")) == (1, 1)
    assert value(found, stage, stage="storage_selection") == 1
    # Route templates, never raw paths with ids.
    patches = {
        labels: count
        for (name, labels), count in found.items()
        if name == "artstore_ingester_http_requests_total" and ("method", "PATCH") in labels
    }
    assert {dict(labels)["route"] for labels in patches} == {"/files/{upload_id}"}
    assert sum(patches.values()) == 2
    assert value(found, "artstore_ingester_http_requests_total", method="POST", route="/files/", status="201") == 3
    assert value(found, "artstore_ingester_circuit_breaker_state", element="local") == 0


async def test_a_delete_saga_is_counted_under_its_own_name(start_sqlite_server: ServerFactory) -> None:
    server = await start_sqlite_server()
    async with server.client() as client:
        _, ok = await upload(client, jpeg_payload(100 * KiB), "photo.jpg")
        assert ok.status_code == 204, ok.headers
        deleted = await client.delete(f"/api/files/{ok.headers['ArtStore-File-Id']}")
    assert deleted.status_code == 204, deleted.text

    found = await scrape(server)

    assert value(found, "artstore_ingester_saga_transactions_total", saga="delete", outcome="completed") == 1
    assert value(found, "artstore_ingester_saga_transactions_total", saga="upload", outcome="completed") == 1


async def test_a_compressed_file_records_its_ratio(start_sqlite_server: ServerFactory) -> None:
    server = await start_sqlite_server()
    async with server.client() as client:
        _, ok = await upload(client, text_payload(2 << 20), "log.txt")
    assert ok.status_code == 204
    found = await settled_counts(server, 1)
    assert value(found, "artstore_ingester_compression_ratio_count") == 1
    assert 0 < value(found, "artstore_ingester_compression_ratio_sum") < 0.5  # log text shrinks well


async def test_a_virus_is_counted(start_sqlite_server: ServerFactory, clamd: Clamd) -> None:
    server = await start_sqlite_server(virus_scan_enabled=True, clamd_url=clamd.tcp_url)
    infected = os.urandom(200 * KiB) + EICAR + os.urandom(1000)
    async with server.client() as client:
        _, virus = await upload(client, infected, "bad.bin")
    assert virus.status_code == 422
    found = await settled_counts(server, 1)
    assert value(found, "artstore_ingester_virus_detections_total") == 1
    assert value(found, "artstore_ingester_uploads_total", status="failure") == 1
    assert value(found, "artstore_ingester_tus_bytes_received_total") == len(infected)


async def test_metrics_need_a_role_that_may_read_them(tmp_path: Path, sqlite_url: str) -> None:
    key = rsa_key()
    keys = write_pem(tmp_path / "jwt-public.pem", key)
    async with live_server(base_settings(tmp_path, sqlite_url, jwt_public_key_path=str(keys))) as server:
        async with server.client() as client:
            missing = await client.get("/metrics")
            user = await client.get("/metrics", headers={"Authorization": f"Bearer {token(key, role='USER')}"})
            admin_token = token(key, role="ADMIN")
            admin = await client.get("/metrics", headers={"Authorization": f"Bearer {admin_token}"})
            auditor = await client.get("/metrics", headers={"Authorization": f"Bearer {token(key, role='AUDITOR')}"})
    assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
    assert user.status_code == 403
    assert admin.status_code == 200 and auditor.status_code == 200
    assert admin_token not in admin.text and "Bearer" not in admin.text


async def test_metrics_can_be_left_open_or_turned_off(start_sqlite_server: ServerFactory) -> None:
    opened = await start_sqlite_server()  # anonymous loopback mode: open by default
    closed = await start_sqlite_server(prometheus_metrics_enabled=False)
    async with opened.client() as client:
        assert (await client.get("/metrics")).status_code == 200
    async with closed.client() as client:
        assert (await client.get("/metrics")).status_code == 404


# --- readiness ------------------------------------------------------------------------------------


async def ready(server: LiveServer) -> tuple[int, dict[str, dict[str, object]]]:
    async with server.client() as client:
        response = await client.get("/health/ready")
    body = response.json()
    assert body["status"] == ("ready" if response.status_code == 200 else "not_ready")
    return response.status_code, body["checks"]


async def test_readiness_follows_redis_down_and_back(
    start_sqlite_server: ServerFactory, redis_server: RedisServer
) -> None:
    server = await start_sqlite_server(redis_url=redis_server.url)
    status, checks = await ready(server)
    assert status == 200 and checks["redis"] == {"ok": True, "detail": "ok"}
    assert "clamd" not in checks  # not enabled, not checked
    redis_server.stop()
    status, checks = await ready(server)
    assert status == 503 and checks["redis"]["ok"] is False and checks["session_store"]["ok"] is True
    redis_server.start()
    status, checks = await eventually(lambda: ready(server), lambda answer: answer[0] == 200)
    assert checks["redis"]["ok"] is True


async def test_readiness_wants_free_staging_space(start_sqlite_server: ServerFactory) -> None:
    server = await start_sqlite_server(staging_min_free_mb=1 << 40)  # more than any disk has
    status, checks = await ready(server)
    assert status == 503 and checks["staging"]["ok"] is False
    assert "STAGING_MIN_FREE_MB" in str(checks["staging"]["detail"])


async def test_readiness_follows_the_only_element_going_down_and_back(start_sqlite_server: ServerFactory) -> None:
    server = await start_sqlite_server()
    assert (await ready(server))[0] == 200
    pool = server.parts.elements.pool
    breaker = pool._states["local"].breaker  # the element's own breaker, as failed backend calls feed it
    for _ in range(10):
        breaker.record_failure("test: the element is down")
    status, checks = await ready(server)
    assert status == 503 and checks["writable_storage_element"]["ok"] is False
    found = await scrape(server)
    assert value(found, "artstore_ingester_circuit_breaker_state", element="local") == 2


async def test_readiness_follows_postgresql_down_and_back(
    tmp_path: Path, postgres_url: str, postgres_admin_url: str
) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    async with _server_factory(tmp_path, postgres_url) as factory:
        server = await factory()
        assert (await ready(server))[0] == 200
        # This test's own database refuses connections and loses the open ones: PostgreSQL is gone for the node.
        await _admin(
            postgres_admin_url,
            f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )
        try:
            _, checks = await eventually(lambda: ready(server), lambda answer: answer[0] == 503)
            assert checks["session_store"]["ok"] is False and checks["saga_store"]["ok"] is False
        finally:
            await _admin(postgres_admin_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        _, checks = await eventually(lambda: ready(server), lambda answer: answer[0] == 200, timeout=30)
        assert checks["session_store"]["ok"] is True
