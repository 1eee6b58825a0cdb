"""An asyncio client for clamd's INSTREAM protocol: bytes go to ClamAV as they pass, the verdict comes at the end.

clamd listens on TCP (``tcp://host:port``) or a Unix socket (``unix:///run/clamav/clamd.ctl``). A scan
sends ``zINSTREAM\\0``, then each piece as a 4-byte big-endian length and the bytes, then a zero length;
clamd answers ``stream: OK``, ``stream: <signature> FOUND`` or an ``... ERROR`` line. Nothing is held in
memory beyond the piece being sent.

The client works on the loop's socket calls rather than asyncio streams: when a stream passes
StreamMaxLength, clamd says so and closes the connection, and our next write fails with a broken
pipe. A stream transport closes its socket on that failure and loses the reply still waiting in it;
a plain socket keeps it, so a refused stream is told apart from a crashed scanner.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_CHUNK_SIZE = 256 * 1024
_MAX_CHUNK_SIZE = 2**32 - 1  # the length prefix is four bytes
_REPLY_LIMIT = 4096  # clamd answers with one short line; anything longer is not clamd
_END_OF_STREAM = struct.pack(">I", 0)
_LIMIT_REPLY = "INSTREAM size limit exceeded"
_LIMIT_SIGNATURE = "Heuristics.Limits.Exceeded"


class ScanError(Exception):
    """No verdict could be had. ``code`` names the failure for API answers and logs."""

    code: str = "scan_error"


class ScannerUnavailable(ScanError):
    """clamd could not be reached, stopped answering, broke the connection or answered nonsense."""

    code = "scanner_unavailable"


class ScanLimitExceeded(ScanError):
    """The stream is longer than clamd will scan: over StreamMaxLength (refused), or over MaxFileSize or
    MaxScanSize with AlertExceedsMax on (reported as ``Heuristics.Limits.Exceeded.*``). Without
    AlertExceedsMax clamd answers OK for such a file without scanning it all, so run clamd with it."""

    code = "scan_size_limit_exceeded"


@dataclass(frozen=True, slots=True)
class ScanResult:
    """clamd's verdict; ``signature`` is the name of what it found (``None`` when clean)."""

    clean: bool
    signature: str | None = None


