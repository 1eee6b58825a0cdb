"""Running digests (issue 16): staging hashes the bytes as it writes them, the kept state is
exactly that of the committed prefix (never of a refused or uncommitted body), a node without it
rebuilds it from staging, and the finaliser stores a complete upload without reading it again: a
directory element on staging's file system gets the staged file by hard link, any other by copy."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fixtures.rawhttp import eventually, open_request
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, _server_factory
from tusingest.sessions.content import digest_tag
from tusingest.staging import RunningDigest

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
async def start_node(tmp_path: Path, postgres_url: str) -> AsyncIterator[ServerFactory]:
    """Nodes that share one PostgreSQL database and one staging directory."""
    async with _server_factory(tmp_path, postgres_url) as factory:
        yield factory


def patch_headers(offset: int, **extra: str) -> dict[str, str]:
    return TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS} | extra


async def create(client: httpx.AsyncClient, length: int) -> str:
    response = await client.post("/files/", headers=TUS | {"Upload-Length": str(length)})
    assert response.status_code == 201
    return urlsplit(response.headers["Location"]).path


async def kept_digest(server: LiveServer, upload_id: str) -> RunningDigest | None:
    """The running digest the node keeps for the upload at its committed offset (None: none, or one
    that stands before it)."""
    upload = await server.parts.store.get(upload_id)
    assert upload is not None
    tag = digest_tag(upload)
    assert tag is not None
    kept = server.parts.staging.digests.take(upload_id, tag, upload.offset)
    return kept if kept is not None and kept.offset == upload.offset else None


def assert_digest_of(digest: RunningDigest | None, data: bytes) -> None:
    assert digest is not None
    assert digest.offset == len(data)
    assert digest.md5.hexdigest() == hashlib.md5(data).hexdigest()
    assert digest.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("patch_size", [3 * MiB, 256 * KiB + 7], ids=["one PATCH", "many PATCHes"])
async def test_the_kept_digest_equals_hashlib_over_the_committed_bytes(
    start_sqlite_server: ServerFactory, patch_size: int
) -> None:
    server = await start_sqlite_server(staging_write_buffer_kb=64)  # many batches per PATCH
    payload = os.urandom(3 * MiB)
    async with server.client() as client:
        url = await create(client, len(payload) + 1)  # one byte short: the upload stays in staging
        for offset in range(0, len(payload), patch_size):
            response = await client.patch(url, headers=patch_headers(offset), content=payload[offset:][:patch_size])
            assert response.status_code == 204
    assert_digest_of(await kept_digest(server, url.rsplit("/", 1)[1]), payload)


async def test_a_patch_cut_off_mid_body_keeps_the_digest_of_what_was_committed_and_resumes_it(
    start_sqlite_server: ServerFactory,
) -> None:
    server = await start_sqlite_server(staging_write_buffer_kb=64)
    payload = os.urandom(1 * MiB)
    half = len(payload) // 2 + 12345
    async with server.client() as client:
        url = await create(client, len(payload) + 1)
        upload_id = url.rsplit("/", 1)[1]
        _, writer = await open_request(
            server.url + url, "PATCH", patch_headers(0) | {"Content-Length": str(len(payload))}
        )
        writer.write(payload[:half])
        await writer.drain()
        writer.close()  # the network drops mid-body
        await writer.wait_closed()

        async def committed() -> int:
            upload = await server.parts.store.get(upload_id)
            return -1 if upload is None else upload.offset

        await eventually(committed, lambda offset: offset == half)
        assert_digest_of(await kept_digest(server, upload_id), payload[:half])
        rest = await client.patch(url, headers=patch_headers(half), content=payload[half:])
    assert rest.status_code == 204
    assert_digest_of(await kept_digest(server, upload_id), payload)


async def test_a_body_refused_by_its_checksum_never_enters_the_digest(start_sqlite_server: ServerFactory) -> None:
    import base64

    server = await start_sqlite_server()
    first, second = os.urandom(200 * KiB), os.urandom(300 * KiB)
    wrong = "sha256 " + base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    right = "sha256 " + base64.b64encode(hashlib.sha256(second).digest()).decode()
    async with server.client() as client:
        url = await create(client, len(first) + len(second) + 1)
        upload_id = url.rsplit("/", 1)[1]
        assert (await client.patch(url, headers=patch_headers(0), content=first)).status_code == 204
        refused = await client.patch(
            url, headers=patch_headers(len(first), **{"Upload-Checksum": wrong}), content=second
        )
        assert refused.status_code == 460
        assert_digest_of(await kept_digest(server, upload_id), first)
        accepted = await client.patch(
            url, headers=patch_headers(len(first), **{"Upload-Checksum": right}), content=second
        )
    assert accepted.status_code == 204
    assert_digest_of(await kept_digest(server, upload_id), first + second)


@pytest.mark.parametrize("algorithm", ["md5", "sha256", "sha1"])
async def test_a_first_patch_s_checksum_is_checked_against_the_running_digest_where_it_can_be(
    start_sqlite_server: ServerFactory, algorithm: str
) -> None:
    """From offset 0 an MD5 or SHA-256 Upload-Checksum is the running digest's (sha1: its own hash)."""
    import base64

    server = await start_sqlite_server(staging_write_buffer_kb=64)
    body = os.urandom(700 * KiB)

    def checksum(data: bytes) -> str:
        return f"{algorithm} " + base64.b64encode(hashlib.new(algorithm, data).digest()).decode()

    async with server.client() as client:
        url = await create(client, len(body) + 1)
        upload_id = url.rsplit("/", 1)[1]
        wrong = await client.patch(url, headers=patch_headers(0, **{"Upload-Checksum": checksum(b"x")}), content=body)
        assert wrong.status_code == 460
        assert await server.parts.staging.staged_size(upload_id) == 0
        right = await client.patch(url, headers=patch_headers(0, **{"Upload-Checksum": checksum(body)}), content=body)
    assert right.status_code == 204 and right.headers["Upload-Offset"] == str(len(body))
    assert_digest_of(await kept_digest(server, upload_id), body)


