"""What crashes leave where no reader looks is swept away: staging folders no upload needs (an id
no session knows, a terminated or expired upload) and old temp files of killed puts on a
Storage Element; what may still be in use (a young folder, a creation under way, a put that
may still run) is kept."""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import pytest

from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tusingest.sessions.expiry import expire_uploads

TWO_DAYS = 2 * 24 * 3600  # older than the default UPLOAD_SESSION_TTL_HOURS (24)


def plant_folder(staging: Path, upload_id: str, age_seconds: float = 0) -> Path:
    """A staging folder as a creation leaves it: the folder and its first chunk file."""
    folder = staging / upload_id
    folder.mkdir(parents=True)
    chunk = folder / f"{0:020d}.chunk"
    chunk.write_bytes(b"staged bytes")
    moment = time.time() - age_seconds
    for path in (chunk, folder):
        os.utime(path, (moment, moment))
    return folder


async def create_with_bytes(server: LiveServer) -> str:
    async with server.client() as client:
        response = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "100", "Content-Type": OCTETS}, content=b"abc"
        )
    assert response.status_code == 201
    return response.headers["Location"].rsplit("/", 1)[1]


async def test_sweep_removes_staging_of_unknown_ids_and_of_terminated_uploads_and_keeps_the_rest(
    server: LiveServer,
) -> None:
    parts = server.parts
    staging = Path(server.settings.staging_dir)
    active = await create_with_bytes(server)
    terminated = await create_with_bytes(server)
    async with server.client() as client:
        assert (await client.delete(f"/files/{terminated}", headers=TUS)).status_code == 204
    plant_folder(staging, terminated)  # as a crash between the state change and the removal leaves it
    stray = secrets.token_hex(16)
    plant_folder(staging, stray, age_seconds=TWO_DAYS)  # a creation that died before writing its row
    young = secrets.token_hex(16)
    plant_folder(staging, young)  # maybe a creation whose body is still arriving on another node

    report = await expire_uploads(parts.store, parts.staging, parts.locker)

    assert report.staging_removed == 2
    assert sorted(await parts.staging.list_upload_ids()) == sorted([active, young])
    async with server.client() as client:
        head = await client.head(f"/files/{active}", headers=TUS)
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "3"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_sweep_keeps_the_old_folder_of_a_creation_under_way_on_this_node(server: LiveServer) -> None:
    parts = server.parts
    upload_id = secrets.token_hex(16)
    plant_folder(Path(server.settings.staging_dir), upload_id, age_seconds=TWO_DAYS)
    async with parts.locker.claim_new(upload_id):
        report = await expire_uploads(parts.store, parts.staging, parts.locker)
    assert report.staging_removed == 0
    assert await parts.staging.list_upload_ids() == [upload_id]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_node_removes_stray_staging_folders_at_start(tmp_path: Path, start_server: ServerFactory) -> None:
    stray = plant_folder(tmp_path / "staging", secrets.token_hex(16), age_seconds=TWO_DAYS)
    await start_server()

    async def still_there() -> bool:
        return stray.exists()

    await eventually(still_there, lambda exists: not exists, timeout=15)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_node_sweeps_old_temp_files_of_killed_puts_from_its_elements_at_start(
    tmp_path: Path, start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tusingest.elements.pool")
    hour = tmp_path / "elements" / "local" / "2020" / "01" / "01" / "00"
    hour.mkdir(parents=True)
    old, young = hour / f".old.bin.{secrets.token_hex(8)}.tmp", hour / f".young.bin.{secrets.token_hex(8)}.tmp"
    old.write_bytes(b"x" * 1000)
    young.write_bytes(b"y" * 1000)  # a put that may still be running on another node
    # Older than SAGA_TIMEOUT_SECONDS + SAGA_LEASE_SECONDS (3600 + 60 by default): no put runs that long.
    moment = time.time() - 2 * 3600
    os.utime(old, (moment, moment))

    await start_server()

    async def sweep_done() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed 1 unfinished put(s)")]

    await eventually(sweep_done, bool, timeout=15)
    assert not old.exists()
    assert young.exists()
