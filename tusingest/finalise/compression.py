"""Selective compression of stored files: which types are worth compressing, and streaming brotli/gzip
compressors that run off the event loop.

A file is compressed when its type is on the compressible list and it is large enough; the result is
kept only when it saves enough (``worth_keeping``). Algorithm names are HTTP Content-Encoding tokens
(``br``, ``gzip``), so a reader can hand a stored object out as it is.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Protocol

import brotli

from tusingest.finalise.mime import essence

# Types whose bytes usually shrink. DOCX/XLSX/PPTX and ODF are ZIP containers and gain little; they
# are listed because the product asks for it, and worth_keeping drops a result that saves too little.
DEFAULT_COMPRESSIBLE_TYPES: tuple[str, ...] = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/x-ndjson",
    "application/xml",
    "application/*+xml",
    "application/javascript",
    "application/x-javascript",
    "application/yaml",
    "application/x-yaml",
    "application/sql",
    "application/rtf",
    "application/pdf",
    "application/x-tar",
    "application/msword",
    "application/vnd.ms-excel",
    "application/vnd.ms-powerpoint",
    "application/vnd.openxmlformats-officedocument.*",
    "application/vnd.oasis.opendocument.*",
    "image/svg+xml",
)

# Types that are compressed already (or unknown bytes): compressing them burns CPU for nothing.
DEFAULT_INCOMPRESSIBLE_TYPES: tuple[str, ...] = (
    "image/*",
    "video/*",
    "audio/*",
    "font/woff",
    "font/woff2",
    "application/octet-stream",
    "application/zip",
    "application/x-zip-compressed",
    "application/*+zip",
    "application/java-archive",
    "application/vnd.android.package-archive",
    "application/gzip",
    "application/x-gzip",
    "application/x-7z-compressed",
    "application/x-rar",
    "application/x-rar-compressed",
    "application/vnd.rar",
    "application/x-bzip2",
    "application/x-xz",
    "application/x-lzma",
    "application/x-lzip",
    "application/x-lz4",
    "application/zstd",
    "application/x-zstd",
    "application/x-brotli",
    "application/x-compress",
)

DEFAULT_BROTLI_QUALITY = 4
DEFAULT_GZIP_LEVEL = 6
DEFAULT_MIN_SAVING = 0.10


def should_compress(
    mime: str,
    size: int,
    *,
    min_size: int,
    compressible_types: Sequence[str] = DEFAULT_COMPRESSIBLE_TYPES,
    incompressible_types: Sequence[str] = DEFAULT_INCOMPRESSIBLE_TYPES,
) -> bool:
    """Whether a file of type ``mime`` and ``size`` bytes should be compressed.

    The most specific matching pattern of the two lists decides (``image/svg+xml`` beats ``image/*``);
    on a tie, not compressing wins. A type on neither list is not compressed.
    """
    if size < min_size:
        return False
    compress = _best_match(mime, compressible_types)
    skip = _best_match(mime, incompressible_types)
    return compress is not None and (skip is None or compress > skip)


def _best_match(mime: str, patterns: Sequence[str]) -> int | None:
    """How specific the closest matching pattern is (its number of literal characters), or None."""
    kind = essence(mime)
    scores = [
        len(pattern) - pattern.count("*") - pattern.count("?")
        for pattern in map(essence, patterns)
        if pattern and fnmatchcase(kind, pattern)
    ]
    return max(scores, default=None)


def worth_keeping(original: int, stored: int, min_saving: float = DEFAULT_MIN_SAVING) -> bool:
    """Whether the compressed form (``stored`` bytes) saves at least ``min_saving`` of ``original``."""
    # Exact arithmetic on the decimal as written: 63 bytes of 90 save exactly 30%, which 90 * (1 - 0.3) misses.
    return original > 0 and original - stored >= original * Fraction(str(min_saving))


class StreamDecompressor(Protocol):
    """Undoes a StreamCompressor piece by piece."""

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        """The output ``data`` makes; with ``max_length``, at most about that many bytes: while
        ``needs_input`` is then False, call again with ``b""`` for the rest (a small input can stand
        for gigabytes: bounding each piece keeps memory flat)."""
        ...

    @property
    def needs_input(self) -> bool:
        """Whether all the input given so far has been turned into output."""
        ...

    def finish(self) -> bytes:
        """What is left; raises ValueError when the stream stopped before its end."""
        ...


class StreamCompressor(Protocol):
    """Compresses a stream piece by piece; output comes out whenever the algorithm has some."""

    @property
    def algorithm(self) -> str:
        """The HTTP Content-Encoding token: ``br`` or ``gzip``."""
        ...

    def compress(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """The rest of the output; the compressor cannot be used after."""
        ...

    def decompressor(self) -> StreamDecompressor: ...


class BrotliCompressor:
    def __init__(self, quality: int = DEFAULT_BROTLI_QUALITY) -> None:
        if not 0 <= quality <= 11:
            raise ValueError(f"brotli quality must be 0..11, got {quality}")
        self.quality = quality
        self._compressor = brotli.Compressor(quality=quality)

    @property
    def algorithm(self) -> str:
        return "br"

    def compress(self, data: bytes) -> bytes:
        output: bytes = self._compressor.process(data)
        return output

    def finish(self) -> bytes:
        output: bytes = self._compressor.finish()
        return output

    def decompressor(self) -> StreamDecompressor:
        return BrotliDecompressor()


class BrotliDecompressor:
    def __init__(self) -> None:
        self._decompressor = brotli.Decompressor()

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        if max_length:
            bounded: bytes = self._decompressor.process(data, output_buffer_limit=max_length)
            return bounded
        output: bytes = self._decompressor.process(data)
        return output

    @property
    def needs_input(self) -> bool:
        return bool(self._decompressor.can_accept_more_data())

    def finish(self) -> bytes:
        if not self._decompressor.is_finished():
            raise ValueError("brotli stream ended early")
        return b""


class GzipCompressor:
    def __init__(self, level: int = DEFAULT_GZIP_LEVEL) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"gzip level must be 0..9, got {level}")
        self.level = level
        # wbits=31: deflate with a gzip header and trailer (CRC-32, length); zlib writes mtime 0,
        # so equal input gives equal output.
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)

    @property
    def algorithm(self) -> str:
        return "gzip"

    def compress(self, data: bytes) -> bytes:
        return self._compressor.compress(data)

    def finish(self) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH)

    def decompressor(self) -> StreamDecompressor:
        return GzipDecompressor()


class GzipDecompressor:
    def __init__(self) -> None:
        self._decompressor = zlib.decompressobj(31)
        self._tail = b""  # input that max_length held back

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        output = self._decompressor.decompress(self._tail + data if self._tail else data, max_length)
        self._tail = self._decompressor.unconsumed_tail
        return output

    @property
    def needs_input(self) -> bool:
        return not self._tail

    def finish(self) -> bytes:
        output = self._decompressor.flush()
        if not self._decompressor.eof:
            raise ValueError("gzip stream ended early")
        return output


ALGORITHMS = ("br", "gzip")


def open_compressor(algorithm: str, level: int | None = None) -> StreamCompressor:
    """A fresh compressor for ``algorithm`` (``br`` or ``gzip``; ``brotli`` is taken for ``br``) at
    ``level`` (brotli quality 0..11, gzip 0..9; None: the default)."""
    match algorithm.lower():
        case "br" | "brotli":
            return BrotliCompressor(DEFAULT_BROTLI_QUALITY if level is None else level)
        case "gzip":
            return GzipCompressor(DEFAULT_GZIP_LEVEL if level is None else level)
    raise ValueError(f"unknown compression algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


def open_decompressor(algorithm: str) -> StreamDecompressor:
    """A decompressor for objects stored with ``algorithm``."""
    match algorithm.lower():
        case "br" | "brotli":
            return BrotliDecompressor()
        case "gzip":
            return GzipDecompressor()
    raise ValueError(f"unknown compression algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


async def decompress_stream(
    chunks: AsyncIterable[bytes], algorithm: str, block_size: int = 1 << 20
) -> AsyncIterator[bytes]:
    """The original bytes of an object stored with ``algorithm``, in pieces of about ``block_size``
    at most, decompressed on worker threads. Raises ValueError (also zlib.error, brotli.error) for a
    stream that is cut short or corrupt."""
    decompressor = open_decompressor(algorithm)
    async for chunk in chunks:
        data = chunk
        while True:
            output = await asyncio.to_thread(decompressor.decompress, data, block_size)
            if output:
                yield output
            data = b""
            if decompressor.needs_input:
                break
    while output := await asyncio.to_thread(decompressor.decompress, b"", block_size):
        yield output  # what the last input still held back
    tail = await asyncio.to_thread(decompressor.finish)
    if tail:
        yield tail


async def compress_stream(
    chunks: AsyncIterable[bytes],
    compressor: StreamCompressor,
    sink: Callable[[bytes], Awaitable[None]],
    *,
    executor: Executor | None = None,
) -> None:
    """Compress ``chunks`` into ``sink``, running the compressor on ``executor`` (default: the loop's).

    One chunk is in flight at a time: the next is read only after the previous one's output went to
    the sink, so memory stays bounded whatever the stream's length. Empty output is not passed on.
    """
    loop = asyncio.get_running_loop()
    async for chunk in chunks:
        output = await loop.run_in_executor(executor, compressor.compress, chunk)
        if output:
            await sink(output)
    tail = await loop.run_in_executor(executor, compressor.finish)
    if tail:
        await sink(tail)
