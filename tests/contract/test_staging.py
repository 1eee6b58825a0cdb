"""The staging contract: chunk files on a directory and S3 (a moto server: multipart parts plus a
tail object) keep an upload's committed bytes the same way. Requests of every size append at the
committed offset and are read back exactly after the seal; bytes a writer staged but nobody committed
(a killed node) are never read; a discarded writer leaves staging as it was; a second node (its own
staging object on the same directory or bucket, no running digest of its own) resumes, seals and
removes; removal and the seal leave no object, multipart upload or folder behind."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.fixtures.s3 import (
    MOTO_CREDENTIALS,
    MotoServer,
    bucket_keys,
    create_bucket,
    open_multiparts,
    remove_bucket,
    s3_client,
)
from tusingest.elements.s3 import S3Access, S3ClientPool
from tusingest.staging import DirectoryStaging, Staging, StagingError
from tusingest.staging.s3 import S3Staging

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size, so parts fill on small uploads

type NodeFactory = Callable[[], Staging]


class _Bucket:
    def __init__(self, url: str, bucket: str) -> None:
        self.url, self.bucket = url, bucket

    def keys(self) -> list[str]:
        return bucket_keys(self.url, self.bucket)

    def multiparts(self) -> list[str]:
        return open_multiparts(self.url, self.bucket)


@pytest.fixture(params=["directory", "s3"])
async def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[NodeFactory, _Bucket | None]]:
    """A factory of staging objects that share one store, each as a node of its own would hold it."""
    made: list[Staging] = []
    pools: list[S3ClientPool] = []
    bucket = None
    if request.param == "directory":
        (tmp_path / "shared").mkdir()

        def node() -> Staging:
            staging = DirectoryStaging(tmp_path / "shared", write_buffer_bytes=256 << 10)
            made.append(staging)
            return staging
    else:
        server: MotoServer = request.getfixturevalue("moto_server")
        bucket = _Bucket(server.url, create_bucket(server.url))
        access = S3Access(
            server.url,
            access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

        def node() -> Staging:
            pool = S3ClientPool()
            pools.append(pool)
            staging = S3Staging(
                lambda: pool.client(access),
                bucket.bucket,
                root=tmp_path / f"scratch-{len(made)}",
                part_size=PART,
                closing=pool.close,
            )
            made.append(staging)
            return staging

    try:
        yield node, bucket
    finally:
        for staging in made:
            await staging.aclose()
        if bucket is not None:
            remove_bucket(bucket.url, bucket.bucket)


async def _append(staging: Staging, upload_id: str, offset: int, pieces: list[bytes], tag: str | None = "t") -> int:
    async with await staging.open_writer(upload_id, offset, digest_tag=tag) as writer:
        for piece in pieces:
            await writer.write(piece)
        synced = await writer.sync()
        if writer.digest is not None and writer.digest.offset == synced:
            staging.digests.keep(upload_id, writer.digest)
        return synced


async def _read(staging: Staging, upload_id: str, length: int, start: int = 0) -> bytes:
    return b"".join([b async for b in staging.read(upload_id, length, 1 << 20, start=start)])


def _pieces(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, position = [], 0
    while position < len(data):
        size = rng.choice([1, 100, 65536, 1 << 20, 3 * MiB])
        pieces.append(data[position : position + size])
        position += size
    return pieces


async def test_requests_of_every_size_are_read_back_exactly_after_the_seal(nodes: tuple[NodeFactory, object]) -> None:
    node, _ = nodes
    staging = node()
    rng = random.Random(7)
    data = rng.randbytes(2 * PART + 1234567)
    # Requests ending before, on and after part boundaries.
    cuts = [0, 10, PART - 1, PART, PART + 3, 2 * PART, len(data)]
    for start, end in itertools.pairwise(cuts):
        assert await _append(staging, "u1", start, _pieces(data[start:end], rng)) == end
    digest = staging.digests.take("u1", "t", len(data))
    assert digest is not None and digest.offset == len(data)
    assert digest.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
    assert digest.md5.hexdigest() == hashlib.md5(data).hexdigest()
    await staging.seal("u1", len(data))
    await staging.seal("u1", len(data))  # idempotent
    assert await _read(staging, "u1", len(data)) == data
    assert await _read(staging, "u1", PART + 10, start=PART - 5) == data[PART - 5 : PART + 10]


async def test_bytes_staged_but_never_committed_are_never_read(nodes: tuple[NodeFactory, object]) -> None:
    """A node killed after staging past the commit point: the next writer at the committed offset
    writes other bytes over that range, and only those are read."""
    node, _ = nodes
    staging = node()
    committed = b"a" * (PART - 100)
    assert await _append(staging, "u2", 0, [committed]) == len(committed)
    # Staged, synced, never committed: crosses a part boundary and leaves its own tail.
    await _append(staging, "u2", len(committed), [b"x" * (PART + 500)], tag=None)
    rest = b"b" * (PART + 50)
    end = await _append(staging, "u2", len(committed), [rest], tag=None)
    assert end == len(committed) + len(rest)
    await staging.seal("u2", end)
    assert await _read(staging, "u2", end) == committed + rest


async def test_a_discarded_writer_leaves_staging_as_it_was(nodes: tuple[NodeFactory, object]) -> None:
    node, _ = nodes
    staging = node()
    first = random.Random(1).randbytes(PART + 7)
    await _append(staging, "u3", 0, [first])
    async with await staging.open_writer("u3", len(first), digest_tag=None) as writer:
        await writer.write(b"z" * (PART + 1))
        await writer.discard()
    second = b"q" * 99
    end = await _append(staging, "u3", len(first), [second], tag=None)
    await staging.seal("u3", end)
    assert await _read(staging, "u3", end) == first + second


async def test_another_node_resumes_seals_and_removes(nodes: tuple[NodeFactory, _Bucket | None]) -> None:
    node, bucket = nodes
    a, b = node(), node()
    data = random.Random(3).randbytes(2 * PART + 99)
    await _append(a, "u4", 0, [data[: PART + 10]])
    # b keeps no running digest of u4: it gets one only where it can catch up cheaply, never a wrong one.
    async with await b.open_writer("u4", PART + 10, digest_tag="t") as writer:
        await writer.write(data[PART + 10 :])
        assert await writer.sync() == len(data)
        if writer.digest is not None:
            assert writer.digest.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
    await a.seal("u4", len(data))
    assert await _read(b, "u4", len(data)) == data
    assert await b.list_upload_ids() == ["u4"]
    assert await a.last_written("u4") is not None
    await b.remove("u4")
    await a.aclose()  # its background cleanups have run
    assert await b.list_upload_ids() == []
    assert await b.last_written("u4") is None
    if bucket is not None:
        assert bucket.keys() == [] and bucket.multiparts() == []


async def test_before_the_seal_the_tail_is_readable(nodes: tuple[NodeFactory, object]) -> None:
    """The start inspector reads the first bytes of a small upload that a cut-off request left."""
    node, _ = nodes
    staging = node()
    await _append(staging, "u5", 0, [b"%PDF-1.7 hello"])
    assert staging.reads_unsealed("u5", 14)
    assert await _read(staging, "u5", 14) == b"%PDF-1.7 hello"
    assert await _read(staging, "u5", 14, start=9) == b"hello"


async def test_a_staged_object_no_upload_owns_is_listed_and_removed(nodes: tuple[NodeFactory, _Bucket | None]) -> None:
    """What a creation killed mid-body leaves (parts, no tail: it never synced) is found by the sweep."""
    node, bucket = nodes
    staging = node()
    writer = await staging.open_writer("orphan", 0)
    await writer.write(b"o" * (PART + 1))  # the first part goes up
    await writer.drain()
    await writer.aclose()  # never synced: as a killed node leaves it
    assert "orphan" in await staging.list_upload_ids()
    assert await staging.last_written("orphan") is not None
    await staging.remove("orphan")
    assert await staging.list_upload_ids() == []
    if bucket is not None:
        assert bucket.keys() == [] and bucket.multiparts() == []


async def test_an_empty_upload_seals_and_reads_as_nothing(nodes: tuple[NodeFactory, object]) -> None:
    node, _ = nodes
    staging = node()
    async with await staging.open_writer("u6", 0) as writer:
        await writer.sync()
    await staging.seal("u6", 0)
    assert await _read(staging, "u6", 0) == b""


async def test_a_committed_offset_staging_cannot_account_for_is_an_error(nodes: tuple[NodeFactory, object]) -> None:
    """The store says more than staging holds (lost staging): a StagingError, never made-up bytes."""
    node, _ = nodes
    staging = node()
    await _append(staging, "u7", 0, [b"k" * 1000])
    with pytest.raises(StagingError):
        await staging.open_writer("u7", 2000)


async def test_s3_an_upload_keeps_its_part_size_when_the_setting_changes(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    """CHUNK_SIZE_MB changed in a rolling deploy: an upload begun with 5 MiB parts resumes on a node
    cutting 6 MiB parts with the 5 MiB its tail records, and seals exact; new uploads take 6 MiB."""
    bucket = create_bucket(moto_server.url)
    access = S3Access(
        moto_server.url,
        access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    pool = S3ClientPool()
    old = S3Staging(lambda: pool.client(access), bucket, root=tmp_path / "a", part_size=PART)
    new = S3Staging(lambda: pool.client(access), bucket, root=tmp_path / "b", part_size=PART + MiB)
    try:
        data = random.Random(9).randbytes(3 * PART + 17)
        assert await _append(old, "p1", 0, [data[: PART + 100]]) == PART + 100
        assert await _append(new, "p1", PART + 100, [data[PART + 100 :]]) == len(data)
        await new.seal("p1", len(data))
        assert await _read(new, "p1", len(data)) == data
        assert _part_sizes(moto_server.url, bucket) == []  # completed: no open multipart upload
        assert await _append(new, "p2", 0, [data]) == len(data)
        assert _part_sizes(moto_server.url, bucket) == [PART + MiB, PART + MiB]
    finally:
        await old.aclose()
        await new.aclose()
        await pool.close()
        remove_bucket(moto_server.url, bucket)


def _part_sizes(url: str, bucket: str) -> list[int]:
    client = s3_client(url)
    try:
        sizes = []
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            listed = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            sizes += [part["Size"] for part in listed.get("Parts", [])]
        return sizes
    finally:
        client.close()


async def test_chunk_files_are_listed_and_used_in_one_call_where_the_bytes_are_local_files(
    nodes: tuple[NodeFactory, _Bucket | None],
) -> None:
    """``use_chunk_files``: on a directory the files that hold the first ``length`` bytes, each with its
    share, and what ``use`` made of them (the finaliser reads a head and asks libmagic); on S3 None,
    and ``use`` is never called."""
    node, bucket = nodes
    staging = node()
    data = random.Random(11).randbytes(3 * MiB)
    assert await _append(staging, "u1", 0, [data[: 2 * MiB]]) == 2 * MiB
    assert await _append(staging, "u1", 2 * MiB, [data[2 * MiB :]]) == len(data)
    used: list[list[tuple[Path, int]]] = []

    def head(files: list[tuple[Path, int]]) -> bytes:
        used.append(files)
        return b"".join(path.read_bytes()[:size] for path, size in files)

    found = await staging.use_chunk_files("u1", 2 * MiB + 10, head)
    if bucket is not None:
        assert found is None and used == []
        return
    assert found is not None
    files, result = found
    assert used == [files] and result == data[: 2 * MiB + 10]
    assert sum(size for _, size in files) == 2 * MiB + 10 and all(path.is_file() for path, _ in files)
    assert files == await staging.chunk_files("u1", 2 * MiB + 10)


async def test_an_open_writer_counts_as_staged_before_any_byte_is_in_a_file(
    nodes: tuple[NodeFactory, _Bucket | None],
) -> None:
    """The expiry sweep and the diagnostics see an upload whose body is arriving, although a small one
    has nothing in a file or object yet (a writer at offset 0 makes its file with its first write)."""
    node, _ = nodes
    staging = node()
    async with await staging.open_writer("u1", 0, digest_tag="t") as writer:
        await writer.write(b"x" * 100)  # short of a batch: still in memory
        assert "u1" in await staging.list_upload_ids()
        assert await staging.staged_size("u1") == 100
        await writer.discard()
    assert await staging.staged_size("u1") == 0
