"""A server on S3 staging (STAGING_BACKEND=s3, moto) with an S3 Storage Element on the same endpoint:
an upload sent in PATCHes that cross part boundaries becomes a file that the element copied on the S3
side, and afterwards the staging bucket holds nothing (no object, no multipart upload) and no node
folder is left; a PATCH cut off mid-body commits what the server received; GET of an upload in
progress answers 409 past its last whole part; expiry and the sweep remove staged parts and tails,
also those of a creation no session knows (a node killed before the row was written).

The whole server-facing suite also runs on S3 staging with TUSINGEST_TEST_STAGING=s3 (.ci/run does,
for the tests that concern staging); these tests run in every pass."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, bucket_keys, create_bucket, open_multiparts, remove_bucket
from tests.fixtures.server import OCTETS, TUS, LiveServer, base_settings, live_server
from tests.integration.test_finalise import bucket_objects, element_file, metadata, s3_element, split_stored
from tusingest.sessions.expiry import expire_uploads
from tusingest.sessions.model import utcnow

__all__ = ["s3_element"]  # the fixture, used by name

MiB = 1 << 20
PART = 5 * MiB  # CHUNK_SIZE_MB=5: the S3 minimum, so small uploads cross part boundaries


class StagingBucket:
    def __init__(self, url: str) -> None:
        self.url = url
        self.name = create_bucket(url)

    def keys(self) -> list[str]:
        return bucket_keys(self.url, self.name)

    def multiparts(self) -> list[str]:
        return open_multiparts(self.url, self.name)


@pytest.fixture
def staging_bucket(moto_server: MotoServer) -> Iterator[StagingBucket]:
    bucket = StagingBucket(moto_server.url)
    try:
        yield bucket
    finally:
        remove_bucket(moto_server.url, bucket.name)


@pytest.fixture
async def server(
    tmp_path: Path, sqlite_url: str, staging_bucket: StagingBucket, s3_element: dict[str, Any]
) -> AsyncIterator[LiveServer]:
    settings = base_settings(
        tmp_path,
        sqlite_url,
        staging_backend="s3",
        staging_s3_bucket=staging_bucket.name,
        staging_s3_endpoint_url=staging_bucket.url,
        staging_s3_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        staging_s3_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        chunk_size_mb=5,
        service_discovery_fallback_config=element_file(tmp_path, s3_element),
    )
    async with live_server(settings) as live:
        yield live


async def create(client: httpx.AsyncClient, length: int, name: str = "data.bin") -> str:
    headers = TUS | {"Upload-Length": str(length), "Upload-Metadata": metadata(filename=name)}
    response = await client.post("/files/", headers=headers)
    assert response.status_code == 201, response.text
    return response.headers["Location"]


async def patch(client: httpx.AsyncClient, url: str, offset: int, body: bytes) -> httpx.Response:
    headers = TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS}
    return await client.patch(url, headers=headers, content=body)


def nothing_staged(server: LiveServer, bucket: StagingBucket) -> list[str]:
    scratch = Path(server.settings.staging_dir)
    left = [f"object {k}" for k in bucket.keys()] + [f"multipart upload {k}" for k in bucket.multiparts()]
    return left + [f"scratch {p.name}" for p in scratch.iterdir()] if scratch.exists() else left


async def test_patches_across_parts_become_a_file_copied_on_the_s3_side_and_nothing_is_left(
    server: LiveServer, staging_bucket: StagingBucket, s3_element: dict[str, Any]
) -> None:
    payload = random.Random(21).randbytes(2 * PART + 12345)
    cuts = [0, 3 * MiB, PART + 7, 2 * PART, len(payload)]  # ends before, past and on part boundaries
    async with server.client() as client:
        url = await create(client, len(payload))
        for start, end in itertools.pairwise(cuts):
            response = await patch(client, url, start, payload[start:end])
            assert response.status_code == 204, response.text
            assert response.headers["Upload-Offset"] == str(end)
        assert response.headers.get("ArtStore-File-Id"), response.headers
    stored, attr = split_stored(bucket_objects(s3_element))
    assert stored["body"] == payload
    assert attr["sha256"] == hashlib.sha256(payload).hexdigest() == stored["head"]["Metadata"]["sha256"]
    assert attr["md5"] == hashlib.md5(payload).hexdigest()
    # A put from this process would be a multipart upload of 5 MiB parts, its ETag "<md5 of md5s>-3";
    # a CopyObject makes a single-part object whose ETag is the bytes' own MD5.
    assert stored["head"]["ETag"].strip('"') == hashlib.md5(payload).hexdigest()
    assert await eventually(lambda: _left(server, staging_bucket), lambda left: not left) == []


async def _left(server: LiveServer, bucket: StagingBucket) -> list[str]:
    return nothing_staged(server, bucket)


async def test_a_text_file_is_compressed_and_stored_from_s3_staging(
    server: LiveServer, staging_bucket: StagingBucket, s3_element: dict[str, Any]
) -> None:
    """No follower can read an upload in progress in S3: the saga's own pass compresses it."""
    payload = b"".join(f"line {i}: the quick brown fox jumps over the lazy dog\n".encode() for i in range(260_000))
    assert len(payload) > 2 * PART
    async with server.client() as client:
        url = await create(client, len(payload), "log.txt")
        half = len(payload) // 2
        assert (await patch(client, url, 0, payload[:half])).status_code == 204
        last = await patch(client, url, half, payload[half:])
        assert last.status_code == 204, last.text
    followers = server.parts.sagas.followers
    assert len(followers) == 0 and followers.used == 0  # on directory staging, one would have run
    stored, attr = split_stored(bucket_objects(s3_element))
    assert attr["compression"]["algorithm"] == "brotli"
    assert brotli.decompress(stored["body"]) == payload
    assert attr["sha256"] == hashlib.sha256(payload).hexdigest()
    assert await eventually(lambda: _left(server, staging_bucket), lambda left: not left) == []


