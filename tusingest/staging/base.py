"""What the tus layer, the finaliser and expiry need of staging, whichever backend holds the bytes.

Two backends: ``DirectoryStaging`` (chunk files on a directory, a shared volume in a cluster) and
``S3Staging`` (parts of an S3 multipart upload plus a short tail object, for shared-nothing nodes).
Both keep invariant 1: the session store's committed offset is the truth; whatever a backend holds
beyond it is garbage, never read, and dropped when a writer is next opened or the upload removed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, Self

from tusingest.staging.digests import DigestCache, RunningDigest


class StagingError(Exception):
    """Staged bytes are missing or unreadable: the upload cannot continue."""


class StagingUnavailable(StagingError):
    """Staging's store does not answer or fails on its side (S3 down, throttling, a 5xx): the
    staged bytes may be fine, and the request can be tried again shortly."""


@dataclass(frozen=True, slots=True)
class StagedObject:
    """A sealed upload's bytes as one object in an S3 bucket, which an element on the same endpoint
    and identity copies on the S3 side. ``identity`` is the staging's S3 access, compared by the
    element (staging knows no element)."""

    identity: object
    bucket: str
    key: str
    size: int


class StagingWriter(Protocol):
    """Appends one request's bytes at the committed offset; ``sync`` makes them durable. One writer
    per upload at a time (the locker's job); not safe for concurrent use."""

    @property
    def offset(self) -> int:
        """The upload offset after everything written so far (synced or not)."""
        ...

    @property
    def written(self) -> int:
        """How many bytes this writer took."""
        ...

    @property
    def digest(self) -> RunningDigest | None:
        """The running digest up to the synced offset (valid after ``sync`` or ``drain``); None
        without one. Keep it only after the commit."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Everything written so far is hashed (``digest`` covers it), though not yet durable."""
        ...

    async def sync(self) -> int:
        """Make everything written durable; returns the offset to commit. Call before committing."""
        ...

    async def discard(self) -> None:
        """Forget this writer's bytes: staging is as it was when the writer was opened."""
        ...

    async def aclose(self) -> None: ...


class Staging(Protocol):
    root: Path  # this node's own folder: scratch files of an upload (spools), free-space checks
    digests: DigestCache  # the running digests of uploads written on this node

    def directory(self, upload_id: str) -> Path:
        """This node's scratch folder of an upload (a compression spool lives there), which may not
        exist yet. StagingError for a name staging never gives an upload."""
        ...

    async def open_writer(self, upload_id: str, offset: int, *, digest_tag: str | None = None) -> StagingWriter:
        """A writer positioned at the committed ``offset`` (see ``DirectoryStaging.open_writer``)."""
        ...

    async def seal(self, upload_id: str, length: int) -> None:
        """The upload is complete at ``length`` and takes no more bytes: make its bytes readable as
        one whole. Idempotent; any node may seal, also again after a crash."""
        ...

    def read(
        self, upload_id: str, length: int, block_size: int = 1 << 20, *, start: int = 0, committed: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` up to ``length`` (at most the ``committed`` offset, which is ``length``
        unless given), in blocks of at most ``block_size``. Before ``seal`` only where
        ``reads_unsealed`` says so (else StagingError before the first block)."""
        ...

    def reads_unsealed(self, upload_id: str, committed: int, start: int = 0) -> bool:
        """Whether ``read`` serves the bytes from ``start`` of an upload not yet sealed, at ``committed``."""
        ...

    async def staged_object(self, upload_id: str, length: int) -> StagedObject | None:
        """The sealed upload as one object of ``length`` bytes, or None where there is none (a
        directory holds chunk files: ``chunk_files``)."""
        ...

    async def staged_size(self, upload_id: str) -> int:
        """How many bytes staging holds of the upload, counting those beyond the commit point and
        those a writer on this node has taken but not synced (diagnostics and tests, never truth)."""
        ...

    async def chunk_files(self, upload_id: str, length: int) -> list[tuple[Path, int]] | None:
        """The local files that hold the first ``length`` bytes with how many of each belong to
        them (for an element that links or kernel-copies files); None where the bytes are not in
        files on this machine."""
        ...

    async def use_chunk_files[T](
        self, upload_id: str, length: int, use: Callable[[list[tuple[Path, int]]], T]
    ) -> tuple[list[tuple[Path, int]], T] | None:
        """``chunk_files``, and what ``use`` (which blocks: it reads them, say) makes of them, in one
        thread call; None where the bytes are not in files on this machine (``use`` is not called)."""
        ...

    async def remove(self, upload_id: str) -> None:
        """Drop everything of the upload: staged bytes, scratch files, its running digest."""
        ...

    async def last_written(self, upload_id: str) -> datetime | None:
        """When anything of the upload last changed; None when staging holds nothing of it."""
        ...

    async def list_upload_ids(self) -> list[str]:
        """Every upload id staging holds something of (the expiry sweep's candidates)."""
        ...

    async def aclose(self) -> None:
        """Wait for staging's threads and background cleanups; close its connections."""
        ...
