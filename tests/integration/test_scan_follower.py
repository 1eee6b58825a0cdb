"""The virus scan that follows the commit point (``tusingest.finalise.follow``): a large upload's
committed bytes go to clamd on an INSTREAM of their own while its PATCHes arrive, and the saga uses that
verdict instead of scanning in its pass. A body that is refused never reaches clamd; a scan that waits
too long for the next commit gives its clamd connection back; whenever the follower has no verdict
(no room, clamd unreachable, given up) the saga scans as it reads, with its own policy."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.clamd import EICAR, Clamd
from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import TUS, LiveServer, ServerFactory
from tests.integration.test_compression_follower import assert_stored_brotli_of, create, patch
from tests.integration.test_finalise import bucket_objects, element_file, s3_element, split_stored, text_payload
from tests.integration.test_running_digest import start_node

__all__ = ["s3_element", "start_node"]  # the fixtures, used by name
# The follower reads committed bytes of an upload in progress: S3 staging cannot, so it runs none.
pytestmark = pytest.mark.directory_staging

MiB = 1 << 20


async def scanning_server(
    start: ServerFactory, tmp_path: Path, element: dict[str, Any], clamd_url: str, **settings: Any
) -> LiveServer:
    return await start(
        service_discovery_fallback_config=element_file(tmp_path, element),
        max_file_size_mb=64,
        virus_scan_enabled=True,
        clamd_url=clamd_url,
        **settings,
    )


async def send(client: httpx.AsyncClient, payload: bytes, piece: int, filename: str = "data.bin") -> httpx.Response:
    url = await create(client, len(payload), filename)
    response = None
    for offset in range(0, len(payload), piece):
        response = await patch(client, url, offset, payload[offset : offset + piece])
        assert response.status_code in (204, 422), response.text
    assert response is not None
    return response


def assert_stored(element: dict[str, Any], payload: bytes) -> None:
    stored, attr = split_stored(bucket_objects(element))
    assert stored["body"] == payload
    assert attr["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_a_clean_upload_is_scanned_while_it_arrives_and_the_saga_uses_that_verdict(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await scanning_server(start_sqlite_server, tmp_path, s3_element, clamd.unix_url)
    followers = server.parts.sagas.followers
    payload = os.urandom(12 * MiB)
    async with server.client() as client:
        url = await create(client, len(payload))
        for offset in range(0, len(payload), 3 * MiB):
            response = await patch(client, url, offset, payload[offset : offset + 3 * MiB])
            assert response.status_code == 204
            if offset == 0:
                assert followers.scanning == 1  # begun by the commit of the first bytes
    assert response.headers["ArtStore-Upload-Status"] == "completed"
    assert followers.verdicts_used == 1 and followers.scanning == 0 and len(followers) == 0
    assert_stored(s3_element, payload)


async def test_eicar_across_two_patches_is_found_by_the_follower_and_nothing_is_stored(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await scanning_server(start_sqlite_server, tmp_path, s3_element, clamd.tcp_url)
    payload = os.urandom(4 * MiB - 30) + EICAR + os.urandom(6 * MiB)  # the string straddles the 4 MiB PATCH edge
    async with server.client() as client:
        last = await send(client, payload, 4 * MiB)
    assert last.status_code == 422 and last.headers["ArtStore-Error"] == "virus_detected"
    assert "Eicar" in last.text
    assert server.parts.sagas.followers.verdicts_used == 1
    assert bucket_objects(s3_element) == {}
    assert await server.parts.saga_store.count_files() == 0


async def test_a_refused_body_never_reaches_clamd(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await scanning_server(start_sqlite_server, tmp_path, s3_element, clamd.unix_url)
    payload = os.urandom(10 * MiB)
    first = 3 * MiB
    async with server.client() as client:
        url = await create(client, len(payload))
        assert (await patch(client, url, 0, payload[:first])).status_code == 204
        # A body carrying EICAR whose checksum does not match: refused, so clamd must never see it.
        wrong = "sha256 " + base64.b64encode(hashlib.sha256(b"not these bytes").digest()).decode()
        poisoned = EICAR + os.urandom(2 * MiB)
        refused = await patch(client, url, first, poisoned, **{"Upload-Checksum": wrong})
        assert refused.status_code == 460
        done = await patch(client, url, first, payload[first:])
    assert done.status_code == 204 and done.headers["ArtStore-Upload-Status"] == "completed"
    assert server.parts.sagas.followers.verdicts_used == 1
    assert_stored(s3_element, payload)


async def test_a_text_upload_is_compressed_and_scanned_by_one_follower(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await scanning_server(
        start_sqlite_server, tmp_path, s3_element, clamd.unix_url, compression_enabled=True, compression_min_size_mb=1
    )
    followers = server.parts.sagas.followers
    payload = text_payload(12 * MiB)
    async with server.client() as client:
        last = await send(client, payload, 3 * MiB, "server.log")
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed"
    assert followers.used == 1 and followers.verdicts_used == 1 and len(followers) == 0
    assert_stored_brotli_of(s3_element, payload)


async def test_eicar_in_a_compressed_upload_is_refused_and_its_follower_freed_at_once(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    """The follower had compressed the whole file too; the failed saga lets it go instead of keeping
    its spool for a ``take`` that never comes (it would hold one of the node's follower slots)."""
    server = await scanning_server(
        start_sqlite_server, tmp_path, s3_element, clamd.unix_url, compression_enabled=True, compression_min_size_mb=1
    )
    followers = server.parts.sagas.followers
    text = text_payload(10 * MiB)
    payload = text[: 6 * MiB] + EICAR + text[6 * MiB :]
    async with server.client() as client:
        last = await send(client, payload, 3 * MiB, "server.log")
    assert last.status_code == 422 and last.headers["ArtStore-Error"] == "virus_detected"
    assert followers.verdicts_used == 1 and followers.used == 0 and len(followers) == 0
    assert bucket_objects(s3_element) == {}


async def test_a_scan_left_waiting_gives_its_connection_back_and_the_saga_scans_in_its_pass(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await scanning_server(start_sqlite_server, tmp_path, s3_element, clamd.unix_url)
    followers = server.parts.sagas.followers
    followers.scan_idle_seconds = 0.5  # set on the running node: test-only
    payload = os.urandom(9 * MiB - 100) + EICAR + os.urandom(100 - len(EICAR))
    async with server.client() as client:
        url = await create(client, len(payload))
        assert (await patch(client, url, 0, payload[: 4 * MiB])).status_code == 204
        assert followers.scanning == 1

        async def scans() -> int:
            return followers.scanning

        await eventually(scans, lambda count: count == 0)  # the client paused; clamd's thread is free again
        last = await patch(client, url, 4 * MiB, payload[4 * MiB :])
    assert last.status_code == 422 and last.headers["ArtStore-Error"] == "virus_detected"  # found by the pass
    assert followers.verdicts_used == 0 and len(followers) == 0
    assert bucket_objects(s3_element) == {}


@pytest.mark.parametrize("how", ["no room", "clamd unreachable, fail open", "clamd unreachable, fail closed"])
async def test_without_a_verdict_from_the_follower_the_saga_scans_under_its_own_policy(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd, how: str
) -> None:
    unreachable = how.startswith("clamd unreachable")
    server = await scanning_server(
        start_sqlite_server,
        tmp_path,
        s3_element,
        "tcp://127.0.0.1:1" if unreachable else clamd.unix_url,
        virus_scan_fail_open=how.endswith("fail open"),
        saga_retry_max_attempts=1,
        saga_retry_base_delay_seconds=0.0,
    )
    followers = server.parts.sagas.followers
    if how == "no room":
        followers.scan_capacity = 0  # set on the running node: test-only
    payload = os.urandom(9 * MiB - 100) + EICAR + os.urandom(100 - len(EICAR))
    async with server.client() as client:
        url = await create(client, len(payload))
        assert (await patch(client, url, 0, payload[: 4 * MiB])).status_code == 204
        last = await patch(client, url, 4 * MiB, payload[4 * MiB :])
    assert followers.verdicts_used == 0 and followers.scanning == 0 and len(followers) == 0
    if how == "no room":
        assert last.status_code == 422 and last.headers["ArtStore-Error"] == "virus_detected"
        assert bucket_objects(s3_element) == {}
    elif how.endswith("fail open"):
        assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed"
        assert_stored(s3_element, payload)
    else:
        assert last.status_code == 503 and last.headers["ArtStore-Error"] == "scanner_unavailable"
        assert bucket_objects(s3_element) == {}


async def test_a_terminated_upload_gives_its_clamd_connection_back_at_once(
    start_sqlite_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    server = await scanning_server(start_sqlite_server, tmp_path, s3_element, clamd.unix_url)
    followers = server.parts.sagas.followers
    async with server.client() as client:
        url = await create(client, 10 * MiB)
        assert (await patch(client, url, 0, os.urandom(4 * MiB))).status_code == 204
        assert followers.scanning == 1
        assert (await client.delete(url, headers=TUS)).status_code == 204

    async def following() -> tuple[int, int]:
        return followers.scanning, len(followers)

    await eventually(following, lambda counts: counts == (0, 0))  # well before the 10 s of scan idleness
    assert followers.verdicts_used == 0
    assert bucket_objects(s3_element) == {}


async def test_a_node_that_resumes_an_upload_another_began_scans_it_in_its_pass(
    start_node: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], clamd: Clamd
) -> None:
    """The first node's follower saw only the first PATCH and gave its scan up; the second node,
    which commits the rest, starts none (it did not take the first bytes). So no node has a verdict,
    and the saga, wherever it runs, scans the whole file and finds EICAR in the part the first node
    never received."""
    first, second = (
        await scanning_server(start_node, tmp_path, s3_element, clamd.unix_url),
        await scanning_server(start_node, tmp_path, s3_element, clamd.unix_url),
    )
    first.parts.sagas.followers.scan_idle_seconds = 0.5  # set on the running node: test-only
    payload = os.urandom(9 * MiB) + EICAR + os.urandom(1000)
    async with first.client() as one, second.client() as two:
        url = await create(one, len(payload))
        assert (await patch(one, url, 0, payload[: 4 * MiB])).status_code == 204
        assert first.parts.sagas.followers.scanning == 1

        async def following() -> int:
            return len(first.parts.sagas.followers)

        await eventually(following, lambda count: count == 0)  # its scan given up, nothing else to follow
        last = await patch(two, url, 4 * MiB, payload[4 * MiB :])
    assert last.status_code == 422 and last.headers["ArtStore-Error"] == "virus_detected"
    for node in (first, second):
        assert node.parts.sagas.followers.verdicts_used == 0 and len(node.parts.sagas.followers) == 0
    assert bucket_objects(s3_element) == {}
