"""Compression that follows the commit point (``tusingest.finalise.follow``): a large text upload is
compressed while its PATCHes arrive and the saga stores that copy; a body that is refused or cut off
never reaches it; an upload whose type is not worth compressing, or that is terminated, leaves no
follower behind; with no follower the saga compresses as it reads, as before."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tests.integration.test_finalise import (
    bucket_objects,
    element_file,
    jpeg_payload,
    metadata,
    s3_element,
    split_stored,
    text_payload,
)

__all__ = ["s3_element"]  # the fixture, used by name
# The follower reads committed bytes of an upload in progress: S3 staging cannot, so it runs none.
pytestmark = pytest.mark.directory_staging

MiB = 1 << 20


async def follower_server(start_server: ServerFactory, tmp_path: Path, element: dict[str, Any]) -> LiveServer:
    return await start_server(
        service_discovery_fallback_config=element_file(tmp_path, element),
        max_file_size_mb=64,
        compression_min_size_mb=1,
    )


async def create(client: httpx.AsyncClient, length: int, filename: str = "server.log") -> str:
    created = await client.post(
        "/files/", headers=TUS | {"Upload-Length": str(length), "Upload-Metadata": metadata(filename=filename)}
    )
    assert created.status_code == 201, created.text
    return str(created.headers["Location"])


async def patch(client: httpx.AsyncClient, url: str, offset: int, body: bytes, **extra: str) -> httpx.Response:
    return await client.patch(
        url, headers=TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS} | extra, content=body
    )


def assert_stored_brotli_of(element: dict[str, Any], payload: bytes) -> None:
    stored, attr = split_stored(bucket_objects(element))
    assert stored["head"]["ContentEncoding"] == "br"
    assert brotli.decompress(stored["body"]) == payload
    assert attr["compression"] == {
        "algorithm": "brotli",
        "original_size": len(payload),
        "stored_size": len(stored["body"]),
    }
    assert attr["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_a_text_upload_is_compressed_while_it_arrives_and_the_saga_stores_that_copy(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    server = await follower_server(start_server, tmp_path, s3_element)
    followers = server.parts.sagas.followers
    payload = text_payload(12 * MiB)
    async with server.client() as client:
        url = await create(client, len(payload))
        for offset in range(0, len(payload), 3 * MiB):
            response = await patch(client, url, offset, payload[offset : offset + 3 * MiB])
            assert response.status_code == 204
            if offset == 0:
                assert len(followers) == 1  # begun by the commit of the first bytes
    assert response.headers["ArtStore-Upload-Status"] == "completed"
    assert followers.used == 1 and len(followers) == 0
    assert_stored_brotli_of(s3_element, payload)


async def test_bodies_refused_or_cut_off_never_reach_the_follower(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    server = await follower_server(start_server, tmp_path, s3_element)
    payload = text_payload(10 * MiB)
    first, cut = 3 * MiB, 5 * MiB + 12345
    async with server.client() as client:
        url = await create(client, len(payload))
        upload_id = url.rstrip("/").rsplit("/", 1)[1]
        assert (await patch(client, url, 0, payload[:first])).status_code == 204
        wrong = "sha256 " + base64.b64encode(hashlib.sha256(b"not these bytes").digest()).decode()
        refused = await patch(client, url, first, b"garbage" * 100_000, **{"Upload-Checksum": wrong})
        assert refused.status_code == 460
        # The network drops in the middle of the next body: what arrived is committed, the rest resent.
        _, writer = await open_request(
            url,
            "PATCH",
            TUS | {"Upload-Offset": str(first), "Content-Type": OCTETS, "Content-Length": str(len(payload) - first)},
        )
        writer.write(payload[first:cut])
        await writer.drain()
        writer.close()
        await writer.wait_closed()

        async def committed() -> int:
            upload = await server.parts.store.get(upload_id)
            return -1 if upload is None else upload.offset

        await eventually(committed, lambda offset: offset == cut)
        done = await patch(client, url, cut, payload[cut:])
    assert done.status_code == 204 and done.headers["ArtStore-Upload-Status"] == "completed"
    assert server.parts.sagas.followers.used == 1
    assert_stored_brotli_of(s3_element, payload)


@pytest.mark.parametrize("how", ["incompressible type", "no follower room"])
async def test_without_a_follower_the_saga_compresses_as_it_reads_or_stores_as_received(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any], how: str
) -> None:
    server = await follower_server(start_server, tmp_path, s3_element)
    followers = server.parts.sagas.followers
    if how == "no follower room":
        followers.capacity = 0  # set on the running node: test-only
    payload = jpeg_payload(9 * MiB) if how == "incompressible type" else text_payload(9 * MiB)
    async with server.client() as client:
        url = await create(client, len(payload), "photo.jpg" if how == "incompressible type" else "server.log")
        first = await patch(client, url, 0, payload[: 4 * MiB])
        assert first.status_code == 204
        last = await patch(client, url, 4 * MiB, payload[4 * MiB :])
    assert last.headers["ArtStore-Upload-Status"] == "completed"
    assert followers.used == 0 and len(followers) == 0
    if how == "incompressible type":
        stored, attr = split_stored(bucket_objects(s3_element))
        assert stored["body"] == payload and attr["compression"] is None
    else:
        assert_stored_brotli_of(s3_element, payload)


async def test_a_terminated_upload_leaves_no_follower_and_no_spool(
    start_server: ServerFactory, tmp_path: Path, s3_element: dict[str, Any]
) -> None:
    server = await follower_server(start_server, tmp_path, s3_element)
    followers = server.parts.sagas.followers
    payload = text_payload(10 * MiB)
    async with server.client() as client:
        url = await create(client, len(payload))
        upload_id = url.rstrip("/").rsplit("/", 1)[1]
        assert (await patch(client, url, 0, payload[: 4 * MiB])).status_code == 204
        assert len(followers) == 1
        assert (await client.delete(url, headers=TUS)).status_code == 204

    async def following() -> int:
        return len(followers)

    await eventually(following, lambda count: count == 0)
    assert await server.parts.staging.last_written(upload_id) is None
    assert bucket_objects(s3_element) == {}
