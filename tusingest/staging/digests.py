"""Running digests: MD5 and SHA-256 of an upload's committed bytes, taken as staging writes them,
so the finaliser need not read a complete upload again to hash it.

A ``RunningDigest`` is the hash state of exactly the first ``offset`` bytes of one upload. A writer
hashes on a copy (``DigestCache.take``); the copy is kept (``DigestCache.keep``) only once its
offset is committed, so a kept state never runs ahead of the commit point (invariant 1) and a
body that is discarded (a checksum mismatch, a refused start, a failed commit) never enters it.

The cache is per node, bounded (least recently used first out) and in memory. A node whose state
for an upload stands before its committed offset (other nodes took the PATCHes since: a load
balancer's round robin) catches up by hashing the staged bytes in between; one that holds none
(another node began it, a restart) rebuilds it from the staged prefix. Either only while what is
to be read is small (``DirectoryStaging.digest_catch_up_bytes``): past that, the writer keeps no
digest and the finaliser hashes the file once as it reads it, so an upload spread over several
nodes is never read again and again. Restoring pickled hashlib state instead (``rehash`` on PyPI)
would save the reads, but it copies CPython's private hash structs, so its soundness depends on
the exact OpenSSL and CPython build on every node; a catch-up depends on nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass


class RunningDigest:
    """MD5 and SHA-256 of the first ``offset`` bytes of an upload. Not thread-safe: one writer
    updates it at a time (the upload's lock), on staging's threads: one batch at a time, its MD5
    and its SHA-256 on two threads at once (they touch different hash objects)."""

    __slots__ = ("md5", "offset", "sha256", "tag")

    def __init__(self, tag: str) -> None:
        self.tag = tag  # which upload of that id (ids of a removed upload can come back)
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def update(self, data: bytes | memoryview) -> None:
        self.md5.update(data)
        self.sha256.update(data)
        self.offset += len(data)

    def update_md5(self, batch: list[bytes]) -> None:
        """One half of ``update`` for a batch, so that MD5 and SHA-256 can run on two threads at once;
        the caller runs both halves, each once per batch and in batch order, then calls ``advance``."""
        for data in batch:
            self.md5.update(data)

    def update_sha256(self, batch: list[bytes]) -> None:
        """The other half (see ``update_md5``)."""
        for data in batch:
            self.sha256.update(data)

    def advance(self, size: int) -> None:
        """Both halves of a batch of ``size`` bytes are done: the digest now covers them."""
        self.offset += size

    def copy(self) -> RunningDigest:
        twin = RunningDigest.__new__(RunningDigest)
        twin.tag, twin.md5, twin.sha256, twin.offset = self.tag, self.md5.copy(), self.sha256.copy(), self.offset
        return twin

    @staticmethod
    def has(algorithm: str) -> bool:
        """Whether ``digest`` gives the digest of this algorithm (a tus checksum's name)."""
        return algorithm in ("md5", "sha256")

    def digest(self, algorithm: str) -> bytes | None:
        """The raw digest of ``algorithm`` (md5 or sha256) so far; None for any other."""
        if algorithm == "md5":
            return self.md5.digest()
        if algorithm == "sha256":
            return self.sha256.digest()
        return None


@dataclass(frozen=True, slots=True)
class Digests:
    """The hex digests of a whole upload."""

    size: int
    md5: str
    sha256: str


class DigestCache:
    """The running digests this node holds, by upload id, at most ``capacity`` of them."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, RunningDigest] = OrderedDict()
        self._lock = threading.Lock()  # staging threads and the event loop both use it

    def take(self, upload_id: str, tag: str, offset: int) -> RunningDigest | None:
        """A copy to hash on, of the kept state when it is at ``offset`` or before it (this node
        wrote the upload's earlier bytes, another node the ones since: the caller hashes those
        from staging to catch up); else None."""
        with self._lock:
            kept = self._entries.get(upload_id)
            if kept is None or kept.tag != tag or kept.offset > offset:
                return None
            self._entries.move_to_end(upload_id)
            return kept.copy()

    def keep(self, upload_id: str, digest: RunningDigest) -> None:
        """Keep ``digest`` as the upload's state; call only once ``digest.offset`` is committed."""
        with self._lock:
            self._entries[upload_id] = digest
            self._entries.move_to_end(upload_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def whole(self, upload_id: str, tag: str, length: int) -> Digests | None:
        """The digests of the whole upload, when the kept state covers exactly ``length`` bytes."""
        with self._lock:
            kept = self._entries.get(upload_id)
            if kept is None or kept.tag != tag or kept.offset != length:
                return None
            return Digests(length, kept.md5.hexdigest(), kept.sha256.hexdigest())

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self._entries.pop(upload_id, None)

    def __len__(self) -> int:
        return len(self._entries)
