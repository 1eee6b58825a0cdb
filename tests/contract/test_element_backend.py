"""The Storage Element backend contract: a directory and an S3 bucket (moto) store, stream, describe,
copy, list and delete objects the same way; a failed or cancelled put leaves nothing behind, and
what a killed one leaves is removed by discard_incomplete (per key) and sweep_incomplete (by age);
and a 200 MiB put streams through bounded memory. The S3 specifics (multipart layout, shared clients,
an unreachable server) follow the shared suite."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import pytest

from tests.fixtures.killed_put import killed_put
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, s3_client
from tusingest.app import element_settings
from tusingest.config import Settings, load_settings
from tusingest.elements.backend import Backend, BackendError, InvalidKey, ObjectNotFound
from tusingest.elements.backends import open_backend
from tusingest.elements.directory import DirectoryBackend, is_temp_name
from tusingest.elements.model import StorageElement
from tusingest.elements.s3 import S3Access, S3Backend, S3ClientPool
from tusingest.staging import StagedObject

MiB = 1 << 20
PART = 5 * MiB  # the S3 minimum, so multipart paths run on small objects


class SourceFailed(Exception):
    """Raised by a test's source stream; a put must let it through unchanged."""


async def stream(data: bytes, chunk_size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


async def odd_chunks(data: bytes, sizes: Iterable[int] = (777_777, 1, 3 * MiB + 5, 65_536)) -> AsyncIterator[bytes]:
    """data in chunks of uneven sizes, cycling through sizes."""
    start, pattern = 0, list(sizes)
    while start < len(data):
        size = pattern[0]
        pattern.append(pattern.pop(0))
        yield data[start : start + size]
        start += size


async def until_set(event: asyncio.Event, put: asyncio.Task[Any]) -> None:
    """Wait for event, or fail with the put's own outcome if the put ends first."""
    waiting = asyncio.ensure_future(event.wait())
    await asyncio.wait([waiting, put], return_when=asyncio.FIRST_COMPLETED)
    if not event.is_set():
        waiting.cancel()
        pytest.fail(f"the put ended before the stream stalled: {put.exception() or put.result()!r}")


async def read(backend: Backend, key: str) -> bytes:
    return b"".join([chunk async for chunk in backend.get(key)])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_element(element_id: str, endpoint: str, bucket: str, prefix: str = "files") -> StorageElement:
    return StorageElement.model_validate(
        {
            "element_id": element_id,
            "mode": "edit",
            "backend": "s3",
            "endpoint": endpoint,
            "bucket": bucket,
            "prefix": prefix,
        }
    )


def moto_environ(element: StorageElement) -> dict[str, str]:
    """Per-element moto credentials, as a deployment would set them."""
    return {f"ELEMENT_{element.env_name}_{name}": value for name, value in MOTO_CREDENTIALS.items()}


async def open_test_backend(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, settings: Settings, s3_clients: S3ClientPool
) -> Backend:
    if kind == "directory":
        element = StorageElement.model_validate(
            {"element_id": "dir-1", "mode": "edit", "backend": "directory", "path": str(tmp_path / "element")}
        )
        return open_backend(element, element_settings(settings, {}).s3, s3_clients)
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    element = s3_element("s3-1", endpoint, bucket)
    return open_backend(element, element_settings(settings, moto_environ(element)).s3, s3_clients)


@pytest.fixture
def settings() -> Settings:
    return load_settings(chunk_size_mb=PART // MiB)


@pytest.fixture
async def s3_clients(settings: Settings) -> AsyncIterator[S3ClientPool]:
    pool = S3ClientPool.from_settings(element_settings(settings).s3)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(params=["directory", "s3"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, settings: Settings, s3_clients: S3ClientPool
) -> AsyncIterator[Backend]:
    implementation = await open_test_backend(request.param, request, tmp_path, settings, s3_clients)
    try:
        yield implementation
    finally:
        await implementation.close()


@pytest.fixture
def leftovers(backend: Backend, s3_clients: S3ClientPool) -> Callable[[], Awaitable[list[str]]]:
    """What a put may leave behind where readers do not look: temp files, open multipart uploads."""

    async def temp_files() -> list[str]:
        assert isinstance(backend, DirectoryBackend)
        return sorted(str(path) for path in backend.root.rglob("*") if is_temp_name(path.name))

    async def multipart_uploads() -> list[str]:
        assert isinstance(backend, S3Backend)
        client = await s3_clients.client(backend.access)
        response = await client.list_multipart_uploads(Bucket=backend.bucket)
        return sorted(upload["Key"] for upload in response.get("Uploads", []))

    return temp_files if isinstance(backend, DirectoryBackend) else multipart_uploads


@pytest.fixture
def sibling(backend: Backend, s3_clients: S3ClientPool, tmp_path: Path) -> Backend:
    """Another element of the same kind on the same store: another prefix, another directory."""
    if isinstance(backend, DirectoryBackend):
        return DirectoryBackend("dir-2", tmp_path / "sibling")
    assert isinstance(backend, S3Backend)
    return S3Backend("s3-2", bucket=backend.bucket, prefix="copies", access=backend.access, clients=s3_clients)


@pytest.fixture
def other_kind(backend: Backend, s3_clients: S3ClientPool, tmp_path: Path) -> Backend:
    if isinstance(backend, DirectoryBackend):
        return S3Backend("s3-x", bucket="b", access=S3Access("http://127.0.0.1:9"), clients=s3_clients)
    return DirectoryBackend("dir-x", tmp_path / "other")


@pytest.fixture
def broken(backend: Backend, s3_clients: S3ClientPool, tmp_path: Path) -> Backend:
    """An element of the same kind that cannot work: a missing bucket, a root that is a file."""
    if isinstance(backend, S3Backend):
        return S3Backend("s3-broken", bucket="no-such-bucket", access=backend.access, clients=s3_clients)
    (tmp_path / "a-file").write_bytes(b"not a directory")
    return DirectoryBackend("dir-broken", tmp_path / "a-file")


# --- put and get ------------------------------------------------------------------------------


async def test_put_with_a_known_length_stores_the_bytes(backend: Backend) -> None:
    data = os.urandom(300_000)
    info = await backend.put("2026/11/28/12/known.bin", stream(data), length=len(data))
    assert (info.key, info.size) == ("2026/11/28/12/known.bin", len(data))
    assert sha256(await read(backend, "2026/11/28/12/known.bin")) == sha256(data)


async def test_put_with_an_unknown_length_stores_the_bytes(backend: Backend) -> None:
    data = os.urandom(300_000)
    info = await backend.put("unknown.bin", stream(data))
    assert info.size == len(data)
    assert sha256(await read(backend, "unknown.bin")) == sha256(data)


@pytest.mark.parametrize("announced", [True, False], ids=["known-length", "unknown-length"])
async def test_put_of_several_parts_in_odd_sized_chunks_round_trips(backend: Backend, announced: bool) -> None:
    data = os.urandom(12 * MiB + 12_345)  # three parts of 5 MiB, the last one short
    info = await backend.put("big/odd.bin", odd_chunks(data), length=len(data) if announced else None)
    assert info.size == len(data)
    head = await backend.head("big/odd.bin")
    assert head is not None and head.size == len(data)
    assert sha256(await read(backend, "big/odd.bin")) == sha256(data)


@pytest.mark.parametrize("size", [PART, PART + 1], ids=["exactly-one-part", "one-part-and-a-byte"])
async def test_put_at_the_part_boundary_round_trips(backend: Backend, size: int) -> None:
    data = os.urandom(size)
    await backend.put("edge.bin", odd_chunks(data))
    assert sha256(await read(backend, "edge.bin")) == sha256(data)


@pytest.mark.parametrize("length", [0, None], ids=["known-length", "unknown-length"])
async def test_put_of_an_empty_stream_stores_an_empty_object(backend: Backend, length: int | None) -> None:
    info = await backend.put("empty", stream(b""), length=length)
    assert info.size == 0
    head = await backend.head("empty")
    assert head is not None and head.size == 0
    assert await read(backend, "empty") == b""


async def test_get_streams_chunks_of_at_most_1_mib(backend: Backend) -> None:
    data = os.urandom(3 * MiB + 17)
    await backend.put("chunks.bin", stream(data, MiB))
    chunks = [chunk async for chunk in backend.get("chunks.bin")]
    assert b"".join(chunks) == data
    assert max(len(chunk) for chunk in chunks) <= MiB


@pytest.mark.parametrize("start", [1, MiB, 3 * MiB + 16], ids=["one", "a-chunk", "last-byte"])
async def test_get_from_a_start_streams_the_rest_of_the_object(backend: Backend, start: int) -> None:
    data = os.urandom(3 * MiB + 17)
    await backend.put("ranged.bin", stream(data, MiB))
    assert b"".join([chunk async for chunk in backend.get("ranged.bin", start=start)]) == data[start:]


async def test_get_of_a_missing_key_raises_object_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound) as raised:
        await read(backend, "missing/key.bin")
    assert raised.value.key == "missing/key.bin"
    assert raised.value.transient is False


async def test_put_replaces_the_object_and_its_attributes(backend: Backend) -> None:
    await backend.put("k", stream(b"first version"), content_type="text/plain", metadata={"v": "1"})
    await backend.put("k", stream(b"second"), content_type="application/json")
    assert await read(backend, "k") == b"second"
    head = await backend.head("k")
    assert head is not None
    assert (head.size, head.content_type, head.content_encoding, dict(head.metadata)) == (
        6,
        "application/json",
        None,
        {},
    )


@pytest.mark.parametrize("length", [10, 3], ids=["stream-shorter", "stream-longer"])
async def test_a_stream_that_does_not_match_the_announced_length_is_refused_and_stores_nothing(
    backend: Backend, leftovers: Callable[[], Awaitable[list[str]]], length: int
) -> None:
    with pytest.raises(BackendError) as raised:
        await backend.put("wrong-length", stream(b"12345"), length=length)
    assert raised.value.transient is False
    assert await backend.head("wrong-length") is None
    assert await leftovers() == []


# --- attributes -------------------------------------------------------------------------------


async def test_head_reports_size_type_encoding_and_metadata_with_lower_cased_names(backend: Backend) -> None:
    data = os.urandom(1000)
    put = await backend.put(
        "described.txt.gz",
        stream(data),
        length=len(data),
        content_type="text/plain; charset=utf-8",
        content_encoding="gzip",
        metadata={"Upload-Id": "abc123", "sha256": sha256(data)},
    )
    head = await backend.head("described.txt.gz")
    assert head == put
    assert head is not None
    assert (head.key, head.size, head.content_type, head.content_encoding) == (
        "described.txt.gz",
        1000,
        "text/plain; charset=utf-8",
        "gzip",
    )
    assert dict(head.metadata) == {"upload-id": "abc123", "sha256": sha256(data)}
    # Stored as given: a Content-Encoding is a label here, not something to undo on the way out.
    assert await read(backend, "described.txt.gz") == data


async def test_head_of_a_missing_key_is_none(backend: Backend) -> None:
    assert await backend.head("nothing/here") is None


# --- delete -----------------------------------------------------------------------------------


async def test_delete_returns_true_then_false_and_the_object_is_gone(backend: Backend) -> None:
    await backend.put("2026/doomed.bin", stream(b"x"))
    assert await backend.delete("2026/doomed.bin") is True
    assert await backend.delete("2026/doomed.bin") is False
    assert await backend.head("2026/doomed.bin") is None
    assert [key async for key in backend.list_keys()] == []


# --- failures leave nothing behind ------------------------------------------------------------


@pytest.mark.parametrize("fail_after", [100_000, 6 * MiB], ids=["within-one-part", "after-a-part"])
async def test_a_source_that_fails_midway_leaves_no_object_and_nothing_behind(
    backend: Backend, leftovers: Callable[[], Awaitable[list[str]]], fail_after: int
) -> None:
    async def failing() -> AsyncIterator[bytes]:
        async for chunk in stream(os.urandom(fail_after), MiB // 2):
            yield chunk
        raise SourceFailed("client went away")

    with pytest.raises(SourceFailed):
        await backend.put("a/failed.bin", failing())
    assert await backend.head("a/failed.bin") is None
    assert await leftovers() == []


async def test_a_failed_put_over_an_existing_object_keeps_the_old_object(
    backend: Backend, leftovers: Callable[[], Awaitable[list[str]]]
) -> None:
    await backend.put("kept.bin", stream(b"old content"), content_type="text/plain")

    async def failing() -> AsyncIterator[bytes]:
        yield os.urandom(6 * MiB)
        raise SourceFailed("client went away")

    with pytest.raises(SourceFailed):
        await backend.put("kept.bin", failing())
    assert await read(backend, "kept.bin") == b"old content"
    head = await backend.head("kept.bin")
    assert head is not None and head.content_type == "text/plain"
    assert await leftovers() == []


@pytest.mark.parametrize("sent", [MiB, 6 * MiB], ids=["within-one-part", "after-a-part"])
async def test_cancelling_a_put_midway_leaves_no_object_and_nothing_behind(
    backend: Backend, leftovers: Callable[[], Awaitable[list[str]]], sent: int
) -> None:
    stalled = asyncio.Event()

    async def stalling() -> AsyncIterator[bytes]:
        async for chunk in stream(os.urandom(sent), MiB):
            yield chunk
        stalled.set()
        await asyncio.Event().wait()  # a client that stops sending
        yield b""

    put = asyncio.create_task(backend.put("a/cancelled.bin", stalling()))
    await until_set(stalled, put)
    in_progress = await leftovers()
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert await backend.head("a/cancelled.bin") is None
    assert await leftovers() == []
    # Past a part the cancellation hit an upload in progress (a temp file, an open multipart upload).
    # Within one part nothing is on the element yet: a directory makes its temp file with its first
    # full batch (or at the commit), S3 sends a small object in one PUT.
    assert len(in_progress) == (1 if sent > PART else 0)


# --- what a killed put leaves ----------------------------------------------------------------


def element_of(backend: Backend) -> tuple[StorageElement, dict[str, str]]:
    """The element description (and credentials) that opens backend again, in another process."""
    if isinstance(backend, DirectoryBackend):
        element = StorageElement.model_validate(
            {"element_id": backend.element_id, "mode": "edit", "backend": "directory", "path": str(backend.root)}
        )
        return element, {}
    assert isinstance(backend, S3Backend) and backend.access.endpoint_url is not None
    element = s3_element(backend.element_id, backend.access.endpoint_url, backend.bucket, backend.prefix)
    return element, moto_environ(element)


@pytest.fixture
def begun(backend: Backend, s3_clients: S3ClientPool) -> Callable[[], Awaitable[list[datetime]]]:
    """When each leftover was begun, as the store records it (temp file mtime, Initiated)."""

    async def temp_files() -> list[datetime]:
        assert isinstance(backend, DirectoryBackend)
        paths = [path for path in backend.root.rglob("*") if is_temp_name(path.name)]
        return [datetime.fromtimestamp(path.stat().st_mtime, UTC) for path in paths]

    async def multipart_uploads() -> list[datetime]:
        assert isinstance(backend, S3Backend)
        client = await s3_clients.client(backend.access)
        response = await client.list_multipart_uploads(Bucket=backend.bucket)
        return [upload["Initiated"] for upload in response.get("Uploads", [])]

    return temp_files if isinstance(backend, DirectoryBackend) else multipart_uploads


async def test_a_put_killed_midway_leaves_what_discard_incomplete_removes_for_its_key_only(
    backend: Backend, leftovers: Callable[[], Awaitable[list[str]]]
) -> None:
    element, environ = element_of(backend)
    # The sidecar's key starts with the object's: an S3 prefix listing finds both.
    await killed_put(element, environ, "a/killed.bin", 6 * MiB)
    await killed_put(element, environ, "a/killed.bin.attr.json", 6 * MiB)
    left = await leftovers()
    assert len(left) == 2

    assert await backend.discard_incomplete("a/killed.bin") == 1
    assert await leftovers() == [entry for entry in left if "attr.json" in entry]
    assert await backend.discard_incomplete("a/killed.bin") == 0
    await backend.put("a/killed.bin", stream(b"put again"))
    assert await read(backend, "a/killed.bin") == b"put again"
    assert await backend.discard_incomplete("a/killed.bin.attr.json") == 1
    assert await leftovers() == []


async def test_discard_incomplete_of_a_key_never_put_removes_nothing(backend: Backend) -> None:
    assert await backend.discard_incomplete("never/put.bin") == 0


async def test_sweep_incomplete_removes_what_killed_puts_began_before_the_cutoff_and_nothing_later(
    backend: Backend,
    leftovers: Callable[[], Awaitable[list[str]]],
    begun: Callable[[], Awaitable[list[datetime]]],
) -> None:
    element, environ = element_of(backend)
    await killed_put(element, environ, "a/killed.bin", 6 * MiB)
    await backend.put("kept.bin", stream(b"a finished object"))
    [started] = await begun()

    assert await backend.sweep_incomplete(started - timedelta(seconds=1)) == 0
    assert len(await leftovers()) == 1
    assert await backend.sweep_incomplete(started + timedelta(seconds=1)) == 1
    assert await leftovers() == []
    assert await read(backend, "kept.bin") == b"a finished object"


async def test_sweep_incomplete_leaves_a_put_in_progress_that_began_after_the_cutoff(
    backend: Backend,
    leftovers: Callable[[], Awaitable[list[str]]],
    begun: Callable[[], Awaitable[list[datetime]]],
) -> None:
    data = os.urandom(6 * MiB + 10)
    halfway = asyncio.Event()
    go_on = asyncio.Event()

    async def pausing() -> AsyncIterator[bytes]:
        yield data[: 6 * MiB]
        halfway.set()
        await go_on.wait()
        yield data[6 * MiB :]

    put = asyncio.create_task(backend.put("busy.bin", pausing()))
    await until_set(halfway, put)
    [started] = await begun()
    assert await backend.sweep_incomplete(started - timedelta(seconds=1)) == 0
    go_on.set()
    await put
    assert await read(backend, "busy.bin") == data
    assert await leftovers() == []


async def test_a_name_of_240_bytes_round_trips_and_a_killed_put_of_it_is_discarded(
    backend: Backend, leftovers: Callable[[], Awaitable[list[str]]]
) -> None:
    key = "a/" + "文" * 79 + ".b"  # 240 bytes in UTF-8, within a file system's 255 per name
    element, environ = element_of(backend)
    await killed_put(element, environ, key, 6 * MiB)
    assert len(await leftovers()) == 1
    assert await backend.discard_incomplete(key) == 1
    await backend.put(key, stream(b"long name"))
    assert await read(backend, key) == b"long name"
    assert await leftovers() == []


# --- copy -------------------------------------------------------------------------------------


async def test_copy_to_an_element_of_the_same_kind_copies_bytes_and_attributes(
    backend: Backend, sibling: Backend
) -> None:
    data = os.urandom(200_000)
    await backend.put(
        "src/object.bin", stream(data), content_type="image/png", content_encoding="br", metadata={"owner": "alice"}
    )
    assert backend.can_copy_to(sibling)
    copied = await backend.copy_to("src/object.bin", sibling, "dst/object.bin")
    assert (copied.key, copied.size) == ("dst/object.bin", len(data))
    assert await read(sibling, "dst/object.bin") == data
    head = await sibling.head("dst/object.bin")
    assert head is not None
    assert (head.content_type, head.content_encoding, dict(head.metadata)) == ("image/png", "br", {"owner": "alice"})
    assert await read(backend, "src/object.bin") == data  # a copy, not a move


async def test_copy_to_of_a_missing_key_raises_object_not_found(backend: Backend, sibling: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        await backend.copy_to("missing", sibling, "anything")


async def test_can_copy_to_is_false_across_kinds(backend: Backend, other_kind: Backend) -> None:
    assert backend.can_copy_to(other_kind) is False
    with pytest.raises(BackendError):
        await backend.copy_to("any", other_kind, "any")


# --- list -------------------------------------------------------------------------------------


async def test_list_keys_yields_keys_relative_to_the_element_under_a_prefix(backend: Backend, sibling: Backend) -> None:
    keys = ["2026/11/a.txt", "2026/11/b.txt", "2026/12/c.txt", "other/d.txt", "top.txt"]
    for key in keys:
        await backend.put(key, stream(key.encode()))
    await sibling.put("2026/11/not-mine.txt", stream(b"x"))

    async def listed(prefix: str = "") -> list[str]:
        return sorted([key async for key in backend.list_keys(prefix)])

    assert await listed() == keys
    assert await listed("2026/11/") == ["2026/11/a.txt", "2026/11/b.txt"]
    assert await listed("2026/1") == ["2026/11/a.txt", "2026/11/b.txt", "2026/12/c.txt"]
    assert await listed("nothing/") == []


async def test_list_keys_does_not_show_a_put_in_progress(backend: Backend) -> None:
    await backend.put("done.bin", stream(b"done"))
    stalled = asyncio.Event()

    async def stalling() -> AsyncIterator[bytes]:
        yield os.urandom(6 * MiB)
        stalled.set()
        await asyncio.Event().wait()
        yield b""

    put = asyncio.create_task(backend.put("busy.bin", stalling()))
    await until_set(stalled, put)
    try:
        assert [key async for key in backend.list_keys()] == ["done.bin"]
    finally:
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put


# --- probe ------------------------------------------------------------------------------------


async def test_probe_of_a_healthy_element_passes(backend: Backend) -> None:
    await backend.probe()


async def test_probe_of_a_broken_element_raises_a_permanent_backend_error(broken: Backend) -> None:
    with pytest.raises(BackendError) as raised:
        await broken.probe()
    assert raised.value.transient is False
    assert broken.element_id in str(raised.value)


# --- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "/absolute", "a/../b", "..", "a/./b", ".", "a\\b", "a\0b", "a//b", "a/", "x" * 1025]
)
async def test_invalid_keys_are_rejected_by_every_operation(backend: Backend, sibling: Backend, key: str) -> None:
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: backend.put(key, stream(b"x")),
        lambda: read(backend, key),
        lambda: backend.head(key),
        lambda: backend.delete(key),
        lambda: backend.copy_to(key, sibling, "fine"),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidKey):
            await attempt()
    assert [k async for k in backend.list_keys()] == []


# --- memory -----------------------------------------------------------------------------------


class PeakRss:
    """Samples this process's resident memory every 20 ms in a thread while the block runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = 0
        self.peak = 0
        self.samples = 0

    def _sample(self) -> None:
        while not self._done.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)
            self.samples += 1

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


# Honest bounds. S3 with 16 MiB parts: the part being read, the part being sent, and (Python
# before 3.12.9) aiohttp's copy of it joined to the request headers, plus overhead. Directory: two
# 4 MiB write batches plus overhead. A materialised 200 MiB object breaks either.
MEMORY_BOUND = {"s3": 64 * MiB, "directory": 32 * MiB}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["directory", "s3"])
async def test_a_200_mib_streamed_put_keeps_memory_flat(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    settings = load_settings(chunk_size_mb=16)
    pool = S3ClientPool.from_settings(element_settings(settings).s3)
    backend = await open_test_backend(kind, request, tmp_path, settings, pool)
    blocks = [os.urandom(256 * 1024) for _ in range(4)]
    total = 200 * MiB

    async def generated() -> AsyncIterator[bytes]:
        for index in range(total // len(blocks[0])):
            # A fresh object per chunk, as a network source gives: a part really holds its bytes.
            yield bytes(memoryview(blocks[index % len(blocks)]))

    try:
        await backend.probe()  # the client, its service model and a connection exist before measuring
        loop = asyncio.get_running_loop()
        with PeakRss() as rss:
            started = loop.time()
            info = await backend.put("big/200mib.bin", generated())
            elapsed = loop.time() - started
        head = await backend.head("big/200mib.bin")
    finally:
        await backend.close()
        await pool.close()
    print(
        f"\n{kind}: 200 MiB put in {elapsed:.2f} s, peak RSS growth {rss.growth / MiB:.1f} MiB ({rss.samples} samples)"
    )
    assert info.size == total and head is not None and head.size == total
    assert rss.samples > 0
    assert rss.growth < MEMORY_BOUND[kind], f"peak RSS grew by {rss.growth / MiB:.1f} MiB"


# --- S3 specifics -----------------------------------------------------------------------------


@pytest.fixture
async def s3_backend(s3_bucket: tuple[str, str], settings: Settings, s3_clients: S3ClientPool) -> S3Backend:
    endpoint, bucket = s3_bucket
    element = s3_element("s3-1", endpoint, bucket)
    backend = open_backend(element, element_settings(settings, moto_environ(element)).s3, s3_clients)
    assert isinstance(backend, S3Backend)
    return backend


def raw_etag(backend: S3Backend, key: str) -> str:
    assert backend.access.endpoint_url is not None
    client = s3_client(backend.access.endpoint_url)
    try:
        etag: str = client.head_object(Bucket=backend.bucket, Key=backend.prefix + key)["ETag"]
        return etag.strip('"')
    finally:
        client.close()


async def test_s3_objects_live_under_the_element_prefix(s3_backend: S3Backend) -> None:
    await s3_backend.put("2026/a.txt", stream(b"a"))
    assert s3_backend.access.endpoint_url is not None
    client = s3_client(s3_backend.access.endpoint_url)
    try:
        listed = client.list_objects_v2(Bucket=s3_backend.bucket)
    finally:
        client.close()
    assert [entry["Key"] for entry in listed["Contents"]] == ["files/2026/a.txt"]


async def test_s3_put_of_up_to_one_part_is_a_single_put_object(s3_backend: S3Backend) -> None:
    await s3_backend.put("known.bin", stream(os.urandom(PART)), length=PART)
    await s3_backend.put("unknown.bin", stream(os.urandom(PART)))
    assert "-" not in raw_etag(s3_backend, "known.bin")
    assert "-" not in raw_etag(s3_backend, "unknown.bin")


async def test_s3_put_of_more_than_one_part_is_a_multipart_upload_of_part_sized_parts(s3_backend: S3Backend) -> None:
    await s3_backend.put("multi.bin", odd_chunks(os.urandom(2 * PART + 1)))
    assert raw_etag(s3_backend, "multi.bin").endswith("-3")


async def test_s3_copy_above_the_copy_threshold_goes_part_by_part_and_keeps_attributes(
    s3_backend: S3Backend, s3_clients: S3ClientPool
) -> None:
    data = os.urandom(2 * PART + 10)
    await s3_backend.put("big.bin", stream(data), content_type="video/mp4", metadata={"owner": "bob"})
    small_copies = S3Backend(
        "s3-1",
        bucket=s3_backend.bucket,
        prefix="files",
        access=s3_backend.access,
        clients=s3_clients,
        copy_part_size=PART,
        multipart_copy_threshold=PART,
    )
    target = S3Backend("s3-2", bucket=s3_backend.bucket, prefix="copies", access=s3_backend.access, clients=s3_clients)
    await small_copies.copy_to("big.bin", target, "big-copy.bin")
    assert await read(target, "big-copy.bin") == data
    head = await target.head("big-copy.bin")
    assert head is not None and (head.content_type, dict(head.metadata)) == ("video/mp4", {"owner": "bob"})
    assert raw_etag(target, "big-copy.bin").endswith("-3")


async def test_s3_copy_needs_the_same_endpoint_and_credentials(s3_backend: S3Backend, s3_clients: S3ClientPool) -> None:
    def elsewhere(**changes: str) -> S3Backend:
        access = dataclasses.replace(s3_backend.access, **changes)
        return S3Backend("s3-2", bucket="other", access=access, clients=s3_clients)

    assert s3_backend.can_copy_to(elsewhere()) is True
    assert s3_backend.can_copy_to(elsewhere(endpoint_url="http://127.0.0.1:1")) is False
    assert s3_backend.can_copy_to(elsewhere(region="eu-west-1")) is False
    assert s3_backend.can_copy_to(elsewhere(access_key_id="someone-else")) is False


async def test_s3_places_a_staged_object_by_a_server_side_copy_with_the_file_s_attributes(
    s3_backend: S3Backend, s3_clients: S3ClientPool
) -> None:
    """``ObjectPlacer``: a sealed upload in S3 staging (same endpoint and keys) becomes the object by a
    copy on the S3 side, with the content type and metadata of the file, not those of the staged object;
    above the copy threshold part by part. Another identity cannot place from it."""
    data = os.urandom(2 * PART + 10)
    await s3_backend.put("staging/u/data", stream(data), metadata={"staged": "yes"})
    source = StagedObject(s3_backend.access, s3_backend.bucket, "files/staging/u/data", len(data))
    assert s3_backend.can_place_from(source)
    info = await s3_backend.place_object("2026/f.bin", source, content_type="video/mp4", metadata={"File-Id": "f1"})
    assert (info.size, info.content_type, dict(info.metadata)) == (len(data), "video/mp4", {"file-id": "f1"})
    head = await s3_backend.head("2026/f.bin")
    assert head is not None and (head.content_type, dict(head.metadata)) == ("video/mp4", {"file-id": "f1"})
    assert await read(s3_backend, "2026/f.bin") == data
    assert "-" not in raw_etag(s3_backend, "2026/f.bin")  # one CopyObject, not a put from here
    part_by_part = S3Backend(
        "s3-1",
        bucket=s3_backend.bucket,
        prefix="files",
        access=s3_backend.access,
        clients=s3_clients,
        copy_part_size=PART,
        multipart_copy_threshold=PART,
    )
    await part_by_part.place_object("2026/g.bin", source, content_type="video/mp4")
    assert await read(part_by_part, "2026/g.bin") == data
    assert raw_etag(part_by_part, "2026/g.bin").endswith("-3")
    stranger = dataclasses.replace(s3_backend.access, access_key_id="someone-else")
    assert not s3_backend.can_place_from(StagedObject(stranger, s3_backend.bucket, source.key, len(data)))
    assert not s3_backend.can_place_from(StagedObject(None, s3_backend.bucket, source.key, len(data)))


async def test_s3_elements_with_the_same_endpoint_and_keys_share_one_client_that_outlives_their_close(
    s3_bucket: tuple[str, str], settings: Settings, s3_clients: S3ClientPool
) -> None:
    endpoint, bucket = s3_bucket
    first_element, second_element = s3_element("one", endpoint, bucket, "a"), s3_element("two", endpoint, bucket, "b")
    environ = moto_environ(first_element) | moto_environ(second_element)
    first = open_backend(first_element, element_settings(settings, environ).s3, s3_clients)
    second = open_backend(second_element, element_settings(settings, environ).s3, s3_clients)
    assert isinstance(first, S3Backend) and isinstance(second, S3Backend)
    await first.put("k", stream(b"one"))
    await first.close()
    await second.put("k", stream(b"two"))
    assert await s3_clients.client(first.access) is await s3_clients.client(second.access)
    assert await read(second, "k") == b"two"


async def test_s3_calls_to_an_unreachable_server_raise_transient_errors_naming_element_and_operation(
    private_moto_server: MotoServer, settings: Settings, s3_clients: S3ClientPool
) -> None:
    element = s3_element("flaky", private_moto_server.url, create_bucket(private_moto_server.url))
    backend = open_backend(element, element_settings(settings, moto_environ(element)).s3, s3_clients)
    await backend.put("k", stream(b"before"))
    private_moto_server.stop()
    with pytest.raises(BackendError) as raised:
        await backend.head("k")
    assert raised.value.transient is True
    assert "flaky" in str(raised.value) and "head_object" in str(raised.value)
    with pytest.raises(BackendError) as probed:
        await backend.probe()
    assert probed.value.transient is True

    private_moto_server.start()  # empty again: moto keeps nothing across restarts
    with pytest.raises(BackendError) as missing:
        await backend.probe()
    assert missing.value.transient is False


async def test_s3_a_put_that_loses_the_server_midway_raises_a_transient_error(
    private_moto_server: MotoServer, settings: Settings, s3_clients: S3ClientPool
) -> None:
    element = s3_element("flaky", private_moto_server.url, create_bucket(private_moto_server.url))
    backend = open_backend(element, element_settings(settings, moto_environ(element)).s3, s3_clients)
    stalled, resume = asyncio.Event(), asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield os.urandom(6 * MiB)  # a multipart upload is open once the stream stalls
        stalled.set()
        await resume.wait()
        yield os.urandom(6 * MiB)

    put = asyncio.create_task(backend.put("k", source()))
    await until_set(stalled, put)
    private_moto_server.stop()
    resume.set()
    with pytest.raises(BackendError) as raised:
        await put
    assert raised.value.transient is True
    assert "flaky" in str(raised.value)
    await backend.close()  # returns once the (failing) abort has run its course
