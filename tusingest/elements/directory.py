"""Storage Elements on a local or mounted directory: an object is the file ``<root>/<key>``.

A put writes a hidden temp file next to the target (``.<name>.<random>.tmp``), fsyncs it and
renames it over the key, so a reader sees the old object or the whole new one, never a part.
A put killed midway leaves its temp file; the name says which object it was for, so the next
put of that key removes it first (``discard_incomplete``), and ``sweep_incomplete`` removes
the old ones of any key.
Content type, encoding and metadata live in user xattrs; on a filesystem without xattrs they
are not stored and head reports None for them (the upload's attr.json stays the authoritative
record). All file I/O runs in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from tusingest.elements.backend import Backend, BackendError, InvalidKey, ObjectInfo, ObjectNotFound, ObjectRefused
from tusingest.elements.keys import check_key, check_prefix
from tusingest.staging.fileio import write_all

log = logging.getLogger(__name__)

READ_CHUNK_SIZE = 1 << 20
WRITE_BATCH_SIZE = 4 << 20  # one batch written while the next gathers: two in memory at most
LIST_BATCH = 1000

XATTR_CONTENT_TYPE = "user.artstore.content_type"
XATTR_CONTENT_ENCODING = "user.artstore.content_encoding"
XATTR_METADATA = "user.artstore.meta"
_XATTRS = (XATTR_CONTENT_TYPE, XATTR_CONTENT_ENCODING, XATTR_METADATA)
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})

_TEMP_NAME = re.compile(r"^\..*\.[0-9a-f]{16}\.tmp$")
_TEMP_STEM_BYTES = 200  # "." + stem + "." + 16 hex + ".tmp": 222 bytes at most
_NOT_THERE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_NO_LINKS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})
# Errors a later attempt may not see: a full disk can be freed, an NFS server can come back.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.ENOTCONN,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
    }
)


def directory_error(exc: BaseException, *, element_id: str, operation: str, key: str | None = None) -> BackendError:
    """The BackendError for an exception raised by a file operation, transient only for errors
    a later attempt may not see (I/O errors, a full disk, a stale or unreachable NFS mount)."""
    if isinstance(exc, BackendError):
        return exc
    where = f"element {element_id}: {operation}" + (f" of {key!r}" if key is not None else "")
    if isinstance(exc, OSError) and key is not None and _refuses_name(exc):
        return ObjectRefused(f"{where} refused: {exc.strerror or exc} ({exc.filename})", key=key)
    if isinstance(exc, OSError):
        transient = exc.errno in _TRANSIENT_ERRNOS
        return BackendError(f"{where} failed: {exc.strerror or exc} ({exc.filename})", transient=transient)
    return BackendError(f"{where} failed unexpectedly: {type(exc).__name__}: {exc}", transient=False)


def _refuses_name(exc: OSError) -> bool:
    """Whether the file system refused the name itself: too long a component (ENAMETOOLONG, also
    on file systems with a NAME_MAX below 255), bytes it cannot represent (EILSEQ on utf8only
    ZFS, APFS), or a path argument it calls invalid (EINVAL from a call on a named path). An
    element-wide problem (a full disk, a dead mount) has other errnos, and the health probe,
    which writes names of its own, still sees it."""
    if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ):
        return True
    return exc.errno == errno.EINVAL and exc.filename is not None


def is_temp_name(name: str) -> bool:
    """True for the names of this backend's temp and probe files, which are never objects."""
    return _TEMP_NAME.match(name) is not None


def _temp_stem(name: str) -> str:
    """The part of a temp file's name that says which object it becomes: the object's name, or
    for a long one its first bytes and a digest of the whole, so the temp name stays within
    NAME_MAX (255 bytes) and still belongs to exactly one name."""
    encoded = name.encode(errors="surrogateescape")
    if len(encoded) <= _TEMP_STEM_BYTES:
        return name
    digest = hashlib.blake2b(encoded, digest_size=8).hexdigest()
    return encoded[: _TEMP_STEM_BYTES - 17].decode(errors="ignore") + "~" + digest


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{_temp_stem(target.name)}.{secrets.token_hex(8)}.tmp")