@pytest.mark.parametrize("sent", ["no checksum", "right sha256", "wrong sha256"])
async def test_hooks_that_read_no_digests_make_staging_hash_nothing(
    start_sqlite_server: ServerFactory, sent: str
) -> None:
    """Only hooks that use the running digests pay for them: with PlainHooks (the tus path alone, as
    benchmarks/compare.py's tus-path variant runs it) staging keeps none, and an Upload-Checksum is
    still checked, by the checksum's own hash. The hooks are swapped in the running app: a test-only
    move, the way benchmarks/serve_patched.py swaps them."""
    import base64

    from tusingest.tus import PlainHooks

    server = await start_sqlite_server(staging_write_buffer_kb=64)
    server.parts.tus.ctx.hooks = PlainHooks(server.parts.store)
    body = os.urandom(700 * KiB)
    headers = patch_headers(0)
    if sent != "no checksum":
        hashed = hashlib.sha256(body if sent == "right sha256" else b"x").digest()
        headers |= {"Upload-Checksum": "sha256 " + base64.b64encode(hashed).decode()}
    async with server.client() as client:
        url = await create(client, len(body))
        upload_id = url.rsplit("/", 1)[1]
        response = await client.patch(url, headers=headers, content=body)
        assert response.status_code == (460 if sent == "wrong sha256" else 204)
        head = await client.head(url, headers=TUS)
    assert head.headers["Upload-Offset"] == ("0" if sent == "wrong sha256" else str(len(body)))
    assert len(server.parts.staging.digests) == 0
    upload = await server.parts.store.get(upload_id)
    assert upload is not None and (upload.offset == len(body)) is (sent != "wrong sha256")


@pytest.mark.directory_staging
async def test_nodes_that_take_turns_rebuild_and_catch_up_the_digest_from_staging(start_node: ServerFactory) -> None:
    """Round robin over two nodes: the second rebuilds the state from the staged prefix, the first
    catches up from where it stood, and the file is registered with the right digests."""
    first_node, second_node = await start_node(), await start_node()
    payload = os.urandom(2 * MiB)
    half = len(payload) // 2
    tail = b"0123456789" * 2
    async with first_node.client() as one, second_node.client() as two:
        url = await create(one, len(payload) + len(tail))
        upload_id = url.rsplit("/", 1)[1]
        assert (await one.patch(url, headers=patch_headers(0), content=payload[:half])).status_code == 204
        assert await kept_digest(second_node, upload_id) is None  # like a restarted node: it holds nothing
        assert (await two.patch(url, headers=patch_headers(half), content=payload[half:])).status_code == 204
        assert_digest_of(await kept_digest(second_node, upload_id), payload)
        # The first node's state stands at the old offset: it hashes the second node's bytes to catch up.
        stale = await first_node.parts.store.get(upload_id)
        assert stale is not None
        tag = digest_tag(stale)
        assert tag is not None
        kept = first_node.parts.staging.digests.take(upload_id, tag, stale.offset)
        assert kept is not None and kept.offset == half
        assert (await one.patch(url, headers=patch_headers(len(payload)), content=tail[:10])).status_code == 204
        assert_digest_of(await kept_digest(first_node, upload_id), payload + tail[:10])
        done = await two.patch(url, headers=patch_headers(len(payload) + 10), content=tail[10:])
        assert done.status_code == 204
    record = await second_node.parts.saga_store.file_for_upload(upload_id)
    whole = payload + tail
    assert record is not None
    assert (record.md5, record.sha256) == (hashlib.md5(whole).hexdigest(), hashlib.sha256(whole).hexdigest())


