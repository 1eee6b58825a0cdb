"""The finaliser's one pass over a complete upload: MD5 and SHA-256, size, MIME type, virus scan
and compression into a spool file, all while the bytes stream by once.

The result says what the bytes are and which copy to store (the spool when compression saved
enough, else the staged bytes). A file that must be refused raises ``FileRejected`` with a code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterable, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tusingest.finalise.clamd import ClamdScanner, ScanLimitExceeded, ScannerUnavailable, ScanSession
from tusingest.finalise.compression import (
    StreamCompressor,
    open_compressor,
    should_compress,
    worth_keeping,
)
from tusingest.finalise.mime import HEAD_BYTES, detect_mime, mime_allowed
from tusingest.finalise.refusals import Refused
from tusingest.observability import tracing
from tusingest.staging import Digests

log = logging.getLogger(__name__)


class FileRejected(Refused):
    """The file cannot be accepted; ``code`` and ``message`` go to the client, ``status`` is 422
    or 415 (a refused type). A rejection is final: retrying the same bytes gives the same answer."""

    def __init__(self, code: str, message: str, *, status: int = 422) -> None:
        super().__init__(message, code=code, status=status)


@dataclass(frozen=True, slots=True)
class FinalisePolicy:
    max_size: int
    mime_validation: bool = True
    allowed_mime_types: tuple[str, ...] = ()
    compression_enabled: bool = True
    compression_algorithm: str = "br"
    compression_level: int | None = None
    compression_min_size: int = 1 << 20
    compression_min_saving: float = 0.10
    scan_fail_open: bool = False


@dataclass(frozen=True, slots=True)
class Compressed:
    algorithm: str  # the Content-Encoding token: br or gzip
    path: str  # the spool file holding the compressed bytes
    stored_size: int


@dataclass(frozen=True, slots=True)
class Inspection:
    size: int
    md5: str
    sha256: str
    content_type: str
    scanned: bool
    scan_note: str | None  # why the file was not scanned although scanning is on (fail-open)
    compression: Compressed | None


def check_mime(mime: str, policy: FinalisePolicy) -> None:
    """Refuse a type outside ALLOWED_MIME_TYPES (415), when MIME validation is on."""
    if policy.mime_validation and not mime_allowed(mime, policy.allowed_mime_types):
        raise FileRejected(
            "mime_type_not_allowed",
            f"files of type {mime} are not accepted (allowed: {', '.join(policy.allowed_mime_types)})",
            status=415,
        )


def declared_checksums(metadata: Mapping[str, str]) -> dict[str, str]:
    """Client-declared digests from upload metadata (``sha256``, ``md5``; hex or base64), as hex."""
    declared = {}
    for algorithm, size in (("sha256", 32), ("md5", 16)):
        value = (metadata.get(algorithm) or metadata.get(f"checksum_{algorithm}") or "").strip()
        if not value:
            continue
        if len(value) == size * 2:
            try:
                bytes.fromhex(value)
            except ValueError:
                pass
            else:
                declared[algorithm] = value.lower()
                continue
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != size:
            raise FileRejected("invalid_checksum", f"metadata {algorithm} is neither hex nor base64 of {size} bytes")
        declared[algorithm] = raw.hex()
    return declared


class _Pass:
    """The per-block work that runs off the event loop: hashing, compressing, spooling. ``block``
    and ``md5_block`` run on two threads at once (hashlib lets go of the GIL), each once per block
    and in order; with ``digests`` known already (staging hashed the bytes as they were committed)
    nothing is hashed again."""

    def __init__(self, compressor: StreamCompressor | None, spool: BinaryIO | None, digests: Digests | None) -> None:
        self.digests = digests
        self.md5 = hashlib.md5(usedforsecurity=False) if digests is None else None
        self.sha256 = hashlib.sha256() if digests is None else None
        self.compressor = compressor
        self.spool = spool
        self.size = 0

    def block(self, data: bytes) -> None:
        self.size += len(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        if self.compressor is not None and self.spool is not None:
            self.spool.write(self.compressor.compress(data))

    def md5_block(self, data: bytes) -> None:
        if self.md5 is not None:
            self.md5.update(data)

    def hexdigests(self) -> tuple[str, str]:
        if self.md5 is None or self.sha256 is None:
            assert self.digests is not None
            return self.digests.md5, self.digests.sha256
        return self.md5.hexdigest(), self.sha256.hexdigest()

    def finish(self) -> int:
        if self.compressor is None or self.spool is None:
            return 0
        self.spool.write(self.compressor.finish())
        self.spool.flush()
        os.fsync(self.spool.fileno())
        return self.spool.tell()


async def inspect(
    blocks: AsyncIterable[bytes],
    *,
    expected_size: int,
    policy: FinalisePolicy,
    scanner: ClamdScanner | None,
    metadata: Mapping[str, str],
    spool_path: Path,
    digests: Digests | None = None,
    compress: bool = True,
) -> Inspection:
    """Read the upload once and decide about it. Raises FileRejected, or ScannerUnavailable when
    the scanner cannot be reached and scanning fails closed (a transient failure: retry later).
    ``digests``: MD5 and SHA-256 of exactly ``expected_size`` bytes, taken as they were committed;
    the pass then checks them against the declared ones instead of hashing again. ``compress``
    False: the caller has the compression covered (``finalise.follow``); the pass does not compress."""
    if expected_size > policy.max_size:
        raise FileRejected("file_too_large", f"the file has {expected_size} bytes; the limit is {policy.max_size}")
    declared = declared_checksums(metadata)
    iterator = aiter(blocks)
    head = bytearray()
    pending: list[bytes] = []
    async for block in iterator:
        pending.append(block)
        head += block[: HEAD_BYTES - len(head)]
        if len(head) >= HEAD_BYTES:
            break
    content_type = await asyncio.to_thread(detect_mime, bytes(head))
    check_mime(content_type, policy)

    compress = compress and wants_compression(policy, content_type, expected_size)
    compressor = open_compressor(policy.compression_algorithm, policy.compression_level) if compress else None
    spool: BinaryIO | None = None
    if compressor is not None:
        await asyncio.to_thread(spool_path.parent.mkdir, parents=True, exist_ok=True)
        spool = await asyncio.to_thread(open, spool_path, "wb")
    known = digests if digests is not None and digests.size == expected_size else None
    if known is not None and compressor is None and scanner is None:
        # Hashed as committed, nothing to compress or scan: the rest of the bytes need no reading.
        declared_match(declared, known.md5, known.sha256)
        return Inspection(known.size, known.md5, known.sha256, content_type, False, None, None)
    work = _Pass(compressor, spool, known)
    started = time.time_ns()
    scanned, scan_note = scanner is not None, None
    try:
        async with contextlib.AsyncExitStack() as stack:
            session: ScanSession | None = None
            if scanner is not None:
                try:
                    session = await stack.enter_async_context(scanner.session())
                except ScannerUnavailable as exc:
                    scanned, scan_note, session = _scan_unavailable(exc, policy)

            async def feed(data: bytes) -> None:
                nonlocal session, scanned, scan_note
                # The scan goes to clamd while this block is hashed and compressed on two threads.
                # Every part ends before the next block starts, also when the scan fails.
                work_done = all_ended(asyncio.to_thread(work.block, data), asyncio.to_thread(work.md5_block, data))
                if session is None:
                    await work_done
                    return
                try:
                    await all_ended(work_done, session.feed(data))
                except ScannerUnavailable as exc:
                    scanned, scan_note, session = _scan_unavailable(exc, policy)
                except ScanLimitExceeded as exc:
                    scanned, scan_note, session = _scan_too_large(exc, policy)

            for block in pending:
                await feed(block)
            pending.clear()
            async for block in iterator:
                await feed(block)
                if work.size > policy.max_size:
                    raise FileRejected("file_too_large", f"the file exceeds the limit of {policy.max_size} bytes")
            stored_size = await asyncio.to_thread(work.finish)
            if session is not None:
                try:
                    result = await session.finish()
                except ScannerUnavailable as exc:
                    scanned, scan_note, session = _scan_unavailable(exc, policy)
                except ScanLimitExceeded as exc:
                    scanned, scan_note, session = _scan_too_large(exc, policy)
                else:
                    if not result.clean:
                        raise FileRejected("virus_detected", f"the file contains {result.signature}")
    except BaseException:
        if spool is not None:
            spool.close()
            with contextlib.suppress(OSError):
                os.unlink(spool_path)  # quick, and must happen even when cancelled
        raise
    if spool is not None:
        spool.close()

    if work.size != expected_size:
        raise FileRejected("size_mismatch", f"read {work.size} bytes, the upload declares {expected_size}")
    md5, sha256 = work.hexdigests()
    declared_match(declared, md5, sha256)

    compression = None
    if compressor is not None:
        kept = worth_keeping(work.size, stored_size, policy.compression_min_saving)
        attributes: tracing.Attributes = {
            "compression.algorithm": compressor.algorithm,
            "compression.kept": kept,
            "size.original": work.size,
            "size.stored": stored_size,
        }
        tracing.record(tracing.COMPRESSION, started, attributes)
        if kept:
            compression = Compressed(compressor.algorithm, str(spool_path), stored_size)
        else:
            await asyncio.to_thread(spool_path.unlink, True)
    return Inspection(work.size, md5, sha256, content_type, scanned, scan_note, compression)


def wants_compression(policy: FinalisePolicy, content_type: str, size: int) -> bool:
    """Whether a file of this type and size is to be compressed (before ``worth_keeping`` judges the result)."""
    return policy.compression_enabled and should_compress(content_type, size, min_size=policy.compression_min_size)


def declared_match(declared: Mapping[str, str], md5: str, sha256: str) -> None:
    """Refuse the file when a digest its client declared differs from what its bytes hash to."""
    for algorithm, value in declared.items():
        actual = sha256 if algorithm == "sha256" else md5
        if actual != value:
            raise FileRejected("checksum_mismatch", f"the file's {algorithm} is {actual}, the client declared {value}")


def kept_compression(compressed: Compressed | None, size: int, policy: FinalisePolicy) -> Compressed | None:
    """``compressed`` when it saves enough of ``size`` bytes to be kept, else None (its spool removed)."""
    if compressed is None:
        return None
    if worth_keeping(size, compressed.stored_size, policy.compression_min_saving):
        return compressed
    with contextlib.suppress(OSError):
        os.unlink(compressed.path)
    return None


async def all_ended(*parts: Awaitable[object]) -> None:
    """Await every part to its end, then raise the first failure (``gather`` would raise at once and
    leave the others running, so the next block's work could overtake them)."""
    for outcome in await asyncio.gather(*parts, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


def _scan_unavailable(exc: ScannerUnavailable, policy: FinalisePolicy) -> tuple[bool, str, None]:
    if not policy.scan_fail_open:
        raise exc
    log.warning("virus scan skipped (VIRUS_SCAN_FAIL_OPEN): %s", exc)
    return False, f"not scanned: {exc}", None


def _scan_too_large(exc: ScanLimitExceeded, policy: FinalisePolicy) -> tuple[bool, str, None]:
    if not policy.scan_fail_open:
        raise FileRejected("scan_size_limit_exceeded", f"the virus scanner refused the file: {exc}") from exc
    log.warning("virus scan incomplete (VIRUS_SCAN_FAIL_OPEN): %s", exc)
    return False, f"not scanned: {exc}", None
