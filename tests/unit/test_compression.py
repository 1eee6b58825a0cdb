"""Selective compression: the policy table, brotli and gzip round trips of streamed input, the worth-keeping
rule, and compress_stream running the compressor off the event loop with one chunk in flight."""

from __future__ import annotations

import asyncio
import gzip
import random
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor

import brotli
import pytest

from tusingest.finalise.compression import (
    DEFAULT_BROTLI_QUALITY,
    DEFAULT_GZIP_LEVEL,
    BrotliCompressor,
    GzipCompressor,
    StreamCompressor,
    StreamDecompressor,
    compress_stream,
    decompress_stream,
    open_compressor,
    open_decompressor,
    should_compress,
    worth_keeping,
)

MIN_SIZE = 1024
BIG = 10 * MIN_SIZE

COMPRESSIBLE = [
    "text/plain",
    "text/csv",
    "text/html",
    "text/plain; charset=utf-8",
    "Text/CSV",
    "application/json",
    "application/ld+json",
    "application/geo+json",
    "application/xml",
    "application/atom+xml",
    "application/pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.oasis.opendocument.text",
    "application/vnd.oasis.opendocument.spreadsheet",
    "application/javascript",
    "application/x-ndjson",
    "application/rtf",
    "image/svg+xml",
    "application/x-tar",
]
NEVER = [
    "image/png",
    "image/jpeg",
    "image/webp",
    "image/gif",
    "video/mp4",
    "audio/mpeg",
    "application/zip",
    "application/gzip",
    "application/x-7z-compressed",
    "application/x-rar",
    "application/x-bzip2",
    "application/x-xz",
    "application/zstd",
    "application/octet-stream",
    "application/epub+zip",
    "application/x-unheard-of",
]


def log_text(size: int) -> bytes:
    """Log lines with varying fields: compressible like real text, not trivially."""
    rng = random.Random(7)
    lines = []
    total = 0
    while total < size:
        line = b"2026-11-28T12:%02d:%02dZ %s path=/api/files/%d status=%d request=%s\n" % (
            rng.randrange(60),
            rng.randrange(60),
            rng.choice([b"INFO", b"WARN", b"DEBUG"]),
            rng.randrange(10**6),
            rng.choice([200, 201, 404, 409]),
            rng.randbytes(6).hex().encode(),
        )
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def uneven_pieces(data: bytes) -> list[bytes]:
    """``data`` cut at awkward places: single bytes, odd sizes, one large piece."""
    sizes = [1, 1, 7, 100, 4095, 65536, 1 << 20]
    pieces, start, index = [], 0, 0
    while start < len(data):
        size = sizes[index % len(sizes)]
        pieces.append(data[start : start + size])
        start += size
        index += 1
    return pieces