async def test_a_node_that_would_read_back_too_much_keeps_no_digest_and_the_finaliser_hashes_the_file(
    start_node: ServerFactory,
) -> None:
    """Past ``digest_catch_up_bytes`` a writer hashes nothing (no prefix read on the request path);
    the file is still registered with the right digests, taken as the finaliser reads it."""
    first_node, second_node = await start_node(), await start_node()
    second_node.parts.staging.digest_catch_up_bytes = 256 * KiB  # set on the running node: test-only
    payload = os.urandom(2 * MiB)
    half = len(payload) // 2
    async with first_node.client() as one, second_node.client() as two:
        url = await create(one, len(payload) + 1)
        upload_id = url.rsplit("/", 1)[1]
        assert (await one.patch(url, headers=patch_headers(0), content=payload[:half])).status_code == 204
        assert (await two.patch(url, headers=patch_headers(half), content=payload[half:])).status_code == 204
        assert await kept_digest(second_node, upload_id) is None
        done = await two.patch(url, headers=patch_headers(len(payload)), content=b"!")
        assert done.status_code == 204
    record = await second_node.parts.saga_store.file_for_upload(upload_id)
    whole = payload + b"!"
    assert record is not None
    assert (record.md5, record.sha256) == (hashlib.md5(whole).hexdigest(), hashlib.sha256(whole).hexdigest())


async def test_a_concatenated_upload_is_hashed_at_finalisation_and_its_partials_keep_no_digest(
    start_sqlite_server: ServerFactory,
) -> None:
    server = await start_sqlite_server()
    parts = [os.urandom(300 * KiB), os.urandom(200 * KiB)]
    async with server.client() as client:
        paths = []
        for part in parts:
            created = await client.post(
                "/files/", headers=TUS | {"Upload-Length": str(len(part)), "Upload-Concat": "partial"}
            )
            path = urlsplit(created.headers["Location"]).path
            assert (await client.patch(path, headers=patch_headers(0), content=part)).status_code == 204
            paths.append(path)
        final = await client.post("/files/", headers=TUS | {"Upload-Concat": "final;" + " ".join(paths)})
    assert final.status_code == 201 and final.headers["ArtStore-Upload-Status"] == "completed"
    assert len(server.parts.staging.digests) == 0
    record = await server.parts.saga_store.file_for_upload(final.headers["Location"].rsplit("/", 1)[1])
    whole = b"".join(parts)
    assert record is not None
    assert (record.md5, record.sha256) == (hashlib.md5(whole).hexdigest(), hashlib.sha256(whole).hexdigest())


@pytest.mark.directory_staging
@pytest.mark.parametrize("staging_on", ["same file system", "another file system"])
async def test_the_placed_object_is_the_staged_file_by_hard_link_on_one_file_system_and_a_copy_across(
    start_sqlite_server: ServerFactory, tmp_path: Path, staging_on: str
) -> None:
    staging = tmp_path / "staging"
    if staging_on == "another file system":
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.fail("this test needs a second file system: a tmpfs at /dev/shm")
        staging = shm / f"tusingest-test-{os.getpid()}-{id(tmp_path)}"
    # The saga stops once the object is placed, so the staged file is still there to compare.
    server = await start_sqlite_server(
        staging_dir=str(staging), saga_failpoints="placed=pause", finalise_wait_seconds=0.1
    )
    payload = os.urandom(5 * MiB + 3)
    try:
        async with server.client() as client:
            url = await create(client, len(payload))
            upload_id = url.rsplit("/", 1)[1]
            last = await client.patch(url, headers=patch_headers(0), content=payload)
        assert last.status_code == 204

        async def placed_key() -> str | None:
            # A small file's "placed" is not in the saga log: the failpoint records that it was reached.
            saga = await server.parts.saga_store.latest_saga("upload", upload_id)
            if saga is None or "placed" not in server.parts.sagas.failpoints.reached:
                return None
            return str(saga.data["key"])

        key = await eventually(placed_key, lambda found: found is not None)
        assert key is not None
        placed = Path(server.settings.default_element_dir, *key.split("/"))
        (chunk,) = (staging / upload_id).glob("*.chunk")
        if staging_on == "same file system":
            assert placed.stat().st_ino == chunk.stat().st_ino and placed.stat().st_nlink == 2
        else:
            assert placed.stat().st_ino != chunk.stat().st_ino and placed.stat().st_nlink == 1
        stored = placed.read_bytes()
        assert stored == payload and hashlib.sha256(stored).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert chunk.read_bytes() == payload  # staging intact: a retry on another element still has the bytes
    finally:
        if staging_on == "another file system":
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