def _temp_names_of(name: str) -> re.Pattern[str]:
    """Matches the names of every temp file a put of the object called name may have left."""
    return re.compile(re.escape(f".{_temp_stem(name)}.") + r"[0-9a-f]{16}\.tmp")


def _unlink_leftover(path: str) -> bool:
    try:
        os.unlink(path)
    except _NOT_THERE:
        return False  # removed by its own put, or by another node's sweep
    log.info("removed %s, left by a put that never finished", path)
    return True


def _close_opened(opening: asyncio.Future[int]) -> None:
    """Close the descriptor an abandoned open produced after all."""
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def _close_after(work: asyncio.Future[bytes], fd: int) -> None:
    if not work.cancelled():
        work.exception()  # retrieved, so asyncio does not log it as lost
    os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_attributes(fd: int, attributes: Mapping[str, bytes]) -> None:
    for name, value in attributes.items():
        try:
            os.setxattr(fd, name, value)
        except OSError as exc:
            if exc.errno in _NO_XATTRS:
                return  # documented: no xattrs, no stored attributes
            raise


def _read_attributes(fd: int) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for name in _XATTRS:
        try:
            found[name] = os.getxattr(fd, name)
        except OSError as exc:
            if exc.errno in _NO_XATTRS:
                return {}
            if exc.errno != errno.ENODATA:
                raise
    return found


def _encode_attributes(
    content_type: str | None, content_encoding: str | None, metadata: Mapping[str, str]
) -> dict[str, bytes]:
    attributes: dict[str, bytes] = {}
    if content_type is not None:
        attributes[XATTR_CONTENT_TYPE] = content_type.encode()
    if content_encoding is not None:
        attributes[XATTR_CONTENT_ENCODING] = content_encoding.encode()
    if metadata:
        attributes[XATTR_METADATA] = json.dumps(dict(metadata), ensure_ascii=False, separators=(",", ":")).encode()
    return attributes


def _object_info(key: str, size: int, attributes: Mapping[str, bytes]) -> ObjectInfo:
    content_type = attributes.get(XATTR_CONTENT_TYPE)
    content_encoding = attributes.get(XATTR_CONTENT_ENCODING)
    metadata = attributes.get(XATTR_METADATA)
    return ObjectInfo(
        key,
        size,
        content_type.decode() if content_type is not None else None,
        content_encoding.decode() if content_encoding is not None else None,
        json.loads(metadata) if metadata else {},
    )


