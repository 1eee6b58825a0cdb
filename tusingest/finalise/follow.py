"""Compression that follows the commit point: a large compressible upload is compressed while its
bytes arrive, so the saga finds the compressed copy ready instead of making it after the last byte.

The node that commits an upload's first bytes starts a follower (``Followers.committed``). It
reads the committed bytes back from staging (the page cache, moments after they were written)
behind the commit point, compresses them on a thread into a spool file of its own in the
upload's staging folder, and waits for the next commit. It only ever reads below a committed
offset, so a body that is refused or cut short never reaches it (invariant 1), and the write
path never waits for it: the PATCH answers at the speed of the disk, the compressor runs
behind on what cores are left.

When the saga inspects the upload (``take``) it waits for the follower to reach the last byte and
finish, and uses its spool; the full pass then compresses nothing. The follower's state is in
memory on one node: after a restart, on another node, or when it failed, there is none, and the
saga compresses as it reads, as before. A follower left waiting (its client gave up) ends after
``idle_seconds``; at most ``capacity`` run at once (each holds a compressor's window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from asyncio import FIRST_COMPLETED
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tusingest.finalise.compression import StreamCompressor, open_compressor
from tusingest.finalise.mime import HEAD_BYTES, detect_mime
from tusingest.finalise.pipeline import Compressed, FinalisePolicy, wants_compression
from tusingest.sessions.content import digest_tag
from tusingest.sessions.model import Upload, UploadKind
from tusingest.sessions.progress import ProgressBus, Subscription
from tusingest.staging import Staging, StagingError

log = logging.getLogger(__name__)

FOLLOW_MIN_BYTES = 8 << 20  # below this, compressing after the last byte takes well under 0.1 s
READ_BLOCK = 1 << 20
SPOOL_PREFIX = "follow-"  # + the upload's digest tag: a follower's spool is never another upload's


@dataclass(slots=True)
class _Follower:
    upload_id: str
    tag: str
    length: int
    spool: Path
    target: int = 0  # the committed offset it is to reach
    advanced: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Compressed | None] | None = None


class Followers:
    """The compression followers of this node, by upload id."""

    def __init__(
        self,
        staging: Staging,
        policy: FinalisePolicy,
        progress: ProgressBus,
        *,
        capacity: int = 8,
        idle_seconds: float = 300.0,
        min_bytes: int = FOLLOW_MIN_BYTES,
    ) -> None:
        self.staging = staging
        self.policy = policy
        self.progress = progress
        self.capacity = capacity
        self.idle_seconds = idle_seconds
        self.min_bytes = min_bytes
        self._running: dict[str, _Follower] = {}
        self.used = 0  # spools a saga took over (what the tests and the benchmarks read)

    def __len__(self) -> int:
        return len(self._running)

    def committed(self, upload: Upload, started_at: int) -> None:
        """The upload's offset advanced from ``started_at`` by a commit on this node (under its lock)."""
        tag = digest_tag(upload)
        follower = self._running.get(upload.id)
        if follower is not None and follower.tag == tag:
            follower.target = upload.offset
            follower.advanced.set()
            return
        if (
            tag is None
            or started_at >= HEAD_BYTES  # another node took the first bytes: it follows, if anyone does
            or upload.kind is not UploadKind.SINGLE
            or upload.length is None
            or upload.length < max(self.min_bytes, self.policy.compression_min_size)
            or not self.policy.compression_enabled
            or len(self._running) >= self.capacity
            # Staging that cannot read an upload before its seal (S3 parts) has nothing to follow.
            or not self.staging.reads_unsealed(upload.id, upload.length)
        ):
            return
        spool = self.staging.directory(upload.id) / f"{SPOOL_PREFIX}{tag}"
        follower = _Follower(upload.id, tag, upload.length, spool, upload.offset)
        follower.task = asyncio.create_task(self._follow(follower), name=f"compression-follower-{upload.id}")
        follower.task.add_done_callback(lambda task: self._ended(follower, task))
        self._running[upload.id] = follower
        follower.advanced.set()

    def _ended(self, follower: _Follower, task: asyncio.Task[Compressed | None]) -> None:
        """A follower that finished waits for its saga a while (``take``); any other is gone at once."""
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, StagingError | OSError):
            log.error("compression follower of upload %s failed", follower.upload_id, exc_info=failure)
        finished = not task.cancelled() and failure is None and task.result() is not None
        if finished:
            asyncio.get_running_loop().call_later(self.idle_seconds, self._forget, follower)
        else:
            self._forget(follower)

    def _forget(self, follower: _Follower) -> None:
        if self._running.get(follower.upload_id) is follower:
            del self._running[follower.upload_id]

    def following(self, upload: Upload) -> bool:
        """Whether a follower of this node compresses the upload (``take`` then has its result)."""
        follower = self._running.get(upload.id)
        return follower is not None and follower.tag == digest_tag(upload)

    async def take(self, upload: Upload) -> Compressed | None:
        """The compressed copy of the whole upload, once its follower has finished it; None when no
        follower has it (the saga then compresses as it reads). The spool is the caller's from now on."""
        follower = self._running.get(upload.id)
        if follower is None or follower.task is None or follower.tag != digest_tag(upload):
            return None
        if follower.target < follower.length:  # a commit this node did not see completed it
            follower.target = upload.offset
            follower.advanced.set()
        try:
            compressed = await asyncio.shield(follower.task)
        except (StagingError, OSError):  # logged by the follower; the saga compresses itself
            return None
        self._forget(follower)
        if compressed is not None:
            self.used += 1
        return compressed

    async def close(self) -> None:
        tasks = [f.task for f in self._running.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _follow(self, follower: _Follower) -> Compressed | None:
        """Compress the upload's committed bytes as they come; the spool once the last one is in, or
        None when its type is not worth it. Removes its spool when it ends without finishing it."""
        # Subscribed to the upload's events to hear at once that it was terminated or expired.
        with self.progress.subscribe(follower.upload_id) as events:
            return await self._compress(follower, events)

    async def _compress(self, follower: _Follower, events: Subscription) -> Compressed | None:
        compressor: StreamCompressor | None = None
        spool: BinaryIO | None = None
        position = 0
        head_size = min(HEAD_BYTES, follower.length)
        try:
            while True:
                follower.advanced.clear()  # before the target is read: a later commit wakes the wait below
                target = follower.target
                if compressor is None and target >= head_size:
                    head = b"".join([b async for b in self.staging.read(follower.upload_id, head_size)])
                    content_type = await asyncio.to_thread(detect_mime, head)
                    if not wants_compression(self.policy, content_type, follower.length):  # the saga's own rule
                        return None
                    compressor = open_compressor(self.policy.compression_algorithm, self.policy.compression_level)
                    spool = await asyncio.to_thread(open, follower.spool, "wb")
                if compressor is not None and spool is not None and position < target:
                    async for block in self.staging.read(follower.upload_id, target, READ_BLOCK, start=position):
                        await asyncio.to_thread(_compress_into, compressor, spool, block)
                        position += len(block)
                    if position >= follower.length:
                        stored = await asyncio.to_thread(_finish, compressor, spool)
                        return Compressed(compressor.algorithm, str(follower.spool), stored)
                if follower.target > target:
                    continue
                await self._next_commit(follower, events)
        except (StagingError, OSError) as exc:
            log.info("compression of upload %s while it arrives stopped: %s", follower.upload_id, exc)
            raise
        finally:
            if spool is not None:
                spool.close()
                if position < follower.length:
                    with contextlib.suppress(OSError):
                        os.unlink(follower.spool)  # unfinished: nobody will read it

    async def _next_commit(self, follower: _Follower, events: Subscription) -> None:
        """Wait for the next commit of the upload on this node; StagingError when it ended unfinished
        (terminated, expired: its staging is gone) or nothing was committed for ``idle_seconds``."""
        advanced = asyncio.ensure_future(follower.advanced.wait())
        heard = asyncio.ensure_future(events.get())
        try:
            done, _ = await asyncio.wait((advanced, heard), timeout=self.idle_seconds, return_when=FIRST_COMPLETED)
        finally:
            advanced.cancel()
            heard.cancel()
        if not done:
            raise StagingError(f"no commit for {self.idle_seconds:.0f} s")
        if heard in done and (event := heard.result()) is not None and event.state is not None:
            raise StagingError(f"the upload was {event.state}")


def _compress_into(compressor: StreamCompressor, spool: BinaryIO, block: bytes) -> None:
    spool.write(compressor.compress(block))


def _finish(compressor: StreamCompressor, spool: BinaryIO) -> int:
    spool.write(compressor.finish())
    spool.flush()
    os.fsync(spool.fileno())
    return spool.tell()