async def test_a_patch_cut_off_mid_body_commits_what_the_server_received(server: LiveServer) -> None:
    payload = random.Random(22).randbytes(2 * PART)
    sent = PART + 3 * MiB  # a whole part went up; the rest was in memory when the client went away
    async with server.client() as client:
        url = await create(client, len(payload))
        upload_id = url.rsplit("/", 1)[1]
        headers = TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Content-Length": str(len(payload))}
        _, writer = await open_request(str(httpx.URL(server.url).join(url)), "PATCH", headers)
        writer.write(payload[:sent])
        await writer.drain()
        await eventually(lambda: server.parts.staging.staged_size(upload_id), lambda size: size == sent)
        writer.close()

        async def offset() -> int:
            return int((await client.head(url, headers=TUS)).headers["Upload-Offset"])

        assert await eventually(offset, lambda value: value == sent) == sent
        response = await patch(client, url, sent, payload[sent:])
        assert response.status_code == 204, response.text
        download = await client.get(url)
    assert download.status_code == 200 and download.content == payload


async def test_get_of_an_upload_in_progress_answers_409_past_its_last_whole_part(server: LiveServer) -> None:
    payload = random.Random(23).randbytes(PART + 1000)
    async with server.client() as client:
        url = await create(client, 2 * PART)
        assert (await patch(client, url, 0, payload)).status_code == 204
        whole = await client.get(url)
        assert whole.status_code == 409, whole.text
        assert "once it is complete" in whole.text
        tail = await client.get(url, headers={"Range": f"bytes={PART}-"})
        assert tail.status_code == 206 and tail.content == payload[PART:]


async def test_expiry_and_the_sweep_remove_staged_parts_and_tails(
    server: LiveServer, staging_bucket: StagingBucket
) -> None:
    parts = server.parts
    async with server.client() as client:
        url = await create(client, 2 * PART)
        assert (await patch(client, url, 0, b"e" * (PART + 10))).status_code == 204
    # What a node killed during a creation leaves: a part, no tail, no session row.
    orphan = await parts.staging.open_writer("0123456789abcdef0123456789abcdef", 0)
    await orphan.write(b"o" * (PART + 1))
    await orphan.drain()
    await orphan.aclose()
    assert staging_bucket.keys() and len(staging_bucket.multiparts()) == 2
    later = utcnow() + timedelta(hours=25)
    report = await expire_uploads(parts.store, parts.staging, parts.locker, later, staging_grace=timedelta(hours=1))
    assert (report.expired, report.staging_removed) == (1, 1)
    assert nothing_staged(server, staging_bucket) == []


async def test_staging_s3_going_away_answers_503_with_retry_after_and_the_offset_stays(
    tmp_path: Path, sqlite_url: str, private_moto_server: MotoServer
) -> None:
    """Not a 500: the staged bytes may be fine, the store is not answering; the client retries."""
    bucket = create_bucket(private_moto_server.url)
    settings = base_settings(
        tmp_path,
        sqlite_url,
        staging_backend="s3",
        staging_s3_bucket=bucket,
        staging_s3_endpoint_url=private_moto_server.url,
        staging_s3_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        staging_s3_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        chunk_size_mb=5,
        s3_connect_timeout_seconds=1.0,
    )
    async with live_server(settings) as live, live.client() as client:
        url = await create(client, 4000)
        assert (await patch(client, url, 0, b"a" * 1000)).status_code == 204
        private_moto_server.stop()
        response = await patch(client, url, 1000, b"b" * 1000)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5" and "staging is unavailable" in response.text
        assert (await client.head(url, headers=TUS)).headers["Upload-Offset"] == "1000"
