"""Storage Elements on S3 or any S3-compatible store, through aiobotocore.

An S3ClientPool keeps one client (one connection pool) per endpoint and identity, and every
S3Backend on that endpoint borrows it. Uploads larger than one part go up as multipart uploads
whose next part is read from the source while the previous one is being sent, so memory holds
a few parts (the one being read, the one being sent) whatever the object's size. A put killed
midway leaves its multipart upload open (invisible, but billed): ``discard_incomplete`` aborts
those of one key before it is put again, ``sweep_incomplete`` the old ones under the prefix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from tusingest.elements.backend import Backend, BackendError, ObjectInfo, ObjectNotFound, ObjectRefused
from tusingest.elements.keys import check_key, check_prefix
from tusingest.observability import tracing

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        CopyObjectRequestTypeDef,
        CreateMultipartUploadOutputTypeDef,
        CreateMultipartUploadRequestTypeDef,
        MultipartUploadTypeDef,
        PutObjectRequestTypeDef,
    )

    from tusingest.elements.settings import S3Settings
    from tusingest.staging import StagedObject

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 << 20  # S3: every part but the last is at least 5 MiB
MAX_PART_SIZE = 5 << 30
MAX_PARTS = 10_000
MAX_COPY_OBJECT_SIZE = 5 << 30  # CopyObject's limit; larger objects are copied part by part
COPY_PART_SIZE = 512 << 20  # server-side, so large parts cost no memory here
COPY_CONCURRENCY = 4
READ_CHUNK_SIZE = 1 << 20

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# 400-class answers about the object itself (its key, its metadata), not about the element.
_REFUSED_OBJECT_CODES = frozenset(
    {
        "KeyTooLongError",
        "InvalidArgument",
        "InvalidObjectName",
        "XMinioInvalidObjectName",  # MinIO
        "MetadataTooLarge",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "OperationAborted",  # a conflicting operation on the bucket is in progress
    }
)
# SSL failures are certificate or configuration problems: retrying does not fix them.
_PERMANENT_CONNECTION_ERRORS = (SSLError, ssl.SSLError, aiohttp.ClientSSLError)
_TRANSIENT_CONNECTION_ERRORS = (
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError
    HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    aiohttp.ClientError,
    OSError,  # includes TimeoutError, which asyncio.TimeoutError is
)


def s3_error(exc: BaseException, *, element_id: str, operation: str, key: str | None = None) -> BackendError:
    """The BackendError for an exception raised by an S3 call: ObjectNotFound for a missing key
    (only when the operation is about a key), transient for 5xx, throttling and connection
    failures, ObjectRefused for a 4xx about the object itself (a key too long, an invalid
    argument or object name, too much metadata), permanent for the other 4xx (missing bucket,
    denied access) and for anything else."""
    if isinstance(exc, BackendError):
        return exc
    where = f"element {element_id}: S3 {operation}" + (f" of {key!r}" if key is not None else "")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if key is not None and code in _NOT_FOUND_CODES:
            return ObjectNotFound(key)
        transient = status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
        detail = " ".join(
            part for part in (code, f"(HTTP {status})" if status else "", error.get("Message", "")) if part
        )
        if key is not None and code in _REFUSED_OBJECT_CODES and not transient:
            return ObjectRefused(f"{where} refused: {detail}", key=key)
        return BackendError(f"{where} failed: {detail}", transient=transient)
    if isinstance(exc, _PERMANENT_CONNECTION_ERRORS):
        return BackendError(f"{where} failed: TLS: {exc}", transient=False)
    if isinstance(exc, _TRANSIENT_CONNECTION_ERRORS):
        return BackendError(f"{where} failed: {type(exc).__name__}: {exc}", transient=True)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return BackendError(
            f"{where} failed: no usable credentials (set ELEMENT_<ID>_AWS_ACCESS_KEY_ID and "
            "ELEMENT_<ID>_AWS_SECRET_ACCESS_KEY, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            transient=False,
        )
    if isinstance(exc, BotoCoreError):
        return BackendError(f"{where} failed: {type(exc).__name__}: {exc}", transient=False)
    # Not a storage failure we know; permanent, so a bug does not turn into endless retries.
    return BackendError(f"{where} failed unexpectedly: {type(exc).__name__}: {exc}", transient=False)


@dataclass(frozen=True, slots=True)
class S3Access:
    """Where an S3 client connects and as whom; elements with equal values share one client.

    ``verify``: a CA bundle path, False to skip TLS verification, or None for botocore's default
    (AWS_CA_BUNDLE, else the system CAs). No access key: botocore's default credential chain."""

    endpoint_url: str | None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    verify: bool | str | None = None

    def same_identity(self, other: S3Access) -> bool:
        """True when a request signed for one is valid for the other (server-side copies)."""
        return (self.endpoint_url, self.region, self.access_key_id, self.secret_access_key) == (
            other.endpoint_url,
            other.region,
            other.access_key_id,
            other.secret_access_key,
        )