class ClamdScanner:
    """A clamd endpoint. It holds no connection: clamd answers one command per connection and
    scans connections in parallel, so each ping and each scan opens its own.

    ``timeout`` bounds every wait on clamd: connecting, clamd accepting one chunk, and the verdict
    after the last byte (clamd scans only then, so allow for the largest file's scan time).
    """

    def __init__(self, url: str, *, timeout: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if not 0 < chunk_size <= _MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 and {_MAX_CHUNK_SIZE}, got {chunk_size}")
        self.url = url
        self._address = _parse_url(url)
        self._timeout = timeout
        self._chunk_size = chunk_size

    async def ping(self) -> None:
        """Return when clamd answers PONG; raise ScannerUnavailable otherwise."""
        sock = await self._connect()
        try:
            await _send(sock, (b"zPING\0",), self.url, self._timeout)
            reply = await _read_reply(sock, self.url, self._timeout)
        finally:
            sock.close()
        if reply != "PONG":
            raise ScannerUnavailable(f"unexpected answer to PING from clamd at {self.url}: {reply!r}")

    async def scan(self, chunks: AsyncIterable[bytes]) -> ScanResult:
        """Stream ``chunks`` to clamd and return its verdict."""
        async with self.session() as session:
            async for chunk in chunks:
                await session.feed(chunk)
            return await session.finish()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[ScanSession]:
        """A scan fed piece by piece as the bytes pass; leaving without ``finish`` abandons it."""
        sock = await self._connect()
        try:
            session = ScanSession(sock, url=self.url, timeout=self._timeout, chunk_size=self._chunk_size)
            await session._send(b"zINSTREAM\0")
            yield session
        finally:
            sock.close()

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                if isinstance(self._address, str):
                    return await _open(socket.AF_UNIX, socket.SOCK_STREAM, 0, self._address)
                host, port = self._address
                last_error: OSError = OSError(f"{host} has no address")
                for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                    try:
                        return await _open(family, kind, proto, address)
                    except OSError as error:
                        last_error = error
                raise last_error
        except TimeoutError:
            raise ScannerUnavailable(f"cannot reach clamd at {self.url} within {self._timeout} s") from None
        except OSError as error:
            raise ScannerUnavailable(f"cannot reach clamd at {self.url}: {error}") from error


class ScanSession:
    """One INSTREAM scan in progress: ``feed`` the bytes in order, then ``finish`` for the verdict.

    A failure is kept: later calls raise it again, so a pipeline that only looks at ``finish``
    still learns why the scan stopped.
    """

    def __init__(self, sock: socket.socket, *, url: str, timeout: float, chunk_size: int) -> None:
        self._sock = sock
        self._url = url
        self._timeout = timeout
        self._chunk_size = chunk_size
        self._failure: ScanError | None = None
        self._finished = False
        self.bytes_sent = 0

    async def feed(self, data: bytes) -> None:
        """Send ``data`` to clamd, in chunks of at most ``chunk_size`` bytes."""
        self._check_usable()
        view = memoryview(data)
        # An empty piece sends nothing: a zero-length chunk would end the stream.
        for start in range(0, len(view), self._chunk_size):
            piece = view[start : start + self._chunk_size]
            await self._send(struct.pack(">I", len(piece)), piece)
            self.bytes_sent += len(piece)

    async def finish(self) -> ScanResult:
        """End the stream and wait for the verdict."""
        self._check_usable()
        self._finished = True
        await self._send(_END_OF_STREAM)
        try:
            return _verdict(await _read_reply(self._sock, self._url, self._timeout), self._url)
        except ScanError as error:
            self._failure = error
            raise

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._finished:
            raise RuntimeError("this scan session has already finished")

    async def _send(self, *parts: bytes | memoryview) -> None:
        try:
            # clamd speaks before the end of the stream only to refuse it: stop sending bytes it
            # will never read.
            early = _poll(self._sock)
            if early is not None:
                reply = await _read_reply(self._sock, self._url, self._timeout, early) if early else ""
                raise _refusal(reply, self._url)
            await _send(self._sock, parts, self._url, self._timeout)
        except ScanError as error:
            self._failure = error
            raise

    def __repr__(self) -> str:
        return f"<ScanSession {self._url} sent={self.bytes_sent}>"


async def _open(family: int, kind: int, proto: int, address: str | tuple[object, ...]) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _send(sock: socket.socket, parts: tuple[bytes | memoryview, ...], url: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            for part in parts:
                await loop.sock_sendall(sock, part)
    except TimeoutError:
        raise ScannerUnavailable(f"clamd at {url} accepted no data for {timeout} s") from None
    except OSError as error:
        # A broken pipe also happens when clamd refused the stream and hung up; its reply, if
        # any, is still in the socket and says which.
        try:
            reply = await _read_reply(sock, url, timeout)
        except ScanError:
            reply = ""
        if reply:
            raise _refusal(reply, url) from error
        raise ScannerUnavailable(f"connection to clamd at {url} broke: {error}") from error


def _poll(sock: socket.socket) -> bytes | None:
    """What clamd has sent so far without waiting: ``None`` for nothing, ``b""`` for a closed connection."""
    try:
        return sock.recv(_REPLY_LIMIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


async def _read_reply(sock: socket.socket, url: str, timeout: float, received: bytes = b"") -> str:
    """clamd's reply: one line ended by NUL (or by the connection closing)."""
    loop = asyncio.get_running_loop()
    buffer = bytearray(received)
    try:
        async with asyncio.timeout(timeout):
            while b"\0" not in buffer and len(buffer) < _REPLY_LIMIT:
                data = await loop.sock_recv(sock, _REPLY_LIMIT)
                if not data:
                    break
                buffer += data
    except TimeoutError:
        raise ScannerUnavailable(f"no reply from clamd at {url} within {timeout} s") from None
    except OSError as error:
        if not buffer:
            raise ScannerUnavailable(f"connection to clamd at {url} broke: {error}") from error
    return bytes(buffer).split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def _verdict(reply: str, url: str) -> ScanResult:
    if reply == "stream: OK":
        return ScanResult(clean=True)
    if reply.startswith("stream: ") and reply.endswith(" FOUND"):
        signature = reply.removeprefix("stream: ").removesuffix(" FOUND")
        # With AlertExceedsMax, clamd reports a file above MaxFileSize/MaxScanSize as this "signature":
        # the file was not scanned to its end, which is a limit, not a finding.
        if signature.startswith(_LIMIT_SIGNATURE):
            raise ScanLimitExceeded(f"clamd at {url} did not scan the whole stream: {signature}")
        return ScanResult(clean=False, signature=signature)
    raise _refusal(reply, url)


def _refusal(reply: str, url: str) -> ScanError:
    if reply.startswith(_LIMIT_REPLY):
        return ScanLimitExceeded(f"clamd at {url} refused the stream: {reply}")
    if not reply:
        return ScannerUnavailable(f"clamd at {url} closed the connection without a verdict")
    if reply.endswith("ERROR"):
        return ScannerUnavailable(f"clamd at {url} could not scan: {reply}")
    return ScannerUnavailable(f"unexpected reply from clamd at {url}: {reply!r}")


def _parse_url(url: str) -> str | tuple[str, int]:
    """A Unix socket path, or (host, port) for TCP."""
    parts = urlsplit(url)
    if parts.scheme == "unix" and parts.path and not parts.netloc:
        return parts.path
    if parts.scheme == "tcp":
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            host = port = None
        if host and port is not None:
            return host, port
    raise ValueError(f"clamd URL must be tcp://host:port or unix:///path/to/clamd.ctl, got {url!r}")
