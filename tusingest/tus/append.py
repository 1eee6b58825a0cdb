"""The one append operation: every way bytes reach an upload goes through ``append`` (an upload
that exists) or ``create`` (one whose row is written with its first bytes): the tus PATCH and
creation-with-upload, the IETF draft's append and creation, and the REST facade's uploads.

The order is tus-node-server's PatchHandler: take the upload's lock (a newer request asks us to
let go through ``on_release_request``), re-read the upload, check the offset *inside* the lock,
write the body to staging (first bytes to the start inspector, every byte to the checksum),
sync, commit the offset (the commit point), hand a complete upload on (``TusContext.complete``),
release. The caller asks for the answer (``TusContext.result``) after the lock is released, so a
HEAD answers at once while the completion runs.

What differs between the protocols is in ``AppendRules``: their checks, their errors, and what
the end of a body means. The body is a ``Body``: its chunks and how they ended, so the same
operation takes a raw ASGI body (tus) and a file part parsed out of a form (the facade).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from tusingest.observability.logs import note_upload
from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.sessions.audit import Action
from tusingest.sessions.content import digest_tag
from tusingest.staging import RunningDigest, StagingError, StagingWriter
from tusingest.tus.base import Requester, TusContext
from tusingest.tus.body import Body, BodyEnd, BodyPace, BodyTooSlow, Interrupt, body_chunks, write_body
from tusingest.tus.checksum import BodyChecksum
from tusingest.tus.errors import (
    BodyTimeout,
    ChecksumMismatch,
    OffsetMismatch,
    TooLarge,
    TusError,
    UploadInterrupted,
)


class RequestBody:
    """A raw request body (tus, the IETF draft), cut off like a disconnect when it arrives slower
    than its ``BodyPace``."""

    def __init__(self, receive: Receive, pace: BodyPace) -> None:
        self.receive = receive
        self.pace = pace
        self.end = BodyEnd.COMPLETE

    async def chunks(self) -> AsyncGenerator[bytes]:
        try:
            async with contextlib.aclosing(body_chunks(self.receive, self.pace)) as pieces:
                async for piece in pieces:
                    yield piece
        except BodyTooSlow:
            self.end = BodyEnd.TOO_SLOW
        except ClientDisconnect:
            self.end = BodyEnd.DISCONNECTED


class NoBody:
    """An empty body: an append that only settles an upload (the facade's batch completes its
    files this way once the whole form has arrived)."""

    end = BodyEnd.COMPLETE

    async def chunks(self) -> AsyncGenerator[bytes]:
        return
        yield  # pragma: no cover - makes this an async generator


class UploadExists(Exception):
    """``create`` of a client-named upload found it created meanwhile: append to it instead."""


class AppendRules:
    """How one protocol checks and answers an append; these defaults are tus 1.0's.

    ``offset``: where the request says its bytes go (None: wherever the upload stands).
    ``content_length``: the announced body size, refused at once when it cannot fit.
    ``checksum``: the digest the whole body must have (the tus checksum extension).
    ``inspect``: whether the first bytes go to ``UploadHooks.inspect_start``.
    ``completes``: the end of this body is the end of the upload (IETF ``Upload-Complete: ?1``,
    a one-shot facade upload), so a short upload is inspected when its body ends.
    """

    def __init__(
        self,
        offset: int | None = None,
        *,
        content_length: int | None = None,
        checksum: BodyChecksum | None = None,
        inspect: bool = True,
        completes: bool = False,
    ) -> None:
        self.offset = offset
        self.content_length = content_length
        self.checksum = checksum
        self.inspect = inspect
        self.completes = completes

    async def admit(self, ctx: TusContext, upload: Upload) -> Upload:
        """Under the lock, before the offset check: refuse an upload this request may not write
        (by raising), record a length the request declares. Returns the upload to write to."""
        return upload

    def offset_mismatch(self, upload: Upload) -> Exception:
        return OffsetMismatch(f"Upload-Offset is {self.offset}, the upload is at {upload.offset}")

    def too_large(self, room: int) -> Exception:
        return TooLarge(f"the body runs past the upload's length ({room} bytes left)")

    def allowance(self, room: int) -> int:
        """How many bytes this request's body may carry, of the ``room`` the upload has left."""
        return room

    async def overflow(self, ctx: TusContext, upload: Upload, room: int, allowed: int, *, new: bool) -> Exception:
        """The answer to a body longer than ``allowed`` (announced or sent), still under the lock;
        nothing of it is kept. ``new``: the upload's row is not written yet."""
        return self.too_large(allowed)

    interrupted: type[TusError] = UploadInterrupted  # the protocol's answer to an append taken over

    def where(self, upload: Upload) -> dict[str, str]:
        """The headers that tell a client where the upload stands, sent with a cut-short append."""
        return {"Upload-Offset": str(upload.offset)}

    def cut_short(self, upload: Upload, end: BodyEnd) -> Exception | None:
        """The error for a body that ended early before a byte of it was committed: a 2xx would
        tell the client its bytes were taken. None: answer as usual (a disconnected client)."""
        if end is BodyEnd.INTERRUPTED:
            return self.interrupted(headers=self.where(upload))
        if end is BodyEnd.TOO_SLOW:
            return BodyTimeout(headers=self.where(upload))
        return None

    async def settle(self, ctx: TusContext, upload: Upload, end: BodyEnd, *, new: bool) -> Upload:
        """After the body, still under the lock: what its end means for the upload (a length fixed
        where it ended, say). ``new``: the upload's row is not written yet, so change it in memory."""
        return upload

    def hand_on(self) -> bool:
        """Whether this request hands a complete upload on. False leaves the completion owed (the
        store recorded it with the last byte) to the next request or to recovery."""
        return True


