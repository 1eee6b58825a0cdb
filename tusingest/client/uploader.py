"""One file to a tus 1.0 server, resumably: create (or find again) the upload, PATCH it chunk by chunk
with ``Upload-Checksum`` when the server offers sha256, and after a dropped connection ask the server's
offset (HEAD) and go on from there, retrying with exponential backoff and full jitter (tenacity).

The server's answer to the completing PATCH (or a later HEAD) says what became of the file, in our
ArtStore-* headers; another tus server answers without them and the upload is simply "completed"."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import mimetypes
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential
from yarl import URL

from tusingest.client.fingerprints import Fingerprint, FingerprintStore

TUS_VERSION = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
# Our server's answer (tusingest/api/finaliser.py); the client may not import it, so the names are repeated.
FILE_ID_HEADER = "ArtStore-File-Id"
ELEMENT_HEADER = "ArtStore-Storage-Element-Id"
SHA256_HEADER = "ArtStore-Sha256"
STATUS_HEADER = "ArtStore-Upload-Status"
ERROR_HEADER = "ArtStore-Error"
_PARTS = "parts:"  # a fingerprint's entry while the file is still sent as partial uploads
MIN_CHUNK_SIZE = 64 << 10  # the smallest a chunk shrinks to on a line that keeps breaking
# Statuses worth another attempt: the server or the way to it had a moment (a lock still held, a stale
# offset after a dropped connection, a checksum spoilt on the way, too many requests).
_TRANSIENT_STATUSES = frozenset({408, 409, 423, 429, 460, 500, 502, 503, 504})


@dataclass(frozen=True)
class UploadSettings:
    endpoint: str
    chunk_size: int
    token: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    retries: int = 8  # further attempts of one step (a HEAD and a PATCH) before the file fails
    backoff_seconds: float = 0.5  # the first retry waits up to this long, each next one up to twice as long
    backoff_max_seconds: float = 30.0
    parallel: int = 1  # partial uploads of one file sent at once (concatenation), when the server offers it
    finalise_wait_seconds: float = 300.0  # how long to ask (HEAD) after the last byte while the server finalises
    request_timeout_seconds: float = 120.0

    def headers(self) -> dict[str, str]:
        headers = dict(TUS_VERSION)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


@dataclass(frozen=True)
class ServerAbilities:
    extensions: frozenset[str]
    checksum_sha256: bool
    max_size: int | None

    @classmethod
    def from_options(cls, headers: Mapping[str, str]) -> ServerAbilities:
        def items(name: str) -> frozenset[str]:
            return frozenset(part.strip().lower() for part in headers.get(name, "").split(",") if part.strip())

        max_size = headers.get("Tus-Max-Size", "")
        return cls(
            extensions=items("Tus-Extension"),
            checksum_sha256="sha256" in items("Tus-Checksum-Algorithm"),
            max_size=int(max_size) if max_size.isdigit() else None,
        )


@dataclass
class UploadResult:
    path: str
    ok: bool
    size: int
    url: str | None = None
    status: str | None = None  # the server's ArtStore-Upload-Status, or "completed" from another server
    file_id: str | None = None
    element: str | None = None
    sha256: str | None = None
    code: str | None = None  # the server's ArtStore-Error, when it refused the file
    reason: str | None = None  # one line, for a failed file
    resumed_from: int = 0  # the offset the server already held when this run began
    sent_bytes: int = 0  # bytes this run PATCHed, counting the ones sent again after a failure


class UploadObserver(Protocol):
    def started(self, path: Path, size: int, url: str, offset: int) -> None: ...

    def advanced(self, path: Path, offset: int, size: int) -> None: ...


class Refused(Exception):
    """The server said no for good (a 4xx other than the transient ones, or an ArtStore-Error): the file fails."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Transient(Exception):
    """Worth another attempt after a pause: a dropped connection, a timeout, a 5xx, a stale offset."""


class UploadGone(Exception):
    """The server no longer knows the upload (404/410): start a new one."""


async def discover(session: aiohttp.ClientSession, settings: UploadSettings) -> ServerAbilities:
    """What the server offers (OPTIONS): the extensions, whether it checks sha256, its largest upload."""
    try:
        async with session.options(settings.endpoint, headers=settings.headers()) as response:
            if response.status >= 400:
                raise Refused(await _reason(response), response.headers.get(ERROR_HEADER))
            return ServerAbilities.from_options(response.headers)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Refused(f"cannot reach {settings.endpoint}: {_describe(exc)}") from None


