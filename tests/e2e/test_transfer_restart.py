"""A node dies in the middle of a transfer (SIGKILL once the copy is at the destination) and the next node to start
finishes it: the registry points at the destination, the source is gone, and neither element holds anything the
registry does not know."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_saga_recovery import keys_in, serving
from tests.e2e.test_serve_cli import clean_env, free_port
from tests.fixtures.rawhttp import eventually
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket, s3_client
from tests.fixtures.server import OCTETS, TUS
from tusingest.app import open_database


@pytest.fixture
def buckets(moto_server: MotoServer) -> Iterator[tuple[str, str]]:
    names = (create_bucket(moto_server.url), create_bucket(moto_server.url))
    yield names
    for name in names:
        remove_bucket(moto_server.url, name)


async def test_a_transfer_cut_off_by_sigkill_is_finished_by_the_next_node(
    tmp_path: Path, postgres_url: str, moto_server: MotoServer, buckets: tuple[str, str]
) -> None:
    source_bucket, destination_bucket = buckets
    elements = tmp_path / "elements.json"
    elements.write_text(
        json.dumps(
            {
                "version": 1,
                "storage_elements": [
                    {"element_id": "se-a", "mode": "edit", "endpoint": moto_server.url, "bucket": source_bucket},
                    {"element_id": "se-b", "mode": "edit", "endpoint": moto_server.url, "bucket": destination_bucket},
                ],
            }
        )
    )
    credentials = {
        f"ELEMENT_{element}_AWS_{name}": MOTO_CREDENTIALS[f"AWS_{name}"]
        for element in ("SE_A", "SE_B")
        for name in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY")
    }
    env = clean_env(
        DATABASE_URL=postgres_url,
        SERVICE_DISCOVERY_FALLBACK_CONFIG=str(elements),
        SAGA_LEASE_SECONDS="2",
        SAGA_RECOVERY_INTERVAL_SECONDS="0.5",
        **credentials,
    )
    payload = os.urandom(3 << 20)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sagas = open_database(postgres_url).sagas
    await sagas.open()
    try:
        async with serving(tmp_path, env | {"SAGA_FAILPOINTS": "transfer_copied=pause"}, port) as first:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                created = await client.post("/files/", headers=TUS | {"Upload-Length": str(len(payload))})
                done = await client.patch(
                    created.headers["Location"],
                    headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS},
                    content=payload,
                )
                file_id = done.headers["ArtStore-File-Id"]
                assert done.headers["ArtStore-Storage-Element-Id"] == "se-a"  # equal elements: the first by id
                started = await client.post(
                    f"/api/files/{file_id}/transfer",
                    json={"destination_storage_element_id": "se-b", "delete_source": True},
                )
            assert started.status_code == 202, started.text
            transfer_id = started.json()["transfer_id"]

            async def step() -> str | None:
                saga = await sagas.get_saga(transfer_id)
                return None if saga is None else saga.step

            await eventually(step, lambda reached: reached == "copied", timeout=30)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
        record = await sagas.get_file(file_id)
        assert record is not None and record.storage_element_id == "se-a"
        key = record.storage_key
        # Killed between the copy and the commit: the object is in both buckets, the sidecar only at the source.
        assert keys_in(moto_server.url, destination_bucket) == [key]

        async with serving(tmp_path, env, port), httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def status() -> dict[str, object]:
                body: dict[str, object] = (await client.get(f"/api/files/transfer/{transfer_id}")).json()
                return body

            final = await eventually(status, lambda current: current["status"] in ("completed", "failed"), timeout=30)
        record = await sagas.get_file(file_id)
        transfers = [s for s in await sagas.list_sagas() if s.kind == "transfer"]
    finally:
        await sagas.close()

    assert final["status"] == "completed", final
    assert final["bytes_transferred"] == final["bytes_total"] == len(payload)
    assert record is not None and (record.storage_element_id, record.storage_key) == ("se-b", key)
    assert [s.saga_id for s in transfers] == [transfer_id]
    assert keys_in(moto_server.url, source_bucket) == []
    assert keys_in(moto_server.url, destination_bucket) == [key, key + ".attr.json"]
    client = s3_client(moto_server.url)
    try:
        assert client.get_object(Bucket=destination_bucket, Key=key)["Body"].read() == payload
    finally:
        client.close()
