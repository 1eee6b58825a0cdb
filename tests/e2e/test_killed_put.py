"""A node SIGKILLed in the middle of putting an upload's object on a Storage Element leaves a
temp file (directory) or an open multipart upload (S3); the next node finishes the saga and
removes what the killed put left: the element ends with the object and its attr.json only.

On directory elements this proves the discard before the put again (the temp file is young, so
the start-up sweep leaves it). moto reports every multipart upload as begun in 2010, so on S3
the next node's start-up sweep may abort it first; the contract suite proves the S3 discard."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from tests.e2e.test_saga_recovery import keys_in, serving
from tests.e2e.test_serve_cli import clean_env, free_port
from tests.fixtures.rawhttp import eventually
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket, s3_client
from tests.fixtures.tusnode import create_upload, send_whole_patch
from tusingest.app import open_database
from tusingest.elements.directory import is_temp_name
from tusingest.saga import SagaState

MiB = 1 << 20


class Element:
    """One element of either kind, and what a put leaves on it where readers do not look."""

    def __init__(self, kind: str, root: Path, moto: MotoServer | None) -> None:
        self.kind, self.root, self.moto = kind, root, moto
        self.bucket = create_bucket(moto.url) if moto is not None else ""

    def config(self) -> dict[str, object]:
        if self.moto is None:
            return {"element_id": "se-1", "mode": "rw", "backend": "directory", "path": str(self.root)}
        return {"element_id": "se-1", "mode": "rw", "backend": "s3", "endpoint": self.moto.url, "bucket": self.bucket}

    def leftovers(self) -> list[str]:
        """Temp files (with bytes in them), or open multipart uploads."""
        if self.moto is None:
            return sorted(str(p) for p in self.root.rglob("*") if is_temp_name(p.name) and p.stat().st_size > 0)
        client = s3_client(self.moto.url)
        try:
            return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))
        finally:
            client.close()

    def objects(self) -> list[str]:
        if self.moto is None:
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        return keys_in(self.moto.url, self.bucket)

    def read(self, key: str) -> bytes:
        if self.moto is None:
            return (self.root / key).read_bytes()
        client = s3_client(self.moto.url)
        try:
            return client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        finally:
            client.close()

    def close(self) -> None:
        if self.moto is not None:
            remove_bucket(self.moto.url, self.bucket)


@pytest.mark.parametrize("kind", ["directory", "s3"])
async def test_a_put_killed_midway_leaves_nothing_once_the_next_node_finishes_the_saga(
    tmp_path: Path, postgres_url: str, request: pytest.FixtureRequest, kind: str
) -> None:
    moto: MotoServer | None = request.getfixturevalue("moto_server") if kind == "s3" else None
    element = Element(kind, tmp_path / "element", moto)
    elements = tmp_path / "elements.json"
    elements.write_text(json.dumps({"version": 1, "storage_elements": [element.config()]}))
    staging = tmp_path / "staging"
    env = clean_env(
        DATABASE_URL=postgres_url,
        STAGING_DIR=str(staging),
        SERVICE_DISCOVERY_FALLBACK_CONFIG=str(elements),
        ELEMENT_SE_1_AWS_ACCESS_KEY_ID=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        ELEMENT_SE_1_AWS_SECRET_ACCESS_KEY=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        MAX_FILE_SIZE_MB="64",
        SAGA_LEASE_SECONDS="2",
        SAGA_RECOVERY_INTERVAL_SECONDS="0.5",
        FINALISE_WAIT_SECONDS="60",
    )
    payload = os.urandom(48 * MiB)
    port = free_port()
    sagas = open_database(postgres_url).sagas
    await sagas.open()
    try:
        async with serving(tmp_path, env | {"SAGA_FAILPOINTS": "put_midway=pause"}, port) as first:
            url = await create_upload(port, len(payload))
            upload_id = url.rsplit("/", 1)[1]
            writer = await send_whole_patch(url, payload)

            # Half the object is on the element when the put stops at the failpoint; kill it there.
            async def left() -> list[str]:
                return await asyncio.to_thread(element.leftovers)

            killed_left = await eventually(left, bool, timeout=60)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            writer.close()
        assert len(killed_left) == 1
        saga = await sagas.latest_saga("upload", upload_id)
        assert saga is not None and saga.step == "placing"

        async with serving(tmp_path, env, port):

            async def state() -> SagaState | None:
                saga = await sagas.latest_saga("upload", upload_id)
                return None if saga is None else saga.state

            await eventually(state, lambda current: current is SagaState.COMPLETED, timeout=60)
        record = await sagas.file_for_upload(upload_id)
    finally:
        await sagas.close()

    try:
        assert record is not None and record.sha256 == hashlib.sha256(payload).hexdigest()
        assert element.leftovers() == []
        assert element.objects() == [record.storage_key, record.storage_key + ".attr.json"]
        assert element.read(record.storage_key) == payload
        assert list(staging.iterdir()) == []
    finally:
        element.close()
