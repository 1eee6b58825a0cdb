"""The asyncio clamd client against a real clamd (TCP and Unix socket, on asyncio and uvloop), and against
scripted fake servers for the failures a real clamd will not produce on demand: a wrong reply, a reset,
silence.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from typing import Any

import psutil
import pytest
import uvloop

from tests.fixtures.clamd import EICAR, EICAR_BODY_SIGNATURE, Clamd
from tusingest.finalise import clamd as clamd_module
from tusingest.finalise.clamd import (
    ClamdScanner,
    ScanError,
    ScanLimitExceeded,
    ScannerUnavailable,
    ScanResult,
)

MiB = 1 << 20


async def stream(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def clean_bytes(total: int, piece: int = 256 * 1024) -> Iterable[bytes]:
    """``total`` bytes of log-like text in pieces that are each a new object, numbered, so that a
    client keeping pieces would show in its memory."""
    line = b"2026-11-28T12:00:00Z INFO upload finished without incident\n"
    template = (line * (piece // len(line) + 1))[:piece]
    for number, start in enumerate(range(0, total, piece)):
        size = min(piece, total - start)
        yield (b"%012d " % number + template[13:size])[:size]


def scanner(url: str, **options: Any) -> ClamdScanner:
    return ClamdScanner(url, timeout=options.pop("timeout", 30.0), **options)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- a real clamd ---------------------------------------------------------------------------------


async def test_ping_returns_when_clamd_answers(clamd: Clamd) -> None:
    await scanner(clamd.tcp_url).ping()


async def test_clean_stream_is_reported_clean(clamd: Clamd) -> None:
    result = await scanner(clamd.tcp_url).scan(stream(clean_bytes(3 * MiB)))

    assert result == ScanResult(clean=True, signature=None)


async def test_eicar_is_found_with_its_signature_name(clamd: Clamd) -> None:
    result = await scanner(clamd.tcp_url).scan(stream([EICAR]))

    assert result.clean is False
    assert result.signature in clamd.eicar_signatures


async def test_eicar_split_into_one_byte_pieces_is_still_found(clamd: Clamd) -> None:
    result = await scanner(clamd.tcp_url).scan(stream(EICAR[i : i + 1] for i in range(len(EICAR))))

    assert result.clean is False
    assert result.signature in clamd.eicar_signatures


async def test_eicar_after_10_mib_of_clean_bytes_is_found(clamd: Clamd) -> None:
    result = await scanner(clamd.tcp_url).scan(stream(chain(clean_bytes(10 * MiB), [EICAR])))

    assert result == ScanResult(clean=False, signature=EICAR_BODY_SIGNATURE)


async def test_piece_larger_than_chunk_size_is_scanned_whole(clamd: Clamd) -> None:
    # EICAR straddles the 64 KiB chunk boundary inside one 1 MiB piece.
    piece = b"a" * (64 * 1024 - 30) + EICAR + b"b" * (MiB - 64 * 1024 - 38)

    result = await scanner(clamd.tcp_url, chunk_size=64 * 1024).scan(stream([piece]))

    assert result == ScanResult(clean=False, signature=EICAR_BODY_SIGNATURE)


async def test_unix_socket_scans_like_tcp(clamd: Clamd) -> None:
    unix = scanner(clamd.unix_url)

    await unix.ping()
    assert await unix.scan(stream(clean_bytes(MiB))) == ScanResult(clean=True)
    assert (await unix.scan(stream([b"x" * 1000, EICAR]))).signature == EICAR_BODY_SIGNATURE


async def test_session_fed_piece_by_piece_gives_the_verdict(clamd: Clamd) -> None:
    async with scanner(clamd.tcp_url).session() as session:
        for piece in clean_bytes(2 * MiB):
            await session.feed(piece)
        await session.feed(EICAR)
        result = await session.finish()

    assert result == ScanResult(clean=False, signature=EICAR_BODY_SIGNATURE)
    assert session.bytes_sent == 2 * MiB + len(EICAR)


async def test_feeding_empty_bytes_does_not_end_the_stream(clamd: Clamd) -> None:
    async with scanner(clamd.tcp_url).session() as session:
        await session.feed(b"")
        await session.feed(EICAR)
        result = await session.finish()

    assert result.signature in clamd.eicar_signatures


async def test_stream_up_to_stream_max_length_is_scanned(clamd_small_limit: Clamd) -> None:
    result = await scanner(clamd_small_limit.tcp_url).scan(stream(clean_bytes(clamd_small_limit.stream_max_length)))

    assert result == ScanResult(clean=True)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_stream_longer_than_stream_max_length_raises_scan_limit_exceeded(
    clamd_small_limit: Clamd, transport: str
) -> None:
    url = clamd_small_limit.tcp_url if transport == "tcp" else clamd_small_limit.unix_url

    with pytest.raises(ScanLimitExceeded) as raised:
        await scanner(url).scan(stream(clean_bytes(clamd_small_limit.stream_max_length + 1)))

    assert raised.value.code == "scan_size_limit_exceeded"
    assert isinstance(raised.value, ScanError)


async def test_stream_over_max_file_size_raises_scan_limit_exceeded_instead_of_passing_unscanned(
    clamd_small_file_limit: Clamd,
) -> None:
    # EICAR first: clamd would find it if it scanned at all; above MaxFileSize it does not.
    with pytest.raises(ScanLimitExceeded, match=r"Heuristics\.Limits\.Exceeded"):
        await scanner(clamd_small_file_limit.tcp_url).scan(stream(chain([EICAR], clean_bytes(2 * MiB))))


async def test_refused_stream_stops_feeding_long_before_its_end(clamd_small_limit: Clamd) -> None:
    # 1 MiB is allowed; 256 MiB offered. Only what the socket buffers swallow may pass the limit.
    async with scanner(clamd_small_limit.tcp_url).session() as session:
        with pytest.raises(ScanLimitExceeded):
            for piece in clean_bytes(256 * MiB):
                await session.feed(piece)

    assert session.bytes_sent < 64 * MiB


async def test_refusal_seen_only_as_a_broken_pipe_is_read_as_limit_exceeded(
    clamd_small_limit: Clamd, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never look for an early reply: the broken pipe is then the only sign, and the reply waiting
    # in the socket must still be read (an asyncio stream transport would have thrown it away).
    monkeypatch.setattr(clamd_module, "_poll", lambda sock: None)

    with pytest.raises(ScanLimitExceeded) as raised:
        await scanner(clamd_small_limit.tcp_url).scan(stream(clean_bytes(256 * MiB)))

    assert isinstance(raised.value.__cause__, OSError)


async def test_session_that_failed_raises_the_same_error_on_finish(clamd_small_limit: Clamd) -> None:
    async with scanner(clamd_small_limit.tcp_url).session() as session:
        with pytest.raises(ScanLimitExceeded) as raised_by_feed:
            for piece in clean_bytes(64 * MiB):
                await session.feed(piece)
        with pytest.raises(ScanLimitExceeded) as raised_by_finish:
            await session.finish()

    assert raised_by_finish.value is raised_by_feed.value


async def test_unreachable_port_raises_scanner_unavailable() -> None:
    unreachable = scanner(f"tcp://127.0.0.1:{unused_port()}", timeout=5.0)

    with pytest.raises(ScannerUnavailable) as raised:
        await unreachable.scan(stream([b"data"]))
    with pytest.raises(ScannerUnavailable):
        await unreachable.ping()

    assert raised.value.code == "scanner_unavailable"


async def test_missing_unix_socket_raises_scanner_unavailable(tmp_path: Any) -> None:
    with pytest.raises(ScannerUnavailable):
        await scanner(f"unix://{tmp_path}/clamd.ctl").ping()


@pytest.mark.parametrize("url", ["http://127.0.0.1:3310", "tcp://127.0.0.1", "tcp://:3310", "unix://", "clamd"])
def test_malformed_url_is_refused_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="clamd URL"):
        ClamdScanner(url, timeout=1.0)


@pytest.mark.slow
async def test_200_mib_stream_is_scanned_to_the_end_in_flat_memory(clamd: Clamd) -> None:
    process = psutil.Process()
    client = scanner(clamd.tcp_url, timeout=120.0)
    await client.scan(stream(clean_bytes(8 * MiB)))  # warm up: buffers, sockets, allocator arenas
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = await client.scan(stream(chain(clean_bytes(200 * MiB), [EICAR])))
    finally:
        done.set()
        sampler.join()

    assert result == ScanResult(clean=False, signature=EICAR_BODY_SIGNATURE)
    assert peak - baseline < 16 * MiB, f"RSS grew by {(peak - baseline) / MiB:.1f} MiB"


# --- uvloop (what `tusingest serve` runs on) ------------------------------------------------------


def run_on_uvloop[T](scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    # A thread of its own: the test's thread may hold pytest-asyncio's loop.
    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(uvloop.run, scenario()).result()


def test_eicar_is_found_on_uvloop(clamd: Clamd) -> None:
    async def scenario() -> ScanResult:
        return await scanner(clamd.tcp_url).scan(stream(chain(clean_bytes(2 * MiB), [EICAR])))

    assert run_on_uvloop(scenario) == ScanResult(clean=False, signature=EICAR_BODY_SIGNATURE)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_stream_over_the_limit_raises_scan_limit_exceeded_on_uvloop(clamd_small_limit: Clamd, transport: str) -> None:
    url = clamd_small_limit.tcp_url if transport == "tcp" else clamd_small_limit.unix_url

    async def scenario() -> ScanResult:
        return await scanner(url).scan(stream(clean_bytes(32 * MiB)))

    with pytest.raises(ScanLimitExceeded):
        run_on_uvloop(scenario)


# --- scripted fake clamd ------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def fake_clamd(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"tcp://127.0.0.1:{port}"


async def read_instream(reader: asyncio.StreamReader) -> list[int]:
    """Read one INSTREAM command to its end; return the chunk lengths (the final 0 included)."""
    assert await reader.readexactly(10) == b"zINSTREAM\0"
    lengths = []
    while True:
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        lengths.append(length)
        if length == 0:
            return lengths
        await reader.readexactly(length)


async def test_pieces_are_sent_in_chunks_of_at_most_chunk_size() -> None:
    seen: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.extend(await read_instream(reader))
        writer.write(b"stream: OK\0")
        writer.close()

    server, url = await fake_clamd(handler)
    async with server:
        result = await scanner(url, chunk_size=1000).scan(stream([b"x" * 2500, b"y" * 10]))

    assert result == ScanResult(clean=True)
    assert seen == [1000, 1000, 500, 10, 0]


async def test_refusal_that_arrives_while_streaming_stops_the_next_feed_before_it_sends() -> None:
    replied = asyncio.Event()
    hold = asyncio.Event()
    received = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readexactly(10)
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        received = len(await reader.readexactly(length))
        writer.write(b"INSTREAM size limit exceeded. ERROR\0")
        await writer.drain()
        replied.set()
        await hold.wait()
        writer.close()

    server, url = await fake_clamd(handler)
    async with server, scanner(url).session() as session:
        try:
            await session.feed(b"x" * 1000)
            await replied.wait()
            with pytest.raises(ScanLimitExceeded):
                await session.feed(b"y" * 1000)
        finally:
            hold.set()

    assert received == 1000
    assert session.bytes_sent == 1000


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"stream: Can't create temporary file ERROR\0", ScannerUnavailable),
        (b"UNKNOWN COMMAND\0", ScannerUnavailable),
        (b"INSTREAM size limit exceeded. ERROR\0", ScanLimitExceeded),
        (b"stream: Heuristics.Limits.Exceeded.MaxScanSize FOUND\0", ScanLimitExceeded),
        (b"", ScannerUnavailable),
    ],
    ids=["error-reply", "nonsense", "stream-limit", "scan-limit", "no-reply"],
)
async def test_reply_other_than_a_verdict_raises(reply: bytes, error: type[ScanError]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_instream(reader)
        writer.write(reply)
        writer.close()

    server, url = await fake_clamd(handler)
    async with server:
        with pytest.raises(error):
            await scanner(url).scan(stream([b"data"]))


async def test_connection_reset_mid_stream_raises_scanner_unavailable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
        writer.transport.abort()

    server, url = await fake_clamd(handler)
    async with server:
        with pytest.raises(ScannerUnavailable):
            await scanner(url).scan(stream(clean_bytes(64 * MiB)))


async def test_clamd_that_never_answers_raises_scanner_unavailable_after_the_timeout() -> None:
    hold = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_instream(reader)
        await hold.wait()  # the verdict never comes
        writer.close()

    server, url = await fake_clamd(handler)
    async with server:
        try:
            with pytest.raises(ScannerUnavailable, match="no reply"):
                await scanner(url, timeout=0.2).scan(stream([b"data"]))
        finally:
            hold.set()


async def test_clamd_that_stops_reading_raises_scanner_unavailable_after_the_timeout() -> None:
    hold = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()  # never reads: the socket buffers fill and sending stalls
        writer.close()

    server, url = await fake_clamd(handler)
    async with server:
        try:
            with pytest.raises(ScannerUnavailable, match="accepted no data"):
                await scanner(url, timeout=0.2).scan(stream(clean_bytes(256 * MiB)))
        finally:
            hold.set()
