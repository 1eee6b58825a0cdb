"""Work that follows the commit point: a large upload is compressed and scanned for viruses while its
bytes arrive, so the saga finds the compressed copy and clamd's verdict ready instead of making them
after the last byte.

The node that commits an upload's first bytes starts a follower (``Followers.committed``). It
reads the committed bytes back from staging (the page cache, moments after they were written)
behind the commit point and, for each block, compresses it on a thread into a spool file of its
own in the upload's staging folder and sends it to clamd on an INSTREAM connection of its own, then
waits for the next commit. It only ever reads below a committed offset, so a body that is refused
or cut short never reaches it (invariant 1), and the write path never waits for it: the PATCH
answers at the speed of the disk, the follower runs behind on what cores are left.

When the saga inspects the upload it waits for the follower to reach the last byte: ``verdict``
gives clamd's answer on exactly the upload's bytes (clamd scans an INSTREAM once its end has
arrived, so what is saved is the transfer and the read-back, not the scan), ``take`` the compressed
spool; the pass then scans and compresses nothing. The follower's state is in memory on one node:
after a restart, on another node, or when a part of it failed, there is none, and the saga
compresses and scans as it reads, as before. A follower left waiting (its client gave up) ends after
``idle_seconds``; at most ``capacity`` run at once (each holds a compressor's window). A scan holds
one of clamd's threads: at most ``scan_capacity`` follow at once, and one left without a commit for
``scan_idle_seconds`` gives its connection back (the saga then scans in its pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tusingest.finalise.clamd import ClamdScanner, ScanError, ScanResult, ScanSession
from tusingest.finalise.compression import StreamCompressor, open_compressor
from tusingest.finalise.mime import HEAD_BYTES, detect_mime
from tusingest.finalise.pipeline import Compressed, FinalisePolicy, all_ended, wants_compression
from tusingest.sessions.content import digest_tag
from tusingest.sessions.model import Upload, UploadKind
from tusingest.sessions.progress import ProgressBus, Subscription
from tusingest.staging import Staging, StagingError

log = logging.getLogger(__name__)

FOLLOW_MIN_BYTES = 8 << 20  # below this, compressing or scanning after the last byte takes well under 0.1 s
READ_BLOCK = 1 << 20
SPOOL_PREFIX = "follow-"  # + the upload's digest tag: a follower's spool is never another upload's
SCAN_IDLE_SECONDS = 10.0  # well inside clamd's ReadTimeout (120 s by default)


@dataclass(slots=True)
class _Follower:
    upload_id: str
    tag: str
    length: int
    spool: Path
    compress: bool  # compression wanted; False once the head's type is not worth it
    scan: bool  # a scan is wanted or under way; False once it ended or was given up
    target: int = 0  # the committed offset it is to reach
    advanced: asyncio.Event = field(default_factory=asyncio.Event)
    verdict: asyncio.Future[ScanResult | None] | None = None  # None: no scan; resolves to None when given up
    task: asyncio.Task[Compressed | None] | None = None


class Followers:
    """The followers of this node, by upload id."""

    def __init__(
        self,
        staging: Staging,
        policy: FinalisePolicy,
        progress: ProgressBus,
        *,
        scanner: ClamdScanner | None = None,
        capacity: int = 8,
        scan_capacity: int = 2,
        idle_seconds: float = 300.0,
        scan_idle_seconds: float = SCAN_IDLE_SECONDS,
        min_bytes: int = FOLLOW_MIN_BYTES,
    ) -> None:
        self.staging = staging
        self.policy = policy
        self.progress = progress
        self.scanner = scanner
        self.capacity = capacity
        self.scan_capacity = scan_capacity
        self.idle_seconds = idle_seconds
        self.scan_idle_seconds = scan_idle_seconds
        self.min_bytes = min_bytes
        self._running: dict[str, _Follower] = {}
        self.used = 0  # spools a saga took over (what the tests and the benchmarks read)
        self.verdicts_used = 0  # verdicts a saga took over

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
            or upload.length < self.min_bytes
            or len(self._running) >= self.capacity
        ):
            return
        compress = self.policy.compression_enabled and upload.length >= self.policy.compression_min_size
        scan = self.scanner is not None and self.scanning < self.scan_capacity
        # Staging that cannot read an upload before its seal (S3 parts) has nothing to follow.
        if not (compress or scan) or not self.staging.reads_unsealed(upload.id, upload.length):
            return
        spool = self.staging.directory(upload.id) / f"{SPOOL_PREFIX}{tag}"
        follower = _Follower(upload.id, tag, upload.length, spool, compress, scan, upload.offset)
        if scan:
            follower.verdict = asyncio.get_running_loop().create_future()
        follower.task = asyncio.create_task(self._follow(follower), name=f"follower-{upload.id}")
        follower.task.add_done_callback(lambda task: self._ended(follower, task))
        self._running[upload.id] = follower
        follower.advanced.set()

    @property
    def scanning(self) -> int:
        """How many followers hold a clamd connection (or are about to open one)."""
        return sum(1 for follower in self._running.values() if follower.scan)

    def _ended(self, follower: _Follower, task: asyncio.Task[Compressed | None]) -> None:
        """A follower that finished waits for its saga a while (``take``, ``verdict``); any other is gone at once."""
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, StagingError | OSError):
            log.error("follower of upload %s failed", follower.upload_id, exc_info=failure)
        follower.scan = False
        if follower.verdict is not None and not follower.verdict.done():
            follower.verdict.set_result(None)  # a task cancelled before its first step never ran its own cleanup
        compressed = not task.cancelled() and failure is None and task.result() is not None
        scanned = follower.verdict is not None and follower.verdict.result() is not None
        if compressed or scanned:
            asyncio.get_running_loop().call_later(self.idle_seconds, self._forget, follower)
        else:
            self._forget(follower)

    def _forget(self, follower: _Follower) -> None:
        if self._running.get(follower.upload_id) is follower:
            del self._running[follower.upload_id]

    def _of(self, upload: Upload) -> _Follower | None:
        follower = self._running.get(upload.id)
        if follower is None or follower.task is None or follower.tag != digest_tag(upload):
            return None
        if follower.target < follower.length:  # a commit this node did not see completed it
            follower.target = upload.offset
            follower.advanced.set()
        return follower

    def following(self, upload: Upload) -> bool:
        """Whether a follower of this node compresses the upload (``take`` then has its result)."""
        follower = self._running.get(upload.id)
        return follower is not None and follower.compress and follower.tag == digest_tag(upload)

    async def verdict(self, upload: Upload) -> ScanResult | None:
        """clamd's verdict on the whole upload, once its follower has sent the last byte; None when no
        follower scanned it to its end (the saga then scans as it reads)."""
        follower = self._of(upload)
        if follower is None or follower.verdict is None:
            return None
        result = await asyncio.shield(follower.verdict)
        if not follower.compress:
            self._forget(follower)  # nothing left for ``take``
        if result is not None:
            self.verdicts_used += 1
        return result

    async def take(self, upload: Upload) -> Compressed | None:
        """The compressed copy of the whole upload, once its follower has finished it; None when no
        follower has it (the saga then compresses as it reads). The spool is the caller's from now on."""
        follower = self._of(upload)
        if follower is None or follower.task is None:
            return None
        try:
            compressed = await asyncio.shield(follower.task)
        except (StagingError, OSError):  # logged by the follower; the saga compresses itself
            return None
        self._forget(follower)
        if compressed is not None:
            self.used += 1
        return compressed

    def drop(self, upload_id: str) -> None:
        """The upload's saga failed: its follower, running or finished, is of no more use (its spool goes
        with the upload's staging folder)."""
        follower = self._running.pop(upload_id, None)
        if follower is not None and follower.task is not None:
            follower.task.cancel()  # a finished one is not changed by it

    async def close(self) -> None:
        tasks = [f.task for f in self._running.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _follow(self, follower: _Follower) -> Compressed | None:
        """Compress and scan the upload's committed bytes as they come; the spool once the last one is
        in, or None when there is nothing to compress. Removes its spool when it ends without finishing it."""
        # Subscribed to the upload's events to hear at once that it was terminated or expired.
        with self.progress.subscribe(follower.upload_id) as events:
            async with _Scan(self.scanner, follower) as scan:
                return await self._run(follower, events, scan)

    async def _run(self, follower: _Follower, events: Subscription, scan: _Scan) -> Compressed | None:
        compressor: StreamCompressor | None = None
        spool: BinaryIO | None = None
        position = 0
        head_size = min(HEAD_BYTES, follower.length)
        started = False
        try:
            while True:
                if not (follower.compress or follower.scan):
                    return None  # not worth compressing, and no scan (or it was given up)
                follower.advanced.clear()  # before the target is read: a later commit wakes the wait below
                target = follower.target
                if not started and target >= head_size:
                    started = True
                    head = b"".join([b async for b in self.staging.read(follower.upload_id, head_size)])
                    content_type = await asyncio.to_thread(detect_mime, head)
                    # The saga's own rule: its pass would compress this type and size.
                    follower.compress = follower.compress and wants_compression(
                        self.policy, content_type, follower.length
                    )
                    if follower.compress:
                        compressor = open_compressor(self.policy.compression_algorithm, self.policy.compression_level)
                        spool = await asyncio.to_thread(open, follower.spool, "wb")
                    await scan.open()
                    continue
                if started and position < target:
                    async for block in self.staging.read(follower.upload_id, target, READ_BLOCK, start=position):
                        compressing = None
                        if compressor is not None and spool is not None:
                            compressing = asyncio.to_thread(_compress_into, compressor, spool, block)
                        await scan.alongside(compressing, block)
                        position += len(block)
                        if compressor is None and not follower.scan:
                            return None
                    if position >= follower.length:
                        if compressor is None or spool is None:
                            await scan.conclude()
                            return None
                        # clamd scans once the stream has ended, while the compressor writes its last bytes.
                        finishing = asyncio.ensure_future(asyncio.to_thread(_finish, compressor, spool))
                        await all_ended(finishing, scan.conclude())
                        stored = finishing.result()
                        return Compressed(compressor.algorithm, str(follower.spool), stored)
                if follower.target > target:
                    continue
                await self._next_commit(follower, events, scan)
        except (StagingError, OSError) as exc:
            log.info("following upload %s while it arrives stopped: %s", follower.upload_id, exc)
            raise
        finally:
            if spool is not None:
                spool.close()
                if position < follower.length:
                    with contextlib.suppress(OSError):
                        os.unlink(follower.spool)  # unfinished: nobody will read it

    async def _next_commit(self, follower: _Follower, events: Subscription, scan: _Scan) -> None:
        """Wait for the next commit of the upload on this node; StagingError when it ended unfinished
        (terminated, expired: its staging is gone) or nothing was committed for ``idle_seconds``. A
        scan under way waits ``scan_idle_seconds`` of that, then gives its clamd connection back."""
        waited = 0.0
        while True:
            timeout = self.idle_seconds - waited
            if follower.scan:
                timeout = min(timeout, self.scan_idle_seconds)
            if timeout > 0 and await self._commit_or_end(follower, events, timeout):
                return
            waited += max(timeout, 0.0)
            if follower.scan:
                await scan.give_up(f"no commit for {self.scan_idle_seconds:.0f} s")
                if follower.compress and waited < self.idle_seconds:
                    continue
                return  # the caller sees that nothing is left to follow
            raise StagingError(f"no commit for {self.idle_seconds:.0f} s")

    async def _commit_or_end(self, follower: _Follower, events: Subscription, timeout: float) -> bool:
        """True on the next commit, False after ``timeout``; StagingError when the upload ended unfinished."""
        advanced = asyncio.ensure_future(follower.advanced.wait())
        heard = asyncio.ensure_future(events.get())
        try:
            done, _ = await asyncio.wait((advanced, heard), timeout=timeout, return_when=FIRST_COMPLETED)
        finally:
            advanced.cancel()
            heard.cancel()
        if heard in done and (event := heard.result()) is not None and event.state is not None:
            raise StagingError(f"the upload was {event.state}")
        return bool(done)


class _Scan:
    """A follower's INSTREAM scan: opened on the head, fed each block beside its compression, concluded
    on the last byte. Any failure of clamd (unreachable, a limit, a broken connection) only ends the
    scan: the saga then scans in its pass and meets the failure there, under its own policy."""

    def __init__(self, scanner: ClamdScanner | None, follower: _Follower) -> None:
        self.scanner = scanner
        self.follower = follower
        self._stack = contextlib.AsyncExitStack()
        self._session: ScanSession | None = None

    async def __aenter__(self) -> _Scan:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.give_up("the follower ended")

    async def open(self) -> None:
        if self.scanner is None or not self.follower.scan:
            return
        try:
            self._session = await self._stack.enter_async_context(self.scanner.session())
        except ScanError as exc:
            await self.give_up(str(exc))

    async def alongside(self, work: Awaitable[None] | None, block: bytes) -> None:
        """Send ``block`` to clamd while ``work`` (the block's compression) runs; both end before this returns."""
        await all_ended(*([] if work is None else [work]), self._feed(block))

    async def _feed(self, block: bytes) -> None:
        if self._session is None:
            return
        try:
            await self._session.feed(block)
        except ScanError as exc:
            await self.give_up(str(exc))

    async def conclude(self) -> None:
        """The last byte is sent: clamd's verdict becomes the follower's."""
        if self._session is None:
            return
        try:
            result = await self._session.finish()
        except ScanError as exc:
            await self.give_up(str(exc))
            return
        self._resolve(result)
        await self._close()

    async def give_up(self, why: str) -> None:
        if self._session is not None:
            log.info("scan of upload %s while it arrives stopped: %s", self.follower.upload_id, why)
        self._resolve(None)
        await self._close()

    def _resolve(self, result: ScanResult | None) -> None:
        self.follower.scan = False
        verdict = self.follower.verdict
        if verdict is not None and not verdict.done():
            verdict.set_result(result)

    async def _close(self) -> None:
        self._session = None
        await self._stack.aclose()


def _compress_into(compressor: StreamCompressor, spool: BinaryIO, block: bytes) -> None:
    spool.write(compressor.compress(block))


def _finish(compressor: StreamCompressor, spool: BinaryIO) -> int:
    spool.write(compressor.finish())
    spool.flush()
    os.fsync(spool.fileno())
    return spool.tell()