class Uploader:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: UploadSettings,
        abilities: ServerAbilities,
        fingerprints: FingerprintStore,
        observer: UploadObserver,
    ) -> None:
        self.session = session
        self.settings = settings
        self.abilities = abilities
        self.fingerprints = fingerprints
        self.observer = observer

    async def upload(self, path: Path) -> UploadResult:
        try:
            fingerprint = Fingerprint.of(path, self.settings.endpoint)
        except OSError as exc:
            return UploadResult(str(path), ok=False, size=0, reason=exc.strerror or str(exc))
        result = UploadResult(str(path), ok=False, size=fingerprint.size)
        try:
            await self._upload(path, fingerprint, result)
        except Refused as exc:
            await self.fingerprints.forget(fingerprint)  # what the server refused, it refuses again
            result.reason, result.code = exc.reason, exc.code
        except Transient as exc:  # the retries are spent; the entry stays, so that the next run resumes
            result.reason = f"gave up after {self.settings.retries + 1} attempts: {exc}"
        except OSError as exc:
            result.reason = f"cannot read the file: {exc.strerror or exc}"
        return result

    async def _upload(self, path: Path, fingerprint: Fingerprint, result: UploadResult) -> None:
        size = fingerprint.size
        if self.abilities.max_size is not None and size > self.abilities.max_size:
            raise Refused(f"the file is {size} bytes; the server takes at most {self.abilities.max_size}")
        known = await self.fingerprints.find(fingerprint)
        fd = os.open(path, os.O_RDONLY)
        try:
            parts = self._parts_for(size)
            if (known is None and parts > 1) or (known is not None and known.startswith(_PARTS)):
                url, answer = await self._send_in_parts(path, fingerprint, fd, known, parts, result)
                hashed = _Sha256(fd)  # the parts finish in any order: the digest reads the file once more
            else:
                url, offset, answer = await self._resume_or_create(path, fingerprint, known)
                result.url, result.resumed_from = url, offset
                self.observer.started(path, size, url, offset)
                hashed = _Sha256(fd)

                async def advanced(offset: int) -> None:
                    await hashed.through(offset)
                    self.observer.advanced(path, offset, size)

                answer = await self._send(fd, url, 0, offset, size, result, advanced) or answer
            await hashed.through(size)
        finally:
            os.close(fd)
        await self._settle(url, size, answer, hashed.hexdigest(), result)
        await self.fingerprints.forget(fingerprint)

    def _parts_for(self, size: int) -> int:
        """How many partial uploads to send at once: --parallel, when the server offers concatenation,
        but no part shorter than a chunk."""
        if self.settings.parallel < 2 or "concatenation" not in self.abilities.extensions:
            return 1
        return max(1, min(self.settings.parallel, size // self.settings.chunk_size))

    async def _resume_or_create(
        self, path: Path, fingerprint: Fingerprint, known: str | None
    ) -> tuple[str, int, Mapping[str, str]]:
        """The upload this file began in an earlier run (and the server's offset), else a new one."""
        if known is not None:
            try:
                offset, answer = await self._retrying(lambda: self._head(known, fingerprint.size))
                return known, offset, answer
            except UploadGone:
                pass
        url, answer = await self._retrying(lambda: self._create(path, fingerprint.size))
        await self.fingerprints.remember(fingerprint, url)
        return url, 0, answer

    async def _send_in_parts(
        self, path: Path, fingerprint: Fingerprint, fd: int, known: str | None, parts: int, result: UploadResult
    ) -> tuple[str, Mapping[str, str]]:
        """The file as ``parts`` partial uploads sent at once, then the final upload that joins them
        (the concatenation extension). The store remembers the parts' URLs until the final exists."""
        size = fingerprint.size
        urls = known.removeprefix(_PARTS).split() if known is not None else []
        parts = len(urls) or parts
        bounds = [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]
        offsets = [0] * parts
        try:
            for i, (url, (start, end)) in enumerate(zip(urls, bounds[: len(urls)], strict=True)):
                offsets[i], _ = await self._retrying(partial(self._head, url, end - start))
        except UploadGone:
            urls = []
        if not urls:
            created = await asyncio.gather(
                *(self._retrying(partial(self._create, path, end - start, concat="partial")) for start, end in bounds)
            )
            urls, offsets = [url for url, _ in created], [0] * parts
            await self.fingerprints.remember(fingerprint, _PARTS + " ".join(urls))
        result.resumed_from = sum(offsets)
        self.observer.started(path, size, urls[0], result.resumed_from)

        def advancer(i: int) -> Callable[[int], Awaitable[None]]:
            async def advanced(offset: int) -> None:
                offsets[i] = offset
                self.observer.advanced(path, sum(offsets), size)

            return advanced

        await asyncio.gather(
            *(
                self._send(fd, url, start, offsets[i], end - start, result, advancer(i))
                for i, (url, (start, end)) in enumerate(zip(urls, bounds, strict=True))
            )
        )
        final = "final;" + " ".join(urls)
        url, answer = await self._retrying(lambda: self._create(path, size, concat=final))
        result.url = url
        await self.fingerprints.remember(fingerprint, url)  # from now on, a HEAD of the final tells
        if STATUS_HEADER not in answer:
            _, answer = await self._retrying(lambda: self._head(url, size))
        return url, answer

    async def _send(
        self,
        fd: int,
        url: str,
        base: int,
        offset: int,
        size: int,
        result: UploadResult,
        advanced: Callable[[int], Awaitable[None]],
    ) -> Mapping[str, str]:
        """The bytes ``base + offset`` to ``base + size`` of the file to the upload at ``url``; the last answer."""
        answer: Mapping[str, str] = {}
        length = self.settings.chunk_size
        while offset < size:
            offset, length, answer = await self._send_chunk(fd, url, base, offset, size, length, result)
            await advanced(offset)
        return answer

    async def _send_chunk(
        self, fd: int, url: str, base: int, offset: int, size: int, length: int, result: UploadResult
    ) -> tuple[int, int, Mapping[str, str]]:
        """One chunk from ``offset`` (re-asking the offset after a failure); the offset after it, and the
        chunk length to go on with: halved after a PATCH the server kept nothing of. A server that checks
        ``Upload-Checksum`` must drop a cut-off chunk whole, so on a line that breaks every few MiB only
        chunks shorter than that get through."""
        known: int | None = offset
        failed_at: int | None = None
        async for attempt in self._policy():
            with attempt:
                if known is None:  # after a failure: where does the server stand?
                    known, answer = await self._head(url, size)
                    if known >= size:
                        return known, length, answer
                    if known == failed_at:
                        length = max(length // 2, MIN_CHUNK_SIZE)
                chunk = await asyncio.to_thread(os.pread, fd, min(length, size - known), base + known)
                try:
                    result.sent_bytes += len(chunk)
                    new_offset, answer = await self._patch(url, known, chunk)
                    return new_offset, length, answer
                except Transient:
                    known, failed_at = None, known
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    async def _settle(self, url: str, size: int, answer: Mapping[str, str], sha256: str, result: UploadResult) -> None:
        """The server's word on the finished file; while it says "finalizing", ask again (HEAD)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.finalise_wait_seconds
        pause = 0.2
        while answer.get(STATUS_HEADER) == "finalizing":
            if loop.time() > deadline:
                raise Refused(f"the server still finalises the file after {self.settings.finalise_wait_seconds:g}s")
            await asyncio.sleep(pause)  # a poll of another process's progress: nothing tells us sooner
            pause = min(pause * 2, 5.0)
            _, answer = await self._retrying(lambda: self._head(url, size))
        if ERROR_HEADER in answer:
            raise Refused(f"the server refused the file ({answer[ERROR_HEADER]})", answer[ERROR_HEADER])
        result.status = answer.get(STATUS_HEADER, "completed")
        result.file_id = answer.get(FILE_ID_HEADER)
        result.element = answer.get(ELEMENT_HEADER)
        result.sha256 = answer.get(SHA256_HEADER)
        if result.sha256 is not None and result.sha256.lower() != sha256:
            raise Refused(f"the server holds SHA-256 {result.sha256}, the file has {sha256}", "sha256_mismatch")
        result.sha256 = sha256
        result.ok = True

    # One request each; every failure becomes Refused, Transient or UploadGone.

    async def _create(self, path: Path, size: int, concat: str | None = None) -> tuple[str, Mapping[str, str]]:
        """A new upload of ``size`` bytes; ``concat``: "partial" for a part, "final;<urls>" for the whole."""
        if "creation" not in self.abilities.extensions:
            raise Refused("the server does not offer the tus creation extension")
        headers = self.settings.headers()
        if concat is not None:
            headers["Upload-Concat"] = concat
        if concat is None or concat.startswith("final;"):  # a part carries no metadata: the whole does
            filetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            metadata = {"filename": path.name, "filetype": filetype, **self.settings.metadata}
            headers["Upload-Metadata"] = encode_metadata(metadata)
        if concat is None or concat == "partial":  # the final's length is its parts'
            headers["Upload-Length"] = str(size)
        async with self._request("POST", self.settings.endpoint, headers=headers) as response:
            await _raise_for(response)
            location = response.headers.get("Location")
            if response.status != 201 or not location:
                raise Refused(f"the server answered the creation with {response.status} and no Location")
            return str(URL(self.settings.endpoint).join(URL(location))), response.headers

    async def _head(self, url: str, size: int) -> tuple[int, Mapping[str, str]]:
        async with self._request("HEAD", url, headers=self.settings.headers()) as response:
            if response.status in (404, 410):
                raise UploadGone()
            await _raise_for(response)
            offset = response.headers.get("Upload-Offset", "")
            length = response.headers.get("Upload-Length")
            if not offset.isdigit():
                raise Transient(f"HEAD {response.status} without Upload-Offset")
            if length is not None and length != str(size):
                raise UploadGone()  # another file's upload: this one has changed since
            return int(offset), response.headers

    async def _patch(self, url: str, offset: int, chunk: bytes) -> tuple[int, Mapping[str, str]]:
        headers = self.settings.headers() | {"Upload-Offset": str(offset), "Content-Type": OCTETS}
        if self.abilities.checksum_sha256:
            headers["Upload-Checksum"] = "sha256 " + base64.b64encode(hashlib.sha256(chunk).digest()).decode()
        async with self._request("PATCH", url, headers=headers, data=chunk) as response:
            if response.status in (404, 410):
                raise Refused("the server no longer knows the upload")
            await _raise_for(response)
            new_offset = response.headers.get("Upload-Offset", "")
            if not new_offset.isdigit() or int(new_offset) <= offset:
                raise Transient(f"PATCH {response.status} did not move the offset")
            return int(new_offset), response.headers

    def _request(self, method: str, url: str, **kwargs: object) -> _Request:
        return _Request(self.session, method, url, self.settings.request_timeout_seconds, kwargs)

    def _policy(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=wait_random_exponential(
                multiplier=self.settings.backoff_seconds, max=self.settings.backoff_max_seconds
            ),
            reraise=True,
        )

    async def _retrying[T](self, step: Callable[[], Awaitable[T]]) -> T:
        async for attempt in self._policy():
            with attempt:
                return await step()
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover


class _Request:
    """A request whose connection failures and timeouts arrive as Transient."""

    def __init__(
        self, session: aiohttp.ClientSession, method: str, url: str, timeout: float, kwargs: dict[str, object]
    ) -> None:
        self.session, self.method, self.url, self.timeout, self.kwargs = session, method, url, timeout, kwargs
        self.response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            self.response = await self.session.request(
                self.method,
                self.url,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                **self.kwargs,  # type: ignore[arg-type]
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Transient(f"{self.method} failed: {_describe(exc)}") from None
        return self.response

    async def __aexit__(self, *exc: object) -> None:
        if self.response is not None:
            self.response.release()


class _Sha256:
    """The file's SHA-256, fed in order as the server's offset moves on (re-reading what it has to)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.position = 0
        self.digest = hashlib.sha256()

    async def through(self, offset: int) -> None:
        while self.position < offset:
            block = await asyncio.to_thread(os.pread, self.fd, min(8 << 20, offset - self.position), self.position)
            if not block:
                raise OSError("the file shrank while it was uploaded")
            self.digest.update(block)
            self.position += len(block)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def encode_metadata(metadata: Mapping[str, str]) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in metadata.items())


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status < 300:
        return
    code = response.headers.get(ERROR_HEADER)
    if response.status in _TRANSIENT_STATUSES and code is None:
        raise Transient(f"{response.method} answered {response.status}")
    raise Refused(await _reason(response), code)


async def _reason(response: aiohttp.ClientResponse) -> str:
    try:
        body = (await response.text(errors="replace")).strip()
    except (aiohttp.ClientError, TimeoutError):
        body = ""
    first_line = body.splitlines()[0][:300] if body else (response.reason or "")
    return f"{response.status} {first_line}".strip()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