class _TempObject:
    """A temp file beside the target, turned into the object by commit or removed by discard.
    Its methods block and run in worker threads, one at a time."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = _temp_path(target)
        self.fd = -1

    def open(self) -> None:
        # A concurrent delete may remove the freshly created parent as empty; create it again.
        for attempt in range(5):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                return
            except FileNotFoundError:
                if attempt == 4:
                    raise

    def link(self, source: Path) -> bool:
        """Make the temp file a hard link of source; False where the file system cannot (another
        file system, no hard links), and the temp file is then not created."""
        for attempt in range(5):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, self.path)
                break
            except FileNotFoundError:
                if attempt == 4 or not source.exists():
                    raise
            except OSError as exc:
                if exc.errno in _NO_LINKS:
                    return False
                raise
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        os.utime(self.fd)  # young, so sweep_incomplete does not take it for an old put's leftover
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.fd < 0:
            self.open()
        write_all(self.fd, data)

    def commit(self, rest: bytes | bytearray, attributes: Mapping[str, bytes], *, durable: bool = True) -> None:
        self.write(rest)
        _set_attributes(self.fd, attributes)
        os.fsync(self.fd)  # always: a rename that outlives a crash must never name a file short of its bytes
        os.close(self.fd)
        self.fd = -1
        os.replace(self.path, self.target)
        if durable:  # otherwise the next durable put into this directory syncs this rename with its own
            _fsync_directory(self.target.parent)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except _NOT_THERE:
            pass  # never created, or already renamed onto the key


def _copy_file(source: int, target: int, size: int) -> int:
    """Copy ``size`` bytes from source's position to target's (both advance); returns how many
    were copied (fewer only when source ends first)."""
    source_start = os.lseek(source, 0, os.SEEK_CUR)
    target_start = os.lseek(target, 0, os.SEEK_CUR)
    copied = 0
    try:
        while copied < size:
            done = os.copy_file_range(source, target, size - copied)
            if done == 0:
                break
            copied += done
    except OSError as exc:
        # Kernels and filesystems without copy_file_range support: copy through memory.
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        os.lseek(source, source_start + copied, os.SEEK_SET)
        os.lseek(target, target_start + copied, os.SEEK_SET)
        while copied < size and (block := os.read(source, min(READ_CHUNK_SIZE, size - copied))):
            write_all(target, block)
            copied += len(block)
    return copied


class DirectoryBackend:
    """A Storage Element kept in a directory (local disk or a shared mount)."""

    def __init__(self, element_id: str, root: str | os.PathLike[str]) -> None:
        self.element_id = element_id
        self.root = Path(root)
        self._device: int | None = None
        # Cleanups outlive a cancelled put; keep them referenced until they finish.
        self._cleanups: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"DirectoryBackend({self.element_id!r}, {str(self.root)!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        if is_temp_name(key.rpartition("/")[2]):
            # Reserved for temp files: list_keys would never show it.
            raise InvalidKey(key)
        return self.root.joinpath(*key.split("/"))

    async def _run[T](self, operation: str, key: str | None, function: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(function)
        except Exception as exc:
            raise directory_error(exc, element_id=self.element_id, operation=operation, key=key) from exc

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
        target = self._path(key)
        if length is not None and length < 0:
            raise BackendError(f"element {self.element_id}: put of {key!r}: negative length {length}", transient=False)
        # Lower-cased like S3 metadata, so both backends hand back the same names.
        stored_metadata = {name.lower(): value for name, value in (metadata or {}).items()}
        attributes = _encode_attributes(content_type, content_encoding, stored_metadata)
        temp = _TempObject(target)
        # The one thread operation on temp in flight; cleanup waits for it before removing the file.
        # The first of them makes the temp file: an object that fits one batch takes one trip to a thread.
        working: asyncio.Future[None] | None = None
        total = 0
        try:
            batch = bytearray()
            async for chunk in chunks:
                total += len(chunk)
                if length is not None and total > length:
                    raise self._length_error(key, total, length)
                batch += chunk
                if len(batch) >= WRITE_BATCH_SIZE:
                    first = temp.fd < 0 and working is None
                    if working is not None:
                        await self._finish("put", key, working)
                    working = asyncio.ensure_future(asyncio.to_thread(temp.write, batch))
                    batch = bytearray()
                    if first:
                        # The temp file is made before more of the stream is read: from here on a kill
                        # leaves it for discard_incomplete and sweep_incomplete to find.
                        await self._finish("put", key, working)
                        working = None
            if working is not None:
                await self._finish("put", key, working)
            if length is not None and total != length:
                raise self._length_error(key, total, length)
            working = asyncio.ensure_future(asyncio.to_thread(temp.commit, batch, attributes, durable=durable))
            await self._finish("put", key, working)
        except BaseException:
            await self._discard(temp, working)
            raise
        return ObjectInfo(key, total, content_type, content_encoding, stored_metadata)

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
        """``FilePlacer``: one whole file on this element's file system becomes the object by hard
        link (no byte is copied; the file and the object share an inode, and the file stays as it
        is), anything else by ``copy_file_range`` into the temp file (a kernel copy, through
        memory only across file systems). Then fsync and rename as ``put`` does. With nothing to
        await before the commit, fill and commit are one trip to a thread."""
        target = self._path(key)
        total = sum(size for _, size in files)
        if total != length:
            raise self._length_error(key, total, length)
        stored_metadata = {name.lower(): value for name, value in (metadata or {}).items()}
        attributes = _encode_attributes(content_type, content_encoding, stored_metadata)
        temp = _TempObject(target)

        def fill() -> None:
            if len(files) == 1:
                path, size = files[0]
                status = os.stat(path)
                if status.st_size == size and status.st_dev == self._root_device() and temp.link(path):
                    return
            temp.open()
            for path, size in files:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    copied = _copy_file(fd, temp.fd, size)
                finally:
                    os.close(fd)
                if copied != size:
                    raise BackendError(f"{path} ended after {copied} of {size} bytes", transient=False)

        def fill_and_commit() -> None:
            fill()
            temp.commit(b"", attributes, durable=durable)

        working: asyncio.Future[None] | None
        try:
            if before_commit is None:
                working = asyncio.ensure_future(asyncio.to_thread(fill_and_commit))
            else:
                working = asyncio.ensure_future(asyncio.to_thread(fill))
                await self._finish("place", key, working)
                working = None
                await before_commit()
                working = asyncio.ensure_future(asyncio.to_thread(temp.commit, b"", attributes, durable=durable))
            await self._finish("place", key, working)
        except BaseException:
            await self._discard(temp, working)
            raise
        return ObjectInfo(key, length, content_type, content_encoding, stored_metadata)

    def _length_error(self, key: str, total: int, length: int) -> BackendError:
        return BackendError(
            f"element {self.element_id}: put of {key!r}: the stream gave {total} bytes, {length} were announced",
            transient=False,
        )

    async def _finish[T](self, operation: str, key: str, work: asyncio.Future[T]) -> T:
        # Shielded: a cancelled caller must still learn when the thread is done with its file.
        try:
            return await asyncio.shield(work)
        except Exception as exc:
            raise directory_error(exc, element_id=self.element_id, operation=operation, key=key) from exc

    async def _discard(self, temp: _TempObject, working: asyncio.Future[None] | None) -> None:
        """Remove the temp file once no thread uses it, even when the put is being cancelled."""

        async def discard() -> None:
            if working is not None:
                await asyncio.wait([working])
            try:
                await asyncio.to_thread(temp.discard)
            except OSError as exc:
                # The put's own error matters more; this one only leaves a hidden temp file.
                log.warning("element %s: temp file %s left behind: %s", self.element_id, temp.path, exc)

        cleanup = asyncio.create_task(discard())
        self._cleanups.add(cleanup)
        cleanup.add_done_callback(self._cleanups.discard)
        await asyncio.shield(cleanup)

    async def get(self, key: str, *, start: int = 0) -> AsyncIterator[bytes]:
        path = self._path(key)

        def open_object() -> int:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except _NOT_THERE:
                raise ObjectNotFound(key) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ObjectNotFound(key)  # the key names a directory of other keys
            if start:
                os.lseek(fd, start, os.SEEK_SET)
            return fd

        opening = asyncio.ensure_future(asyncio.to_thread(open_object))
        try:
            fd = await self._finish("get", key, opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        reading: asyncio.Future[bytes] | None = None
        try:
            while True:
                reading = asyncio.ensure_future(asyncio.to_thread(os.read, fd, READ_CHUNK_SIZE))
                chunk = await self._finish("get", key, reading)
                if not chunk:
                    break
                yield chunk
        finally:
            # Never close the descriptor under a read still running in a thread: the number could
            # be reused by another open before the read starts.
            if reading is not None and not reading.done():
                reading.add_done_callback(functools.partial(_close_after, fd=fd))
            else:
                os.close(fd)

    async def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)

        def head() -> ObjectInfo | None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except _NOT_THERE:
                return None
            try:
                status = os.fstat(fd)
                if not stat.S_ISREG(status.st_mode):
                    return None
                return _object_info(key, status.st_size, _read_attributes(fd))
            finally:
                os.close(fd)

        return await self._run("head", key, head)

    async def delete(self, key: str) -> bool:
        path = self._path(key)

        def delete() -> bool:
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    return False
                os.unlink(path)
            except _NOT_THERE:
                return False
            self._remove_empty_parents(path.parent)
            return True

        return await self._run("delete", key, delete)

    def _remove_empty_parents(self, directory: Path) -> None:
        # Best effort: a directory that gained a file meanwhile (ENOTEMPTY) stays, and so do its parents.
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def _root_device(self) -> int | None:
        """The filesystem the root is (or, not yet created, would be) on. A stat or two on the
        event loop: cheap, and cached once the root exists since its device then never changes."""
        if self._device is not None:
            return self._device
        for directory in (self.root, *self.root.absolute().parents):
            try:
                device = directory.stat().st_dev
            except OSError:
                continue
            if directory == self.root:
                self._device = device
            return device
        return None

    def can_copy_to(self, other: Backend) -> bool:
        if not isinstance(other, DirectoryBackend):
            return False
        device = self._root_device()
        return device is not None and device == other._root_device()

    async def copy_to(self, key: str, other: Backend, other_key: str) -> ObjectInfo:
        if not isinstance(other, DirectoryBackend) or not self.can_copy_to(other):
            raise BackendError(
                f"element {self.element_id}: cannot copy on the filesystem to {other.element_id}", transient=False
            )
        source = self._path(key)
        target = other._path(other_key)
        if source == target:
            info = await self.head(key)
            if info is None:
                raise ObjectNotFound(key)
            return ObjectInfo(other_key, info.size, info.content_type, info.content_encoding, info.metadata)

        def copy() -> ObjectInfo:
            try:
                source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            except _NOT_THERE:
                raise ObjectNotFound(key) from None
            try:
                size = os.fstat(source_fd).st_size
                attributes = _read_attributes(source_fd)
                temp = _TempObject(target)
                temp.open()
                try:
                    _copy_file(source_fd, temp.fd, size)
                    temp.commit(b"", attributes)
                except BaseException:
                    temp.discard()
                    raise
            finally:
                os.close(source_fd)
            return _object_info(other_key, size, attributes)

        return await self._run("copy", key, copy)

    async def list_keys(self, prefix: str = "") -> AsyncIterator[str]:
        check_prefix(prefix)
        # Walk only the deepest directory the prefix names; the rest of it filters names.
        directory, _, _ = prefix.rpartition("/")
        top = self.root.joinpath(*directory.split("/")) if directory else self.root
        keys = self._walk(top, directory)
        while batch := await self._run("list", None, lambda: list(itertools.islice(keys, LIST_BATCH))):
            for key in batch:
                if key.startswith(prefix):
                    yield key

    def _walk(self, directory: Path, relative: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(directory))
        except _NOT_THERE:
            return
        for entry in entries:
            key = f"{relative}/{entry.name}" if relative else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), key)
            elif entry.is_file(follow_symlinks=False) and not is_temp_name(entry.name):
                yield key

    async def discard_incomplete(self, key: str) -> int:
        target = self._path(key)
        leftover = _temp_names_of(target.name)

        def discard() -> int:
            try:
                entries = list(os.scandir(target.parent))
            except _NOT_THERE:
                return 0
            found = [e.path for e in entries if leftover.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
            return sum(_unlink_leftover(path) for path in found)

        return await self._run("discard_incomplete", key, discard)

    async def sweep_incomplete(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()

        def sweep() -> int:
            removed = 0
            # A temp file's mtime moves with every batch written, so a put still running is young.
            for directory, _, names in os.walk(self.root):
                for name in filter(is_temp_name, names):
                    path = os.path.join(directory, name)
                    try:
                        status = os.lstat(path)
                    except _NOT_THERE:
                        continue
                    if stat.S_ISREG(status.st_mode) and status.st_mtime < cutoff:
                        removed += _unlink_leftover(path)
            return removed

        return await self._run("sweep_incomplete", None, sweep)

    async def probe(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / f".probe.{secrets.token_hex(8)}.tmp"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(path)

        await self._run("probe", None, probe)

    async def close(self) -> None:
        """Wait for temp files still being removed; every operation opens and closes its own files."""
        await asyncio.gather(*self._cleanups, return_exceptions=True)
