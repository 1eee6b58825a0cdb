"""The Storage Element backend protocol: what the saga needs from any place that keeps objects.

Keys are relative object names (``2026/11/28/12/name_alice_20261128T120000_<id>.txt``); an S3
backend puts them under its bucket and prefix, a directory backend under its root. Every method
is safe to repeat: a second ``delete`` of the same key is not an error, a second ``put`` replaces.
Failures are values with a ``transient`` flag so callers know whether a retry can help, and
``ObjectRefused`` marks the ones that are the request's own fault (a name or an object the element
can never take), which say nothing about the element's health.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tusingest.staging import StagedObject


class BackendError(Exception):
    """A backend operation failed. ``transient``: the same call may succeed later."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class ObjectRefused(BackendError):
    """The element refused this object for what it is, not for what the element is going through:
    a name component too long for its file system, a name it cannot represent, a key S3 rejects
    (KeyTooLongError, InvalidArgument, ...). Never transient; never counts against the element's
    breaker; another element would most likely refuse it too, so the file fails instead."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message, transient=False)
        self.key = key


class ObjectNotFound(BackendError):
    """The key does not exist on the element."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} not found", transient=False)
        self.key = key


class InvalidKey(BackendError):
    """The key is empty, absolute, or climbs out of the element (``..``)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"invalid object key {key!r}", transient=False)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    content_type: str | None = None
    content_encoding: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """One Storage Element's object store (S3 bucket + prefix, or a directory)."""

    element_id: str

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        length: int | None = None,
        content_type: str = "application/octet-stream",
        content_encoding: str | None = None,
        metadata: Mapping[str, str] | None = None,
        durable: bool = True,
    ) -> ObjectInfo:
        """Store the stream under key; length may be unknown. Memory stays bounded by the part
        size. Nothing is visible under key unless the whole stream was stored: a failure leaves
        no object (and, on S3, no multipart upload) behind. A process killed midway cannot clean
        up; discard_incomplete and sweep_incomplete remove what it left.

        ``durable=False``: the bytes are on disk when this returns, but the object's name may not
        survive a power cut until the next durable put into the same folder (on a directory element
        its directory fsync covers both; an object's sidecar is such a put). S3 puts are always durable."""
        ...

    def get(self, key: str, *, start: int = 0) -> AsyncIterator[bytes]:
        """Stream the object's bytes from byte ``start`` (less than its size) on; raises
        ObjectNotFound on first iteration when absent."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """Size and stored attributes of key, or None when it does not exist."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove key; True when something was removed, False when it was already gone."""
        ...

    def can_copy_to(self, other: Backend) -> bool:
        """True when ``copy_to(other)`` can copy without streaming through this process
        (the same S3 endpoint and credentials, or the same filesystem)."""
        ...

    async def copy_to(self, key: str, other: Backend, other_key: str) -> ObjectInfo:
        """Server-side copy of key to other_key on other; only when can_copy_to(other)."""
        ...

    def list_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every key under prefix (relative to the element), in no promised order."""
        ...

    async def discard_incomplete(self, key: str) -> int:
        """Remove what earlier puts of key left unfinished (a put whose process was killed leaves
        a temp file, or on S3 an incomplete multipart upload); returns how many were removed.
        Only for a key no put is writing now: a running put of key would be cut off."""
        ...

    async def sweep_incomplete(self, older_than: datetime) -> int:
        """Remove what puts of any key begun before older_than (timezone-aware) left unfinished;
        returns how many were removed. An older_than further back than the longest a put can run
        never touches a put in progress."""
        ...

    async def probe(self) -> None:
        """Health probe (S3 HeadBucket, a directory write test); raises BackendError."""
        ...

    async def close(self) -> None: ...


async def close_stream(chunks: AsyncIterator[bytes]) -> None:
    """Let go of a stream ``Backend.get`` returned, read to its end or not (its file, its connection)."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


@runtime_checkable
class FilePlacer(Protocol):
    """Optional, beside ``Backend``: an element that can take an object from files on this machine
    without the bytes passing through the process (a directory element: a hard link on the same
    file system, else a kernel copy). The saga uses it when the element has it, ``put`` otherwise."""

    async def place_file(
        self,
        key: str,
        files: Sequence[tuple[Path, int]],
        *,
        length: int,
        content_type: str = "application/octet-stream",
        content_encoding: str | None = None,
        metadata: Mapping[str, str] | None = None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
        durable: bool = True,
    ) -> ObjectInfo:
        """Store the first ``size`` bytes of each ``(path, size)``, in order, under key: as durable
        and atomic as ``put`` (``durable`` as there), and the files stay as they are (the caller may
        still need them). ``before_commit`` is awaited once the bytes are in place under a temp name,
        before they become the object (a test stops there); what a kill leaves is removed like a put's."""
        ...


@runtime_checkable
class ObjectPlacer(Protocol):
    """Optional, beside ``Backend``: an element that can take a sealed upload staged as an S3 object
    by a copy on the S3 side (an S3 element on the staging's endpoint and identity), so the bytes
    never pass through the process. The saga uses it when ``can_place_from`` says so."""

    def can_place_from(self, source: StagedObject) -> bool: ...

    async def place_object(
        self,
        key: str,
        source: StagedObject,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store ``source`` under key, with this content type and metadata: as atomic as ``put``;
        what a kill leaves (a multipart copy) is removed like a put's."""
        ...
