"""Staging on S3, for nodes that share nothing but the database, Redis and the bucket: any node can
resume, seal or remove any upload, and a node's disk holds only scratch files (spools).

Layout, under ``<prefix><upload id>/`` in the staging bucket, with part size P:
- ``data``: one multipart upload. Parts 1..k hold the upload's bytes ``[0, k·P)`` as whole parts of
  P bytes each; it is created when the first part fills, and completed by ``seal`` into the object
  ``data`` that the finaliser reads.
- ``<offset, 20 digits>.tail``: the bytes ``[k·P, offset)`` after the last whole part, shorter than
  P (maybe empty), written by the ``sync`` of every request that ends at ``offset``. Its metadata
  names the multipart upload, so the committed offset alone leads to the whole committed state:
  ``k = offset // P``, parts 1..k of the upload named by tail ``offset`` (as tusd's S3 store keeps
  an ``.part`` object for what is shorter than a part, but found from our commit point, not from
  listing: a listing may show what was never committed). The tail also records P: an upload keeps
  the part size it began with when CHUNK_SIZE_MB changes under it (a rolling deploy).

A request at committed offset O begins with tail O in memory and sends part k+1 once P bytes are
gathered, the next part's bytes arriving while one is sent. Whatever a request sent beyond what it
committed (a killed node) is garbage by the layout: parts beyond k are sent again or left out of the
completion, tails other than O are never read. Older tails are deleted once a later offset is
committed; the rest (and multipart uploads no tail names) when the upload is sealed or removed.

Parts need not be readable before the seal (S3 cannot read an open multipart upload): before it,
only the tail's bytes can be read (``reads_unsealed``), which covers the first bytes of a small
upload. A node's running digest catches up only across the tail; past that the finaliser hashes the
sealed object once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from botocore.exceptions import BotoCoreError, ClientError

from tusingest.staging.base import StagedObject, StagingError, StagingUnavailable
from tusingest.staging.digests import DigestCache, RunningDigest

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 << 20  # S3: every part but the last holds at least 5 MiB
_TAIL_NAME = re.compile(r"^(\d{20})\.tail$")
_DATA = "data"
_SEALED_REMEMBERED = 4096
_MULTIPART_META = "multipart"  # the tail's metadata key naming the multipart upload
_PART_SIZE_META = "part-size"  # and the one giving the part size of the upload
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"})

type ClientGetter = Callable[[], Awaitable[S3Client]]


class _Missing(StagingError):
    """The object asked for does not exist."""


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class S3StagingWriter:
    """One request's bytes at a committed offset: whole parts go into the multipart upload as they
    fill (one in flight while the next gathers), the rest into a new tail object at ``sync``.

    With a ``RunningDigest``, each part's MD5 and SHA-256 run on staging's threads while the part is
    sent, and the tail's at ``drain`` or ``sync``; ``digest`` then covers exactly the bytes written."""

    def __init__(
        self,
        staging: S3Staging,
        upload_id: str,
        offset: int,
        tail: bytes,
        multipart: str | None,
        digest: RunningDigest | None,
        part_size: int,
    ) -> None:
        self._staging = staging
        self._part_size = part_size  # the upload's own: the part size it began with
        self._upload_id = upload_id
        self._start_offset = offset
        self._buffer = bytearray(tail)
        self._buffer_start = offset - len(tail)  # a part boundary
        self._multipart = multipart
        self._digest = digest
        self._sending: asyncio.Future[Any] | None = None
        self._sending_size = 0  # bytes of the part in flight that its hash covers
        self._closed = False
        staging._writers[upload_id] = self

    @property
    def offset(self) -> int:
        return self._buffer_start + len(self._buffer)

    @property
    def written(self) -> int:
        return self.offset - self._start_offset

    @property
    def digest(self) -> RunningDigest | None:
        return self._digest

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._buffer += data
        part_size = self._part_size
        while len(self._buffer) >= part_size:
            await self._send_part()

    async def _wait_sending(self) -> None:
        if self._sending is not None:
            sending, self._sending = self._sending, None
            hashed, self._sending_size = self._sending_size, 0
            try:
                await sending
            except BaseException:
                self._digest = None  # what went up is unknown now; nothing of it is kept
                raise
            if self._digest is not None:
                self._digest.advance(hashed)

    def _hash_jobs(self, data: bytes, start: int) -> tuple[list[Awaitable[None]], int]:
        """Hash the bytes of ``data`` (which begins at upload offset ``start``) that the digest does
        not cover yet, on two staging threads; returns the jobs and how many bytes they cover."""
        digest = self._digest
        if digest is None:
            return [], 0
        skip = digest.offset - start
        if skip >= len(data):
            return [], 0
        batch = [memoryview(data)[skip:]] if skip else [data]
        loop, executor = asyncio.get_running_loop(), self._staging.executor
        jobs: list[Awaitable[None]] = [
            loop.run_in_executor(executor, digest.update_md5, batch),  # type: ignore[arg-type]
            loop.run_in_executor(executor, digest.update_sha256, batch),  # type: ignore[arg-type]
        ]
        return jobs, len(data) - skip

    async def _send_part(self) -> None:
        await self._wait_sending()
        part_size = self._part_size
        part = bytes(self._buffer[:part_size])
        del self._buffer[:part_size]
        start = self._buffer_start
        self._buffer_start += part_size
        number = start // part_size + 1
        if self._multipart is None:
            self._multipart = await self._staging._create_multipart(self._upload_id)
        hashing, hashed = self._hash_jobs(part, start)
        send = self._staging._upload_part(self._upload_id, self._multipart, number, part)
        self._sending = asyncio.gather(send, *hashing)
        self._sending_size = hashed

    async def drain(self) -> None:
        await self._wait_sending()
        if self._digest is not None and self._digest.offset < self.offset:
            hashing, hashed = self._hash_jobs(bytes(self._buffer), self._buffer_start)
            await asyncio.gather(*hashing)
            self._digest.advance(hashed)

    async def sync(self) -> int:
        await self.drain()
        if self.offset == self._start_offset:
            return self.offset  # nothing new: the committed tail stays the truth
        await self._staging._put_tail(
            self._upload_id, self.offset, bytes(self._buffer), self._multipart, self._part_size
        )
        return self.offset

    async def discard(self) -> None:
        self._buffer.clear()
        self._digest = None
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._staging._writers.get(self._upload_id) is self:
            del self._staging._writers[self._upload_id]
        if self._sending is not None:
            sending, self._sending = self._sending, None
            with contextlib.suppress(StagingError):
                await sending