@dataclass(frozen=True, slots=True)
class Appended:
    """What an append did: the upload after it, how its body ended, whether it completed it."""

    upload: Upload
    end: BodyEnd
    completed: bool


async def append(ctx: TusContext, upload_id: str, body: Body, rules: AppendRules, requester: Requester) -> Appended:
    """Append ``body`` to an existing upload at its offset; see the module docstring for the order.
    Only the upload's owner or an admin may (``TusContext.load``): anyone else gets 404."""
    interrupt = Interrupt()
    async with ctx.locker.lock(upload_id, on_release_request=interrupt.fire, timeout=ctx.options.lock_timeout):
        upload = await ctx.load(upload_id, requester)
        was_complete = upload.state is UploadState.COMPLETE
        upload = await rules.admit(ctx, upload)
        if rules.offset is not None and rules.offset != upload.offset:
            raise rules.offset_mismatch(upload)
        room = _room(ctx, upload)
        allowed = rules.allowance(room)
        if rules.content_length is not None and rules.content_length > allowed:
            raise await rules.overflow(ctx, upload, room, allowed, new=False)
        end = BodyEnd.COMPLETE
        if upload.state is not UploadState.COMPLETE:
            started_at = upload.offset
            new_offset, end, digest = await _stage(ctx, upload, body, (room, allowed), interrupt, rules)
            if end is BodyEnd.OVERFLOW:
                raise await rules.overflow(ctx, upload, room, allowed, new=False)
            if new_offset != upload.offset or end is BodyEnd.COMPLETE:
                upload = await ctx.commit(upload, new_offset)
                ctx.metrics.bytes_received.inc(upload.offset - started_at)
            _keep_digest(ctx, upload, digest)
            if upload.offset != started_at:
                ctx.hooks.committed(upload, started_at)
            if upload.offset == started_at and (refusal := rules.cut_short(upload, end)) is not None:
                raise refusal
            upload = await rules.settle(ctx, upload, end, new=False)
        # Completed by this request, or owed since a crash (a retry pays it now).
        completing = upload.is_complete and (not was_complete or upload.completion_pending) and rules.hand_on()
        if completing:
            await ctx.complete(upload)
    return Appended(upload, end, completing)


async def create(
    ctx: TusContext,
    upload: Upload,
    body: Body | None,
    rules: AppendRules,
    requester: Requester,
    *,
    client_named: bool = False,
    claimed: Callable[[str], Awaitable[None]] | None = None,
) -> Appended:
    """Create ``upload`` with ``body`` as its first bytes: staged first, then the row written once,
    with its offset (one database round trip for a small file).

    A server-made id is known to nobody yet, so it is only claimed on this node (shutdown can still
    stop its body). A ``client_named`` one (the facade's X-Upload-Session-ID) may be sent to any
    node at once: it takes the real lock and raises ``UploadExists`` if the upload exists by then.
    So does one an Idempotency-Key names before its row exists: ``claimed`` runs under that lock,
    before the body is read, and may raise to stop the creation (tus/idempotency.py).
    """
    note_upload(upload.id)
    interrupt = Interrupt()
    claim = (
        ctx.locker.lock(upload.id, on_release_request=interrupt.fire, timeout=ctx.options.lock_timeout)
        if client_named or claimed is not None
        else ctx.locker.claim_new(upload.id, on_release_request=interrupt.fire)
    )
    async with claim:
        if client_named and await ctx.store.get(upload.id) is not None:
            raise UploadExists(upload.id)
        if claimed is not None:
            await claimed(upload.id)
        if rules.offset not in (None, 0):
            raise rules.offset_mismatch(upload)
        room = _room(ctx, upload)
        allowed = rules.allowance(room)
        if rules.content_length is not None and rules.content_length > allowed:
            raise await rules.overflow(ctx, upload, room, allowed, new=True)
        end = BodyEnd.COMPLETE
        digest = None
        try:
            if body is not None:
                offset, end, digest = await _stage(ctx, upload, body, (room, allowed), interrupt, rules)
                if end is BodyEnd.OVERFLOW:
                    raise await rules.overflow(ctx, upload, room, allowed, new=True)
                upload = upload.evolve(offset=offset)
            upload = await rules.settle(ctx, upload, end, new=True)
        except BaseException:
            await ctx.staging.remove(upload.id)  # no row names these bytes: nobody could resume them
            raise
        await ctx.store.create(upload, audit=requester.audit(Action.UPLOAD_CREATED, upload))
        upload = upload.as_stored()
        _keep_digest(ctx, upload, digest)
        if upload.offset:
            ctx.hooks.committed(upload, 0)
        ctx.metrics.tus_uploads.labels("created").inc()
        ctx.metrics.bytes_received.inc(upload.offset)
        completing = upload.is_complete and rules.hand_on()
        if completing:
            await ctx.complete(upload)
    return Appended(upload, end, completing)