async def stream(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def decompress_in_pieces(decompressor: StreamDecompressor, data: bytes, piece: int = 1000) -> bytes:
    output = [decompressor.decompress(data[start : start + piece]) for start in range(0, len(data), piece)]
    return b"".join(output) + decompressor.finish()


# --- policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mime", COMPRESSIBLE)
def test_compressible_type_above_min_size_is_compressed(mime: str) -> None:
    assert should_compress(mime, BIG, min_size=MIN_SIZE) is True


@pytest.mark.parametrize("mime", NEVER)
def test_compressed_media_archives_and_unknown_types_are_never_compressed(mime: str) -> None:
    assert should_compress(mime, BIG, min_size=MIN_SIZE) is False


@pytest.mark.parametrize(("size", "expected"), [(MIN_SIZE - 1, False), (MIN_SIZE, True), (0, False)])
def test_min_size_is_the_smallest_size_that_is_compressed(size: int, expected: bool) -> None:
    assert should_compress("text/plain", size, min_size=MIN_SIZE) is expected


def test_overridden_list_replaces_the_default() -> None:
    only_csv = ["text/csv"]

    assert should_compress("text/csv", BIG, min_size=MIN_SIZE, compressible_types=only_csv) is True
    assert should_compress("text/plain", BIG, min_size=MIN_SIZE, compressible_types=only_csv) is False
    assert should_compress("text/plain", BIG, min_size=MIN_SIZE, compressible_types=[]) is False


def test_most_specific_pattern_decides_between_the_lists() -> None:
    everything = ["*/*"]

    # */* is less specific than image/*: a broad override does not compress photos...
    assert should_compress("image/jpeg", BIG, min_size=MIN_SIZE, compressible_types=everything) is False
    assert should_compress("text/plain", BIG, min_size=MIN_SIZE, compressible_types=everything) is True
    # ...while naming a type exactly beats the image/* on the never list.
    assert should_compress("image/bmp", BIG, min_size=MIN_SIZE, compressible_types=["image/bmp"]) is True
    # A tie goes to not compressing.
    assert should_compress("image/bmp", BIG, min_size=MIN_SIZE, compressible_types=["image/*"]) is False


# --- worth keeping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "stored", "min_saving", "expected"),
    [
        (1000, 900, 0.10, True),
        (1000, 901, 0.10, False),
        (30, 27, 0.10, True),
        (30, 28, 0.10, False),
        (90, 63, 0.30, True),  # exactly 30%, which 90 * (1 - 0.3) = 62.99999999999999 in floating point misses
        (90, 64, 0.30, False),
        (1000, 1100, 0.10, False),
        (0, 0, 0.10, False),
        (100, 50, 0.5, True),
        (100, 51, 0.5, False),
        (100, 100, 0.0, True),
    ],
)
def test_worth_keeping_requires_the_minimum_saving(
    original: int, stored: int, min_saving: float, expected: bool
) -> None:
    assert worth_keeping(original, stored, min_saving) is expected


def test_worth_keeping_defaults_to_a_ten_percent_saving() -> None:
    assert worth_keeping(1000, 900) is True
    assert worth_keeping(1000, 901) is False


# --- compressors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["br", "gzip"])
async def test_streamed_input_round_trips_through_compress_stream(algorithm: str) -> None:
    original = log_text(3 << 20)
    compressor = open_compressor(algorithm)
    stored = bytearray()

    async def sink(data: bytes) -> None:
        stored.extend(data)

    await compress_stream(stream(uneven_pieces(original)), compressor, sink)

    assert decompress_in_pieces(compressor.decompressor(), bytes(stored)) == original
    assert decompress_in_pieces(open_decompressor(algorithm), bytes(stored)) == original
    assert worth_keeping(len(original), len(stored))


def test_brotli_output_is_standard_brotli() -> None:
    original = log_text(200_000)
    compressor = BrotliCompressor(5)

    stored = b"".join(compressor.compress(piece) for piece in uneven_pieces(original)) + compressor.finish()

    assert brotli.decompress(stored) == original


def test_gzip_output_is_a_standard_gzip_member() -> None:
    original = log_text(200_000)
    compressor = GzipCompressor(6)

    stored = b"".join(compressor.compress(piece) for piece in uneven_pieces(original)) + compressor.finish()

    assert stored[:2] == b"\x1f\x8b"
    assert gzip.decompress(stored) == original