def _session_with_tls_minimum(minimum: ssl.TLSVersion) -> type[AIOHTTPSession]:
    """aiobotocore's HTTP session whose TLS context refuses protocols below ``minimum``.

    Not ``AioConfig(connector_args={"ssl_context": ...})``: aiobotocore 3.x builds its own context
    (verification, CA bundle) and hands it to aiohttp as ``ssl``, so a second one collides with it.
    Its context comes from ``_get_ssl_context``; verification and the CA bundle are applied after."""

    if not hasattr(AIOHTTPSession, "_get_ssl_context"):
        raise RuntimeError("this aiobotocore has no AIOHTTPSession._get_ssl_context: see tusingest/elements/s3.py")

    class MinimumTlsSession(AIOHTTPSession):
        def _get_ssl_context(self) -> ssl.SSLContext:
            context: ssl.SSLContext = super()._get_ssl_context()  # type: ignore[misc]  # not in the stubs
            context.minimum_version = minimum
            return context

    return MinimumTlsSession


class S3ClientPool:
    """One aiobotocore S3 client per distinct S3Access, created on first use; ``close()`` closes
    them all. Backends borrow clients and never close them."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_pool_connections: int = 10,
        tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    ) -> None:
        self._config = AioConfig(
            # https endpoints only: an http:// endpoint_url stays plain (moto in tests, a loopback gateway).
            http_session_cls=_session_with_tls_minimum(tls_min_version),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # One attempt: tusingest retries above this layer, where the circuit breaker sees
            # every failure. (botocore's "max_attempts" counts retries, so 1 would mean two tries.)
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=max_pool_connections,
            # botocore reads its JSON service model when a client is made: do that off the loop.
            warm_up_loader_caches=True,
        )
        self._session = get_session()
        self._clients: dict[S3Access, S3Client] = {}
        self._exits = AsyncExitStack()
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: S3Settings) -> S3ClientPool:
        return cls(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            tls_min_version=settings.tls_min_version,
        )

    async def client(self, access: S3Access) -> S3Client:
        """The shared client for access, created on first use."""
        client = self._clients.get(access)
        if client is not None:
            return client
        async with self._lock:
            if self._closed:
                raise BackendError("the S3 client pool is closed", transient=False)
            client = self._clients.get(access)
            if client is None:
                creating = self._session.create_client(
                    "s3",
                    region_name=access.region,
                    endpoint_url=access.endpoint_url,
                    aws_access_key_id=access.access_key_id,
                    aws_secret_access_key=access.secret_access_key,
                    verify=access.verify,
                    config=self._config,
                )
                try:
                    client = await self._exits.enter_async_context(creating)
                except Exception as exc:
                    # A malformed endpoint URL or region: configuration, not something to retry.
                    where = access.endpoint_url or f"AWS {access.region}"
                    raise BackendError(f"cannot create an S3 client for {where}: {exc}", transient=False) from exc
                self._clients[access] = client
            return client

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            self._clients.clear()
            await self._exits.aclose()


type _Part = list[bytes | memoryview]


class _PartReader:
    """Cuts a stream of arbitrary chunks into parts of at most part_size bytes, holding at most
    one chunk beyond the part being filled, and checks the announced length as it goes.

    A part is the list of its chunks (slices of the source's chunks, no copies: bytes do not
    change), joined into one bytes object only when it is sent."""

    def __init__(self, chunks: AsyncIterable[bytes], part_size: int, length: int | None, describe: str) -> None:
        self._source = aiter(chunks)
        self.part_size = part_size
        self._length = length
        self._describe = describe
        self._pending = memoryview(b"")
        self._first: _Part | None = None
        self._ended = False
        self.total = 0

    async def _pull(self) -> None:
        # Exceptions from the source pass through unchanged: they are the caller's, not ours.
        while not self._pending and not self._ended:
            try:
                chunk = await anext(self._source)
            except StopAsyncIteration:
                self._ended = True
                if self._length is not None and self.total != self._length:
                    raise self._length_error() from None
                return
            self.total += len(chunk)
            if self._length is not None and self.total > self._length:
                raise self._length_error()
            self._pending = memoryview(chunk)

    def _length_error(self) -> BackendError:
        return BackendError(
            f"{self._describe}: the stream gave {self.total} bytes, {self._length} were announced",
            transient=False,
        )

    async def _read(self) -> _Part:
        part: _Part = []
        size = 0
        while size < self.part_size:
            await self._pull()
            if not self._pending:
                break
            piece = self._pending[: self.part_size - size]
            self._pending = self._pending[len(piece) :]
            part.append(piece)
            size += len(piece)
        return part

    async def fits_one_part(self) -> bool:
        """Read the first part and one chunk beyond it: True when that first part is the whole
        stream. The first part is kept here, so read_part still returns it first."""
        self._first = await self._read()
        await self._pull()
        return not self._pending

    async def read_part(self) -> _Part:
        """The next part: full, or shorter (empty at the end) when the stream has ended."""
        if self._first is not None:
            part, self._first = self._first, None
            return part
        return await self._read()


class S3Backend:
    """A Storage Element kept in an S3 bucket, under an optional key prefix."""

    def __init__(
        self,
        element_id: str,
        *,
        bucket: str,
        access: S3Access,
        clients: S3ClientPool,
        prefix: str = "",
        part_size: int = 16 << 20,
        copy_part_size: int = COPY_PART_SIZE,
        multipart_copy_threshold: int = MAX_COPY_OBJECT_SIZE,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB, not {part_size}")
        if not MIN_PART_SIZE <= copy_part_size <= MAX_PART_SIZE:
            raise ValueError(f"copy_part_size must be between 5 MiB and 5 GiB, not {copy_part_size}")
        self.element_id = element_id
        self.bucket = bucket
        self.access = access
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self._clients = clients
        self._copy_part_size = copy_part_size
        self._multipart_copy_threshold = min(multipart_copy_threshold, MAX_COPY_OBJECT_SIZE)
        self._cleanups: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"S3Backend({self.element_id!r}, {self.access.endpoint_url or 'aws'}/{self.bucket}/{self.prefix})"

    def _object_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _client(self) -> S3Client:
        return await self._clients.client(self.access)

    async def _call[T](self, operation: str, key: str | None, call: Awaitable[T]) -> T:
        attributes = {"rpc.system": "aws-api", "rpc.method": operation, "element.id": self.element_id, "s3.key": key}
        with tracing.span(f"S3.{operation}", attributes, kind=tracing.CLIENT):
            try:
                return await call
            except Exception as exc:
                raise s3_error(exc, element_id=self.element_id, operation=operation, key=key) from exc

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        length: int | None = None,
        content_type: str = "application/octet-stream",
        content_encoding: str | None = None,
        metadata: Mapping[str, str] | None = None,
        durable: bool = True,  # a completed S3 put is durable: nothing to put off
    ) -> ObjectInfo:
        object_key = self._object_key(key)
        if length is not None and length < 0:
            raise BackendError(f"element {self.element_id}: put of {key!r}: negative length {length}", transient=False)
        stored_metadata = {name.lower(): value for name, value in (metadata or {}).items()}
        part_size = self.part_size
        if length is not None:
            # A known length may need larger parts to stay within S3's 10,000 parts.
            part_size = min(MAX_PART_SIZE, max(part_size, math.ceil(length / MAX_PARTS)))
        reader = _PartReader(chunks, part_size, length, f"element {self.element_id}: put of {key!r}")
        client = await self._client()

        if await reader.fits_one_part():
            request: PutObjectRequestTypeDef = {
                "Bucket": self.bucket,
                "Key": object_key,
                "Body": b"".join(await reader.read_part()),
                "ContentType": content_type,
                "Metadata": stored_metadata,
            }
            if content_encoding is not None:
                request["ContentEncoding"] = content_encoding
            await self._call("put_object", key, client.put_object(**request))
        else:
            await self._put_multipart(client, key, object_key, reader, content_type, content_encoding, stored_metadata)
        return ObjectInfo(key, reader.total, content_type, content_encoding, stored_metadata)

    async def _put_multipart(
        self,
        client: S3Client,
        key: str,
        object_key: str,
        reader: _PartReader,
        content_type: str,
        content_encoding: str | None,
        metadata: dict[str, str],
    ) -> None:
        request: CreateMultipartUploadRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": object_key,
            "ContentType": content_type,
            "Metadata": metadata,
        }
        if content_encoding is not None:
            request["ContentEncoding"] = content_encoding
        upload_id = await self._create_multipart(client, key, request)
        parts: list[CompletedPartTypeDef] = []
        sending: asyncio.Task[CompletedPartTypeDef] | None = None
        try:
            part, number = await reader.read_part(), 1
            while part:
                if number > MAX_PARTS:
                    raise BackendError(
                        f"element {self.element_id}: put of {key!r}: more than {MAX_PARTS} parts of "
                        f"{reader.part_size} bytes; raise CHUNK_SIZE_MB or announce the length",
                        transient=False,
                    )
                if sending is not None:
                    # Part N went up while part N+1 was read; wait for it before copying N+1.
                    parts.append(await sending)
                body = b"".join(part)
                del part  # before the next part is read: memory holds two parts at most
                sending = asyncio.create_task(self._upload_part(client, key, object_key, upload_id, number, body))
                del body
                number += 1
                part = await reader.read_part()
            if sending is not None:
                parts.append(await sending)
                sending = None
            await self._call(
                "complete_multipart_upload",
                key,
                client.complete_multipart_upload(
                    Bucket=self.bucket, Key=object_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            await self._abandon(client, key, self.bucket, object_key, upload_id, sending)
            raise

    async def _upload_part(
        self, client: S3Client, key: str, object_key: str, upload_id: str, number: int, body: bytes
    ) -> CompletedPartTypeDef:
        response = await self._call(
            "upload_part",
            key,
            client.upload_part(Bucket=self.bucket, Key=object_key, UploadId=upload_id, PartNumber=number, Body=body),
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    async def _abandon(
        self,
        client: S3Client,
        key: str,
        bucket: str,
        object_key: str,
        upload_id: str,
        sending: asyncio.Task[CompletedPartTypeDef] | None,
    ) -> None:
        """Abort the multipart upload, even when the put itself is being cancelled."""
        await asyncio.shield(self._in_background(self._abort(client, key, bucket, object_key, upload_id, sending)))

    def _in_background(self, cleanup: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # Cleanups outlive a cancelled caller; close() waits for them.
        task = asyncio.create_task(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _create_multipart(self, client: S3Client, key: str, request: CreateMultipartUploadRequestTypeDef) -> str:
        """Open a multipart upload and return its id; a cancelled caller's upload is aborted."""
        creating = asyncio.ensure_future(
            self._call("create_multipart_upload", key, client.create_multipart_upload(**request))
        )
        try:
            created = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # S3 may open the upload all the same: abort it once its id arrives.
            self._in_background(self._abort_once_created(client, key, request["Bucket"], request["Key"], creating))
            raise
        return created["UploadId"]

    async def _abort_once_created(
        self,
        client: S3Client,
        key: str,
        bucket: str,
        object_key: str,
        creating: asyncio.Future[CreateMultipartUploadOutputTypeDef],
    ) -> None:
        try:
            created = await creating
        except BackendError:
            return  # nothing was opened
        await self._abort(client, key, bucket, object_key, created["UploadId"], None)

    async def _abort(
        self,
        client: S3Client,
        key: str,
        bucket: str,
        object_key: str,
        upload_id: str,
        sending: asyncio.Task[CompletedPartTypeDef] | None,
    ) -> None:
        if sending is not None:
            # A part still arriving after the abort could outlive it on some stores.
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        try:
            await self._call(
                "abort_multipart_upload",
                key,
                client.abort_multipart_upload(Bucket=bucket, Key=object_key, UploadId=upload_id),
            )
        except BackendError as exc:
            # Invisible to readers, but it holds storage until a lifecycle rule removes it.
            log.warning("multipart upload %s of %r left behind: %s", upload_id, object_key, exc)

    async def get(self, key: str, *, start: int = 0) -> AsyncIterator[bytes]:
        object_key = self._object_key(key)
        client = await self._client()
        if start:
            request = client.get_object(Bucket=self.bucket, Key=object_key, Range=f"bytes={start}-")
        else:  # no Range: S3 refuses any range of an empty object (416)
            request = client.get_object(Bucket=self.bucket, Key=object_key)
        response = await self._call("get_object", key, request)
        async with response["Body"] as body:
            while chunk := await self._call("get_object", key, body.read(READ_CHUNK_SIZE)):
                yield chunk

    async def head(self, key: str) -> ObjectInfo | None:
        object_key = self._object_key(key)
        client = await self._client()
        try:
            response = await self._call("head_object", key, client.head_object(Bucket=self.bucket, Key=object_key))
        except ObjectNotFound:
            return None
        return ObjectInfo(
            key,
            response["ContentLength"],
            response.get("ContentType"),
            response.get("ContentEncoding"),
            dict(response.get("Metadata", {})),
        )

    async def delete(self, key: str) -> bool:
        if await self.head(key) is None:
            return False
        client = await self._client()
        await self._call("delete_object", key, client.delete_object(Bucket=self.bucket, Key=self._object_key(key)))
        return True

    def can_copy_to(self, other: Backend) -> bool:
        return isinstance(other, S3Backend) and self.access.same_identity(other.access)

    async def copy_to(self, key: str, other: Backend, other_key: str) -> ObjectInfo:
        if not isinstance(other, S3Backend) or not self.can_copy_to(other):
            raise BackendError(
                f"element {self.element_id}: cannot copy server-side to {other.element_id}", transient=False
            )
        source_key = self._object_key(key)
        target_key = other._object_key(other_key)
        info = await self.head(key)
        if info is None:
            raise ObjectNotFound(key)
        copied = ObjectInfo(other_key, info.size, info.content_type, info.content_encoding, info.metadata)
        if (self.bucket, source_key) == (other.bucket, target_key):
            return copied  # S3 refuses to copy an object onto itself unchanged
        await self._copy(key, info, (self.bucket, source_key), other.bucket, target_key, replace=False)
        return copied

    def can_place_from(self, source: StagedObject) -> bool:
        """``ObjectPlacer``: staging on this endpoint as this identity is copied on the S3 side."""
        return isinstance(source.identity, S3Access) and self.access.same_identity(source.identity)

    async def place_object(
        self,
        key: str,
        source: StagedObject,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        if not self.can_place_from(source):
            raise BackendError(f"element {self.element_id}: cannot copy {source.key} server-side", transient=False)
        target_key = self._object_key(key)
        stored_metadata = {name.lower(): value for name, value in (metadata or {}).items()}
        info = ObjectInfo(key, source.size, content_type, None, stored_metadata)
        await self._copy(key, info, (source.bucket, source.key), self.bucket, target_key, replace=True)
        return info

    async def _copy(
        self, key: str, info: ObjectInfo, source: tuple[str, str], bucket: str, target_key: str, *, replace: bool
    ) -> None:
        """Copy ``source`` (bucket, key) of ``info.size`` bytes on the S3 side into ``target_key`` of
        ``bucket``: one CopyObject up to the threshold (keeping the source's attributes, or taking
        ``info``'s when ``replace``), else part by part with ``info``'s."""
        client = await self._client()
        if info.size > self._multipart_copy_threshold:
            await self._copy_multipart(client, info, source, bucket, target_key)
            return
        request: CopyObjectRequestTypeDef = {
            "Bucket": bucket,
            "Key": target_key,
            "CopySource": {"Bucket": source[0], "Key": source[1]},
            "MetadataDirective": "REPLACE" if replace else "COPY",
        }
        if replace:
            request["ContentType"] = info.content_type or "application/octet-stream"
            request["Metadata"] = dict(info.metadata)
        await self._call("copy_object", key, client.copy_object(**request))

    async def _copy_multipart(
        self, client: S3Client, info: ObjectInfo, source: tuple[str, str], bucket: str, target_key: str
    ) -> None:
        """Copy ``source`` (bucket, key) part by part on the S3 side into ``target_key`` of ``bucket``."""
        source_bucket, source_key = source
        request: CreateMultipartUploadRequestTypeDef = {
            "Bucket": bucket,
            "Key": target_key,
            "Metadata": dict(info.metadata),
        }
        if info.content_type is not None:
            request["ContentType"] = info.content_type
        if info.content_encoding is not None:
            request["ContentEncoding"] = info.content_encoding
        key = info.key
        upload_id = await self._create_multipart(client, key, request)
        part_size = max(self._copy_part_size, math.ceil(info.size / MAX_PARTS))
        ranges = [(start, min(start + part_size, info.size) - 1) for start in range(0, info.size, part_size)]
        slots = asyncio.Semaphore(COPY_CONCURRENCY)

        async def copy_part(number: int, first: int, last: int) -> CompletedPartTypeDef:
            async with slots:
                response = await self._call(
                    "upload_part_copy",
                    key,
                    client.upload_part_copy(
                        Bucket=bucket,
                        Key=target_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        CopySource={"Bucket": source_bucket, "Key": source_key},
                        CopySourceRange=f"bytes={first}-{last}",
                    ),
                )
            return {"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]}

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(copy_part(n, first, last)) for n, (first, last) in enumerate(ranges, 1)]
            parts = [task.result() for task in tasks]
            await self._call(
                "complete_multipart_upload",
                key,
                client.complete_multipart_upload(
                    Bucket=bucket, Key=target_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseExceptionGroup as failures:
            await self._abandon(client, key, bucket, target_key, upload_id, None)
            # TaskGroup wraps the failures; callers expect the BackendError itself.
            raise failures.exceptions[0] from failures
        except BaseException:
            await self._abandon(client, key, bucket, target_key, upload_id, None)
            raise

    async def list_keys(self, prefix: str = "") -> AsyncIterator[str]:
        check_prefix(prefix)
        client = await self._client()
        pages = aiter(client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix))
        while True:
            try:
                page = await anext(pages)
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise s3_error(exc, element_id=self.element_id, operation="list_objects_v2") from exc
            for entry in page.get("Contents", []):
                yield entry["Key"][len(self.prefix) :]

    async def discard_incomplete(self, key: str) -> int:
        object_key = self._object_key(key)
        # The prefix also matches longer keys (key + ".attr.json"): only key's own are aborted.
        return await self._abort_incomplete(object_key, lambda upload: upload.get("Key") == object_key)

    async def sweep_incomplete(self, older_than: datetime) -> int:
        def old(upload: MultipartUploadTypeDef) -> bool:
            initiated = upload.get("Initiated")
            return initiated is not None and initiated < older_than

        return await self._abort_incomplete(self.prefix, old)

    async def _abort_incomplete(self, prefix: str, chosen: Callable[[MultipartUploadTypeDef], bool]) -> int:
        """Abort the multipart uploads under prefix that chosen picks; returns how many."""
        client = await self._client()
        found: list[MultipartUploadTypeDef] = []
        pages = aiter(client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix))
        while True:
            try:
                page = await anext(pages)
            except StopAsyncIteration:
                break
            except Exception as exc:
                raise s3_error(exc, element_id=self.element_id, operation="list_multipart_uploads") from exc
            found.extend(upload for upload in page.get("Uploads", []) if chosen(upload))
        aborted = 0
        for upload in found:
            object_key, upload_id = upload["Key"], upload["UploadId"]
            try:
                await client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    continue  # completed or aborted meanwhile, by its own put or another node's sweep
                raise s3_error(exc, element_id=self.element_id, operation="abort_multipart_upload") from exc
            except Exception as exc:
                raise s3_error(exc, element_id=self.element_id, operation="abort_multipart_upload") from exc
            log.info(
                "aborted multipart upload %s of %r (begun %s), left by a put that never finished",
                upload_id,
                object_key,
                upload.get("Initiated"),
            )
            aborted += 1
        return aborted

    async def probe(self) -> None:
        client = await self._client()
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status == 404:
                # HeadBucket has no body, so the 404 carries no NoSuchBucket code to report.
                raise BackendError(
                    f"element {self.element_id}: S3 head_bucket failed: bucket {self.bucket!r} does not exist",
                    transient=False,
                ) from exc
            raise s3_error(exc, element_id=self.element_id, operation="head_bucket") from exc
        except Exception as exc:
            raise s3_error(exc, element_id=self.element_id, operation="head_bucket") from exc

    async def close(self) -> None:
        """Wait for aborts still running; the client itself belongs to the pool, shared by other elements."""
        await asyncio.gather(*self._cleanups, return_exceptions=True)