def _room(ctx: TusContext, upload: Upload) -> int:
    """How many bytes the upload may still take."""
    length = upload.length if upload.length is not None else ctx.options.max_size
    return length - upload.offset


def _keep_digest(ctx: TusContext, upload: Upload, digest: RunningDigest | None) -> None:
    """Keep the running digest of what is now committed (never of more: invariant 1)."""
    if digest is not None and digest.offset == upload.offset:
        ctx.staging.digests.keep(upload.id, digest)


async def _stage(
    ctx: TusContext, upload: Upload, body: Body, bounds: tuple[int, int], interrupt: Interrupt, rules: AppendRules
) -> tuple[int, BodyEnd, RunningDigest | None]:
    """Write the body to staging at the upload's offset and sync it; returns the durable offset
    (the upload's own when nothing of the body may be kept), how the body ended, and the running
    digest up to that offset, to be kept once the offset is committed (None: none to keep).
    ``bounds``: the room the upload has left, and how much of it this body may take."""
    room, allowed = bounds
    inspector = await _start_inspector(ctx, upload) if rules.inspect else None
    checksum = rules.checksum
    tag = digest_tag(upload) if ctx.hooks.wants_digests else None
    writer_at = ctx.staging.open_writer(upload.id, upload.offset, digest_tag=tag)
    async with await writer_at as writer:
        # Compute once, use twice: from offset 0 the body is the whole prefix, so an MD5 or SHA-256
        # Upload-Checksum is the running digest's (hashed off the event loop), not a second hash.
        digest = writer.digest
        shared = checksum is not None and digest is not None and digest.offset == 0 and digest.has(checksum.algorithm)
        try:
            end = await write_body(
                body,
                writer,
                allowed,
                interrupt,
                checksum.update if checksum is not None and not shared else None,
                inspector.feed if inspector is not None else None,
            )
            whole = writer.written == room or rules.completes
            if inspector is not None and end is BodyEnd.COMPLETE and whole:
                await inspector.finish()  # the whole upload is shorter than what it wanted to see
        except TusError:
            # Refused by the inspection: nothing of this body is kept. The refusal may already have
            # freed the upload's staging (a failed upload keeps no bytes): nothing is left to cut.
            with contextlib.suppress(StagingError):
                await writer.discard()
            raise
        if end is BodyEnd.OVERFLOW:
            await writer.discard()  # nothing of a body past its room is kept; the caller answers it
            return upload.offset, end, None
        if checksum is not None and end is not BodyEnd.COMPLETE:
            # The digest covers the whole body, so a part of it cannot be verified. Keeping
            # unverified bytes would break the client's request; it resends from the old offset.
            await writer.discard()
            return upload.offset, end, None
        if checksum is not None and not checksum.matches(await _body_digest(writer, checksum.algorithm, shared)):
            await writer.discard()
            raise ChecksumMismatch(f"the body does not match its {checksum.algorithm} Upload-Checksum")
        return await writer.sync(), end, writer.digest


async def _body_digest(writer: StagingWriter, algorithm: str, shared: bool) -> bytes | None:
    """The body's digest from the writer's running digest when ``shared``; None: the checksum's own."""
    if not shared:
        return None
    await writer.drain()  # every batch hashed
    digest = writer.digest
    return digest.digest(algorithm) if digest is not None else None


async def _start_inspector(ctx: TusContext, upload: Upload) -> StartInspector | None:
    wanted = ctx.hooks.head_bytes
    if wanted <= 0 or upload.kind is not UploadKind.SINGLE or upload.offset >= wanted:
        return None
    already = b""
    if upload.offset:  # an earlier append was cut short before the inspection had enough
        already = b"".join([block async for block in ctx.staging.read(upload.id, upload.offset)])
    return StartInspector(ctx, upload, already, wanted)


class StartInspector:
    """Collects the first bytes of an upload for ``UploadHooks.inspect_start``, which can then
    refuse a file early (a type that will never be accepted) instead of after the last byte."""

    def __init__(self, ctx: TusContext, upload: Upload, already: bytes, wanted: int) -> None:
        self.ctx = ctx
        self.upload = upload
        self.head = bytearray(already)
        self.wanted = wanted
        self.done = False

    async def feed(self, data: bytes) -> bool:
        self.head += data[: self.wanted - len(self.head)]
        if len(self.head) >= self.wanted:
            await self.finish()
        return self.done

    async def finish(self) -> None:
        if not self.done:
            self.done = True
            await self.ctx.hooks.inspect_start(self.upload, bytes(self.head))