@pytest.mark.parametrize("algorithm", ["br", "gzip"])
def test_decompressor_finish_refuses_a_truncated_stream(algorithm: str) -> None:
    compressor = open_compressor(algorithm)
    stored = compressor.compress(log_text(100_000)) + compressor.finish()
    decompressor = compressor.decompressor()
    decompressor.decompress(stored[: len(stored) // 2])

    with pytest.raises(ValueError, match="ended early"):
        decompressor.finish()


@pytest.mark.parametrize("algorithm", ["br", "gzip"])
async def test_decompress_stream_gives_the_original_in_bounded_pieces_however_well_it_compressed(
    algorithm: str,
) -> None:
    original = bytes(64 << 20) + log_text(100_000)  # zeros: a few kilobytes stand for 64 MiB
    compressor = open_compressor(algorithm, 1)
    stored = compressor.compress(original) + compressor.finish()
    assert len(stored) < 1 << 20  # the whole object is one input chunk

    pieces = [piece async for piece in decompress_stream(stream([stored]), algorithm, 1 << 20)]

    assert b"".join(pieces) == original
    assert max(len(piece) for piece in pieces) <= 3 << 20  # brotli may overshoot its limit by one buffer


@pytest.mark.parametrize("algorithm", ["br", "gzip"])
async def test_decompress_stream_refuses_a_truncated_object(algorithm: str) -> None:
    compressor = open_compressor(algorithm)
    stored = compressor.compress(log_text(100_000)) + compressor.finish()

    with pytest.raises(ValueError, match="ended early"):
        [piece async for piece in decompress_stream(stream([stored[: len(stored) // 2]]), algorithm)]


@pytest.mark.parametrize(
    ("algorithm", "level", "kind", "token", "effective_level"),
    [
        ("br", None, BrotliCompressor, "br", DEFAULT_BROTLI_QUALITY),
        ("brotli", 9, BrotliCompressor, "br", 9),
        ("gzip", None, GzipCompressor, "gzip", DEFAULT_GZIP_LEVEL),
        ("GZIP", 1, GzipCompressor, "gzip", 1),
    ],
)
def test_open_compressor_names_the_content_encoding(
    algorithm: str, level: int | None, kind: type, token: str, effective_level: int
) -> None:
    compressor = open_compressor(algorithm, level)

    assert isinstance(compressor, kind)
    assert compressor.algorithm == token
    assert getattr(compressor, "quality" if kind is BrotliCompressor else "level") == effective_level


@pytest.mark.parametrize(("algorithm", "level"), [("zstd", None), ("deflate", 6), ("br", 12), ("gzip", 10), ("br", -1)])
def test_open_compressor_refuses_unknown_algorithms_and_levels(algorithm: str, level: int | None) -> None:
    with pytest.raises(ValueError):
        open_compressor(algorithm, level)


# --- compress_stream ---------------------------------------------------------------------------------


class LoopProbingCompressor:
    """Compresses nothing; each call asks the event loop to run a task and waits for it, which only
    completes if the loop is free while the compressor works."""

    algorithm = "probe"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.threads: set[str] = set()

    def _probe(self) -> None:
        self.threads.add(threading.current_thread().name)

        async def answer() -> None:
            return None

        asyncio.run_coroutine_threadsafe(answer(), self.loop).result(timeout=5)

    def compress(self, data: bytes) -> bytes:
        self._probe()
        return data[:1]

    def finish(self) -> bytes:
        self._probe()
        return b""

    def decompressor(self) -> StreamDecompressor:
        raise NotImplementedError


async def test_compress_stream_keeps_the_event_loop_free_while_compressing() -> None:
    compressor = LoopProbingCompressor(asyncio.get_running_loop())
    received: list[bytes] = []

    async def sink(data: bytes) -> None:
        received.append(data)

    await compress_stream(stream([b"a1", b"b2", b"c3"]), compressor, sink)

    assert received == [b"a", b"b", b"c"]
    assert threading.current_thread().name not in compressor.threads


async def test_compress_stream_runs_the_compressor_on_the_given_executor() -> None:
    compressor = LoopProbingCompressor(asyncio.get_running_loop())

    async def sink(data: bytes) -> None:
        pass

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="compression") as executor:
        await compress_stream(stream([b"x" * 10] * 3), compressor, sink, executor=executor)

    assert compressor.threads == {"compression_0"}


async def test_compress_stream_reads_the_next_chunk_only_after_the_previous_output_reached_the_sink() -> None:
    events: list[str] = []

    class Recording:
        algorithm = "recording"

        def compress(self, data: bytes) -> bytes:
            events.append(f"compress {data.decode()}")
            return b"" if data == b"2" else b"out" + data  # chunk 2 yields nothing yet

        def finish(self) -> bytes:
            events.append("finish")
            return b"tail"

        def decompressor(self) -> StreamDecompressor:
            raise NotImplementedError

    async def source() -> AsyncIterator[bytes]:
        for number in (b"1", b"2", b"3"):
            events.append(f"read {number.decode()}")
            yield number

    async def sink(data: bytes) -> None:
        events.append(f"sink {data.decode()}")

    compressor: StreamCompressor = Recording()
    await compress_stream(source(), compressor, sink)

    assert events == [
        "read 1",
        "compress 1",
        "sink out1",
        "read 2",
        "compress 2",
        "read 3",
        "compress 3",
        "sink out3",
        "finish",
        "sink tail",
    ]
