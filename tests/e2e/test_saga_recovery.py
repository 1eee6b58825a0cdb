"""A node dies in the middle of an upload saga (SIGKILL at a failpoint) and the next node to start
finishes it: the file ends up placed once, with its attr.json and its registry row, and no
object is left in the bucket that the registry does not know. Also: webhooks sent while the
receiver is down arrive once it is up, signed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_serve_cli import clean_env, free_port, running
from tests.fixtures.rawhttp import eventually
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket, s3_client
from tests.fixtures.server import OCTETS, TUS, ServerFactory
from tests.fixtures.tusnode import create_upload, send_whole_patch
from tests.integration.test_outbox import WebhookReceiver
from tusingest.app import open_database
from tusingest.finalise.upload import SMALL_FILE
from tusingest.saga import SagaState
from tusingest.saga.webhooks import SIGNATURE_HEADER, UPLOAD_COMPLETED, verify


@pytest.fixture
def bucket(moto_server: MotoServer) -> Iterator[str]:
    name = create_bucket(moto_server.url)
    yield name
    remove_bucket(moto_server.url, name)


def keys_in(endpoint: str, bucket: str) -> list[str]:
    client = s3_client(endpoint)
    try:
        return sorted(entry["Key"] for entry in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    finally:
        client.close()


@asynccontextmanager
async def serving(workdir: Path, env: dict[str, str], port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`tusingest serve` with its log in a file (a pipe nobody reads could fill and stall it)."""
    with open(workdir / f"serve-{port}-{len(list(workdir.glob('serve-*')))}.log", "wb") as log:
        async with running(workdir, env, port, stderr=log) as process:
            try:
                yield process
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=20)


@pytest.mark.parametrize("size", [3 << 20, SMALL_FILE], ids=["small", "large"])
@pytest.mark.parametrize("point", ["inspected", "placed", "sidecar_written"])
async def test_a_saga_cut_off_by_sigkill_is_finished_by_the_next_node(
    tmp_path: Path, postgres_url: str, moto_server: MotoServer, bucket: str, point: str, size: int
) -> None:
    # A large file is killed with its step in the saga log; a small one at its begin, with the
    # element recorded and (placed, sidecar_written) the object, or object and sidecar, on it.
    elements = tmp_path / "elements.json"
    elements.write_text(
        json.dumps(
            {
                "version": 1,
                "storage_elements": [
                    {"element_id": "se-1", "mode": "rw", "backend": "s3", "endpoint": moto_server.url, "bucket": bucket}
                ],
            }
        )
    )
    env = clean_env(
        DATABASE_URL=postgres_url,
        SERVICE_DISCOVERY_FALLBACK_CONFIG=str(elements),
        ELEMENT_SE_1_AWS_ACCESS_KEY_ID=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        ELEMENT_SE_1_AWS_SECRET_ACCESS_KEY=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        SAGA_LEASE_SECONDS="2",
        SAGA_RECOVERY_INTERVAL_SECONDS="0.5",
        FINALISE_WAIT_SECONDS="60",
    )
    payload = os.urandom(size)
    port = free_port()
    sagas = open_database(postgres_url).sagas
    await sagas.open()
    try:
        async with serving(tmp_path, env | {"SAGA_FAILPOINTS": f"{point}=pause"}, port) as first:
            url = await create_upload(port, len(payload))
            upload_id = url.rsplit("/", 1)[1]
            # The final PATCH: its bytes are committed, then the saga stops at the failpoint.
            writer = await send_whole_patch(url, payload)

            async def step() -> str | None:
                saga = await sagas.latest_saga("upload", upload_id)
                return None if saga is None else saga.step

            async def held() -> bool:
                return any(f"failpoint {point} reached" in log.read_text() for log in tmp_path.glob("serve-*.log"))

            await eventually(held, bool, timeout=30)
            expected_step = point if size >= SMALL_FILE else None
            assert await step() == expected_step
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            writer.close()

        async with serving(tmp_path, env, port):

            async def state() -> SagaState | None:
                saga = await sagas.latest_saga("upload", upload_id)
                return None if saga is None else saga.state

            await eventually(state, lambda current: current is SagaState.COMPLETED, timeout=30)
            async with httpx.AsyncClient() as client:
                head = await client.head(url, headers=TUS)
        record = await sagas.file_for_upload(upload_id)
        sagas_for_upload = [s for s in await sagas.list_sagas() if s.subject_id == upload_id]
    finally:
        await sagas.close()

    assert record is not None and record.sha256 == hashlib.sha256(payload).hexdigest()
    assert [s.state for s in sagas_for_upload] == [SagaState.COMPLETED]
    # Exactly the registered object and its sidecar: nothing orphaned, nothing twice.
    assert keys_in(moto_server.url, bucket) == [record.storage_key, record.storage_key + ".attr.json"]
    client = s3_client(moto_server.url)
    try:
        body = client.get_object(Bucket=bucket, Key=record.storage_key)["Body"].read()
    finally:
        client.close()
    assert body == payload
    assert head.headers["ArtStore-Upload-Status"] == "completed"
    assert head.headers["ArtStore-File-Id"] == record.file_id


async def test_webhooks_sent_while_the_receiver_is_down_arrive_signed_once_it_is_up(
    start_server: ServerFactory,
) -> None:
    receiver = WebhookReceiver(free_port())
    secret = "hook-secret"
    server = await start_server(
        webhook_urls=receiver.url,
        webhook_secret=secret,
        outbox_poll_interval_seconds=0.1,
        webhook_retry_max_seconds=0.3,
    )
    payloads = [os.urandom(1000 + n) for n in range(3)]
    file_ids = []
    async with server.client() as client:
        for payload in payloads:
            created = await client.post("/files/", headers=TUS | {"Upload-Length": str(len(payload))})
            done = await client.patch(
                created.headers["Location"],
                headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS},
                content=payload,
            )
            assert done.status_code == 204
            file_ids.append(done.headers["ArtStore-File-Id"])

    async def attempts() -> int:
        messages = await server.parts.saga_store.claim_due_messages(limit=100, lease_seconds=0)
        return min((m.attempts for m in messages), default=0)

    # The receiver is down: deliveries fail and are rescheduled (the relay keeps trying).
    await eventually(attempts, lambda tried: tried >= 2, timeout=20)
    await receiver.start()
    try:

        async def delivered_ids() -> set[str]:
            return {r.event["data"]["file_id"] for r in receiver.received if r.event["type"] == UPLOAD_COMPLETED}

        await eventually(delivered_ids, lambda ids: ids >= set(file_ids), timeout=20)
    finally:
        await receiver.stop()
    for request in receiver.received:
        assert verify(request.body, secret, request.headers.get(SIGNATURE_HEADER))
        assert request.headers["Content-Type"].startswith("application/json")