class S3Staging:
    """Staged bytes in an S3 bucket (see the module's notes); scratch files under ``root``."""

    def __init__(
        self,
        client: ClientGetter,
        bucket: str,
        *,
        prefix: str = "staging/",
        root: str | Path = "./data/staging",
        part_size: int = 10 << 20,
        threads: int = 8,
        digests: DigestCache | None = None,
        closing: Callable[[], Awaitable[None]] | None = None,
        identity: object = None,
    ) -> None:
        """``client`` gives the S3 client to use (borrowed); ``closing`` is awaited by ``aclose``
        (the owner of the client closes it there); ``identity``: the endpoint and credentials the
        client uses, for elements to tell whether they can copy a sealed upload on the S3 side."""
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"an S3 part holds at least {MIN_PART_SIZE} bytes, not {part_size}")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self._client = client
        self._closing = closing
        self.identity = identity
        self.bucket = bucket
        self.prefix = prefix
        self.root = Path(root)
        self.part_size = part_size
        self.digests = digests if digests is not None else DigestCache()
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._writers: dict[str, S3StagingWriter] = {}  # the open writers on this node, by upload
        self._sealed: dict[str, int] = {}  # sizes of sealed uploads seen, oldest first

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="staging")
        return self._executor

    async def aclose(self) -> None:
        """Background cleanups finish first (what they leave, a later seal, removal or sweep takes)."""
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)
        if self._closing is not None:
            await self._closing()

    # -- names ---------------------------------------------------------------------------------

    def _check(self, upload_id: str) -> None:
        if not upload_id or "/" in upload_id or upload_id.startswith("."):
            raise StagingError(f"invalid upload id {upload_id!r}")

    def _folder(self, upload_id: str) -> str:
        self._check(upload_id)
        return f"{self.prefix}{upload_id}/"

    def _data_key(self, upload_id: str) -> str:
        return self._folder(upload_id) + _DATA

    def _tail_key(self, upload_id: str, offset: int) -> str:
        return f"{self._folder(upload_id)}{offset:020d}.tail"

    def directory(self, upload_id: str) -> Path:
        self._check(upload_id)
        return self.root / upload_id  # scratch only: made by the first that writes there

    # -- S3 calls ------------------------------------------------------------------------------

    async def _call[T](self, what: str, call: Callable[[S3Client], Awaitable[T]]) -> T:
        try:
            return await call(await self._client())
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                raise _Missing(f"S3 staging: {what}: no such object") from exc
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or status == 429 or _error_code(exc) in _THROTTLED:
                raise StagingUnavailable(f"S3 staging: {what} failed: {exc}") from exc
            raise StagingError(f"S3 staging: {what} failed: {exc}") from exc
        except BotoCoreError as exc:  # no answer: a connection refused or cut, a timeout
            raise StagingUnavailable(f"S3 staging: {what} failed: {exc}") from exc

    async def _create_multipart(self, upload_id: str) -> str:
        key = self._data_key(upload_id)
        created = await self._call(
            f"create multipart upload of {key}",
            lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=key),
        )
        return created["UploadId"]

    async def _upload_part(self, upload_id: str, multipart: str, number: int, body: bytes) -> None:
        key = self._data_key(upload_id)
        await self._call(
            f"upload of part {number} of {key}",
            lambda c: c.upload_part(Bucket=self.bucket, Key=key, UploadId=multipart, PartNumber=number, Body=body),
        )

    async def _put_tail(self, upload_id: str, offset: int, body: bytes, multipart: str | None, part_size: int) -> None:
        key = self._tail_key(upload_id, offset)
        metadata = {_PART_SIZE_META: str(part_size)} | ({_MULTIPART_META: multipart} if multipart else {})
        await self._call(
            f"put of {key}", lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=metadata)
        )

    def _no_tail(self, upload_id: str, offset: int, exc: _Missing) -> StagingError:
        error = StagingError(f"S3 staging holds no tail of upload {upload_id} at its offset {offset}")
        error.__cause__ = exc
        return error

    def _tail_meta(self, metadata: dict[str, str]) -> tuple[str | None, int]:
        """The multipart upload a tail names, and the part size of its upload (a part size set anew
        applies to uploads begun after it: an upload keeps the one its parts were cut to)."""
        size = metadata.get(_PART_SIZE_META, "")
        return metadata.get(_MULTIPART_META) or None, int(size) if size.isdigit() else self.part_size

    async def _get_tail(self, upload_id: str, offset: int) -> tuple[bytes, str | None, int]:
        """The committed tail at ``offset``: its bytes, the multipart upload it names, the part size."""
        key = self._tail_key(upload_id, offset)

        async def _get(client: S3Client) -> tuple[bytes, dict[str, str]]:
            got = await client.get_object(Bucket=self.bucket, Key=key)
            async with got["Body"] as body:
                return await body.read(), got.get("Metadata", {})

        try:
            data, metadata = await self._call(f"get of {key}", _get)
        except _Missing as exc:
            raise self._no_tail(upload_id, offset, exc) from None
        return (data, *self._tail_meta(metadata))

    async def _head_tail(self, upload_id: str, offset: int) -> tuple[int, str | None, int]:
        key = self._tail_key(upload_id, offset)
        try:
            head = await self._call(f"head of {key}", lambda c: c.head_object(Bucket=self.bucket, Key=key))
        except _Missing as exc:
            raise self._no_tail(upload_id, offset, exc) from None
        return (head["ContentLength"], *self._tail_meta(head.get("Metadata", {})))

    async def _sealed_size(self, upload_id: str, *, fresh: bool = False) -> int | None:
        """The size of the sealed object, None while there is none. A seal is final until the upload
        is removed, so a size once seen is remembered (a finalisation asks several times); ``seal``
        asks S3 itself (``fresh``), so a remembered size never stands in for a new seal."""
        known = None if fresh else self._sealed.get(upload_id)
        if known is not None:
            return known
        self._sealed.pop(upload_id, None)
        key = self._data_key(upload_id)
        try:
            head = await self._call(f"head of {key}", lambda c: c.head_object(Bucket=self.bucket, Key=key))
        except _Missing:
            return None
        size = head["ContentLength"]
        self._sealed[upload_id] = size
        if len(self._sealed) > _SEALED_REMEMBERED:
            del self._sealed[next(iter(self._sealed))]
        return size

    async def _objects(self, upload_id: str) -> list[tuple[str, datetime]]:
        """Every object of the upload: (key, last modified)."""
        folder = self._folder(upload_id)

        async def _list(client: S3Client) -> list[tuple[str, datetime]]:
            found = []
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                found += [(o["Key"], o["LastModified"]) for o in page.get("Contents", [])]
            return found

        return await self._call(f"listing of {folder}", _list)

    async def _multiparts(self, upload_id: str | None = None) -> list[tuple[str, str, datetime]]:
        """Open multipart uploads (key, upload id, initiated) of one upload, or of all."""
        prefix = self._data_key(upload_id) if upload_id is not None else self.prefix

        async def _list(client: S3Client) -> list[tuple[str, str, datetime]]:
            found = []
            paginator = client.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                found += [(u["Key"], u["UploadId"], u["Initiated"]) for u in page.get("Uploads", [])]
            return found

        return await self._call(f"listing of multipart uploads under {prefix}", _list)

    async def _abort(self, key: str, multipart: str) -> None:
        try:
            await self._call(
                f"abort of multipart upload {multipart} of {key}",
                lambda c: c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=multipart),
            )
        except StagingError as exc:
            if "NoSuchUpload" not in str(exc):
                raise

    async def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            await self._call(
                f"delete of {len(batch)} staged object(s)",
                lambda c, batch=batch: c.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                ),
            )

    def _in_background(self, cleanup: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await cleanup
            except StagingError as exc:
                log.warning("S3 staging: %s left for later: %s", what, exc)

        task = asyncio.create_task(run())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _delete_tails_before(self, upload_id: str, offset: int) -> None:
        """Tails of offsets before the committed one: superseded, never read again."""
        old = []
        for key, _ in await self._objects(upload_id):
            match = _TAIL_NAME.match(key.rsplit("/", 1)[-1])
            if match and int(match.group(1)) < offset:
                old.append(key)
        if old:
            await self._delete(old)

    # -- the Staging protocol -------------------------------------------------------------------

    async def open_writer(self, upload_id: str, offset: int, *, digest_tag: str | None = None) -> S3StagingWriter:
        """A writer at the committed ``offset``, which begins with the committed tail in memory. Its
        running digest is this node's (``DigestCache``), caught up across the tail where it stands
        within it, a new one at offset 0, else None (the finaliser hashes the sealed object)."""
        self._check(upload_id)
        tail, multipart, part_size = b"", None, self.part_size
        if offset:
            tail, multipart, part_size = await self._get_tail(upload_id, offset)
            if len(tail) != offset % part_size:
                raise StagingError(f"S3 staging: the tail of upload {upload_id} at {offset} holds {len(tail)} bytes")
            if offset >= part_size and multipart is None:
                raise StagingError(f"S3 staging: the tail of upload {upload_id} at {offset} names no multipart upload")
            self._in_background(self._delete_tails_before(upload_id, offset), f"old tails of upload {upload_id}")
        digest = None
        if digest_tag is not None:
            digest = RunningDigest(digest_tag) if offset == 0 else self.digests.take(upload_id, digest_tag, offset)
            tail_start = offset - len(tail)
            if digest is not None and digest.offset < tail_start:
                digest = None
            elif digest is not None and digest.offset < offset:
                skip = digest.offset - tail_start
                await asyncio.get_running_loop().run_in_executor(self.executor, digest.update, tail[skip:])
        return S3StagingWriter(self, upload_id, offset, tail, multipart, digest, part_size)

    async def seal(self, upload_id: str, length: int) -> None:
        """Complete the multipart upload named by tail ``length`` into ``data``: parts 1..k as they
        are, the tail as the last part (copied on the S3 side); then drop the tails and any other
        multipart upload of the key. An object ``data`` of ``length`` bytes means sealed already; so
        does a seal that fails because another one (a GET, another node's saga) finished first."""
        if await self._sealed_size(upload_id, fresh=True) == length:
            return
        try:
            await self._seal(upload_id, length)
        except StagingError:
            if await self._sealed_size(upload_id, fresh=True) != length:
                raise
        self._in_background(self._drop_unsealed(upload_id), f"the parts and tails of upload {upload_id}")

    async def _seal(self, upload_id: str, length: int) -> None:
        key = self._data_key(upload_id)
        if length == 0:
            tail_size, multipart, part_size = 0, None, self.part_size
        else:
            tail_size, multipart, part_size = await self._head_tail(upload_id, length)
        whole = length // part_size
        if tail_size != length - whole * part_size:
            raise StagingError(f"S3 staging: the tail of upload {upload_id} at {length} holds {tail_size} bytes")
        tail_source = {"Bucket": self.bucket, "Key": self._tail_key(upload_id, length)}
        if multipart is None:
            # Shorter than a part: the object is the tail, copied on the S3 side.
            if whole:
                raise StagingError(f"S3 staging: the tail of upload {upload_id} at {length} names no multipart upload")
            if length == 0:
                await self._call(f"put of {key}", lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=b""))
            else:
                await self._call(
                    f"copy of the tail into {key}",
                    lambda c: c.copy_object(Bucket=self.bucket, Key=key, CopySource=tail_source),  # type: ignore[arg-type]
                )
        else:
            parts = await self._committed_parts(upload_id, multipart, whole, part_size)
            if tail_size:
                copied = await self._call(
                    f"copy of the tail into part {whole + 1} of {key}",
                    lambda c: c.upload_part_copy(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=multipart,
                        PartNumber=whole + 1,
                        CopySource=tail_source,  # type: ignore[arg-type]
                    ),
                )
                parts.append({"PartNumber": whole + 1, "ETag": copied["CopyPartResult"]["ETag"]})
            await self._call(
                f"completion of {key}",
                lambda c: c.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=multipart, MultipartUpload={"Parts": parts}
                ),
            )
        if await self._sealed_size(upload_id, fresh=True) != length:
            raise StagingError(f"S3 staging: the sealed object of upload {upload_id} does not hold {length} bytes")

    async def _committed_parts(
        self, upload_id: str, multipart: str, whole: int, part_size: int
    ) -> list[CompletedPartTypeDef]:
        key = self._data_key(upload_id)

        async def _list(client: S3Client) -> dict[int, tuple[str, int]]:
            found: dict[int, tuple[str, int]] = {}
            paginator = client.get_paginator("list_parts")
            async for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=multipart):
                for part in page.get("Parts", []):
                    found[part["PartNumber"]] = (part["ETag"], part["Size"])
            return found

        listed = await self._call(f"listing of the parts of {key}", _list)
        parts: list[CompletedPartTypeDef] = []
        for number in range(1, whole + 1):
            etag, size = listed.get(number, ("", -1))
            if size != part_size:
                raise StagingError(f"S3 staging: part {number} of upload {upload_id} is missing or holds {size} bytes")
            parts.append({"PartNumber": number, "ETag": etag})
        return parts

    async def _drop_unsealed(self, upload_id: str) -> None:
        """After the seal: the tails and any multipart upload of the key are garbage."""
        await self._delete([k for k, _ in await self._objects(upload_id) if not k.endswith("/" + _DATA)])
        for key, multipart, _ in await self._multiparts(upload_id):
            await self._abort(key, multipart)

    def reads_unsealed(self, upload_id: str, committed: int, start: int = 0) -> bool:
        return start >= committed - committed % self.part_size

    async def read(
        self, upload_id: str, length: int, block_size: int = 1 << 20, *, start: int = 0, committed: int | None = None
    ) -> AsyncIterator[bytes]:
        """From the sealed object (ranged GET), else from the committed tail where it holds all
        that is asked (``reads_unsealed``)."""
        if start >= length:
            return
        committed = length if committed is None else committed
        sealed = await self._sealed_size(upload_id)
        if sealed is None or sealed < length:
            if not self.reads_unsealed(upload_id, committed, start):
                raise StagingError(f"S3 staging: upload {upload_id} is not sealed; its parts cannot be read")
            tail, _, _ = await self._get_tail(upload_id, committed)
            tail_start = committed - len(tail)
            if start < tail_start:  # the upload's parts are larger than this node's: in parts after all
                raise StagingError(f"S3 staging: upload {upload_id} is not sealed; its parts cannot be read")
            for position in range(start - tail_start, length - tail_start, block_size):
                yield tail[position : min(position + block_size, length - tail_start)]
            return
        key = self._data_key(upload_id)
        try:
            client = await self._client()
            got = await client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{length - 1}")
            async with got["Body"] as body:
                want = length - start
                while want > 0:
                    block = await body.read(min(block_size, want))
                    if not block:
                        raise StagingError(f"S3 staging: the sealed object of upload {upload_id} ended early")
                    want -= len(block)
                    yield block
        except (ClientError, BotoCoreError) as exc:
            raise StagingError(f"S3 staging: get of {key} failed: {exc}") from exc

    async def staged_object(self, upload_id: str, length: int) -> StagedObject | None:
        if await self._sealed_size(upload_id) != length:
            return None
        return StagedObject(self.identity, self.bucket, self._data_key(upload_id), length)

    async def staged_size(self, upload_id: str) -> int:
        """What this node's writer of the upload has taken, else the furthest offset a tail or the
        sealed object reaches (committed or not)."""
        writer = self._writers.get(upload_id)
        if writer is not None:
            return writer.offset
        ends = [0]
        for key, _ in await self._objects(upload_id):
            name = key.rsplit("/", 1)[-1]
            match = _TAIL_NAME.match(name)
            if match:
                ends.append(int(match.group(1)))
        ends.append(await self._sealed_size(upload_id) or 0)
        return max(ends)

    async def chunk_files(self, upload_id: str, length: int) -> list[tuple[Path, int]] | None:
        return None  # the bytes are in S3, not in files here

    async def use_chunk_files[T](
        self, upload_id: str, length: int, use: Callable[[list[tuple[Path, int]]], T]
    ) -> tuple[list[tuple[Path, int]], T] | None:
        return None

    async def remove(self, upload_id: str) -> None:
        """Abort the multipart uploads and delete every object of the upload; drop its scratch."""
        self.digests.forget(upload_id)
        self._sealed.pop(upload_id, None)
        for key, multipart, _ in await self._multiparts(upload_id):
            await self._abort(key, multipart)
        await self._delete([k for k, _ in await self._objects(upload_id)])
        scratch = self.root / upload_id
        await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: shutil.rmtree(scratch, ignore_errors=True)
        )

    async def last_written(self, upload_id: str) -> datetime | None:
        if upload_id in self._writers:
            return datetime.now(UTC)  # being written on this node now
        times = [t for _, t in await self._objects(upload_id)]
        times += [t for _, _, t in await self._multiparts(upload_id)]
        scratch = self.root / upload_id
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            times.append(datetime.fromtimestamp(scratch.stat().st_mtime, UTC))
        return max(times) if times else None

    async def list_upload_ids(self) -> list[str]:
        async def _prefixes(client: S3Client) -> set[str]:
            found = set()
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    found.add(common["Prefix"][len(self.prefix) :].rstrip("/"))
            return found

        ids = await self._call(f"listing of {self.prefix}", _prefixes) | self._writers.keys()
        ids |= {key[len(self.prefix) :].split("/", 1)[0] for key, _, _ in await self._multiparts()}
        with contextlib.suppress(FileNotFoundError):
            ids |= {e.name for e in os.scandir(self.root) if e.is_dir()}
        return sorted(i for i in ids if i)
