"""PATCH: append bytes at the upload's offset.

The path of every byte: the body goes to staging in large writes, is fsynced once, and only
then the offset is committed in the store (the commit point). A client that disconnects, a
newer request that asks for the lock, a shutting-down server and a client sending too slowly all
end the body early; what arrived by then is committed (invariant 2) and answered with the offset
reached. Ended so before a byte was committed, the request answers 400 (interrupted) or 408 (too
slow), never a 2xx. Bytes past an aborted request's start are cut off.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.tus.base import TusContext, expires_header, tus_headers
from tusingest.tus.body import BodyEnd, Interrupt, receive_body
from tusingest.tus.checksum import BodyChecksum, request_checksum
from tusingest.tus.errors import (
    BadRequest,
    BodyTimeout,
    ChecksumMismatch,
    Forbidden,
    OffsetMismatch,
    TooLarge,
    TusError,
    UnsupportedMediaType,
    UploadGone,
    UploadInterrupted,
)
from tusingest.tus.headers import OFFSET_OCTET_STREAM, parse_non_negative


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class PatchHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        if content_type(request) != OFFSET_OCTET_STREAM:
            raise UnsupportedMediaType()
        offset = parse_non_negative("Upload-Offset", request.headers.get("upload-offset"))
        assert offset is not None
        new_length = parse_non_negative("Upload-Length", request.headers.get("upload-length"), required=False)
        content_length = parse_non_negative("Content-Length", request.headers.get("content-length"), required=False)
        checksum = request_checksum(request, self.ctx.options)

        interrupt = Interrupt()
        async with self.ctx.locker.lock(
            upload_id, on_release_request=interrupt.fire, timeout=self.ctx.options.lock_timeout
        ):
            upload = await self.ctx.load(upload_id)
            if upload.kind is UploadKind.FINAL:
                raise Forbidden("a final upload of a concatenation cannot be patched")
            if upload.state is UploadState.FAILED:
                raise await self.ctx.hooks.refusal(upload)
            was_complete = upload.state is UploadState.COMPLETE
            if new_length is not None:
                upload = await self._declare_length(upload, new_length)
            if offset != upload.offset:
                raise OffsetMismatch(f"Upload-Offset is {offset}, the upload is at {upload.offset}")

            length = upload.length if upload.length is not None else self.ctx.options.max_size
            room = length - offset
            if content_length is not None and content_length > room:
                raise TooLarge(f"the body ({content_length} bytes) runs past the upload's length ({room} bytes left)")
            if upload.state is not UploadState.COMPLETE:
                started_at = upload.offset
                upload, end = await self._append(request, upload, room, interrupt, checksum)
                if upload.offset == started_at:
                    # Cut off before a byte was committed: a 204 would tell the client its bytes were taken.
                    if end is BodyEnd.INTERRUPTED:
                        raise UploadInterrupted(headers={"Upload-Offset": str(upload.offset)})
                    if end is BodyEnd.TOO_SLOW:
                        raise BodyTimeout(headers={"Upload-Offset": str(upload.offset)})
            # Completed by this request, or owed since a crash (a retry pays it now).
            completing = upload.is_complete and (not was_complete or upload.completion_pending)
            if completing:
                await self.ctx.complete(upload)
        # The lock is free again: a HEAD answers at once while the completion runs.
        if completing:
            return self._response(upload, await self.ctx.result(upload))
        if upload.state is UploadState.COMPLETE:
            return self._response(upload, dict(await self.ctx.hooks.describe(upload)))
        return self._response(upload, {})

    async def _declare_length(self, upload: Upload, length: int) -> Upload:
        if upload.length is not None:
            if length != upload.length:
                raise BadRequest("Upload-Length cannot be changed once set")
            return upload
        if length > self.ctx.options.max_size:
            raise TooLarge(f"Upload-Length exceeds Tus-Max-Size ({self.ctx.options.max_size})")
        if length < upload.offset:
            raise BadRequest(f"Upload-Length {length} is below the upload's offset {upload.offset}")
        updated = await self.ctx.store.set_length(upload.id, length)
        if updated is None:
            raise UploadGone("upload changed while its length was being set")
        return updated

    async def _append(
        self, request: Request, upload: Upload, room: int, interrupt: Interrupt, checksum: BodyChecksum | None
    ) -> tuple[Upload, BodyEnd]:
        inspector = await self._start_inspector(upload)
        async with await self.ctx.staging.open_writer(upload.id, upload.offset) as writer:
            on_chunk = checksum.update if checksum is not None else None
            try:
                end = await receive_body(
                    request.receive,
                    writer,
                    room,
                    interrupt,
                    self.ctx.options.body_pace,
                    on_chunk,
                    inspector.feed if inspector else None,
                )
                if inspector is not None and end is BodyEnd.COMPLETE and writer.written == room:
                    await inspector.finish()  # the whole upload is shorter than what it wanted to see
            except TusError:
                await writer.discard()  # refused by the inspection: nothing of this body is kept
                raise
            if end is BodyEnd.OVERFLOW:
                await writer.discard()
                raise TooLarge(f"the body runs past the upload's length ({room} bytes left)")
            if checksum is not None and end is not BodyEnd.COMPLETE:
                # The digest covers the whole body, so a part of it cannot be verified. Keeping
                # unverified bytes would break the client's request; it resends from the old offset.
                await writer.discard()
                return upload, end
            if checksum is not None and not checksum.matches():
                await writer.discard()
                raise ChecksumMismatch(f"the body does not match its {checksum.algorithm} Upload-Checksum")
            new_offset = await writer.sync()
        if new_offset == upload.offset and end is not BodyEnd.COMPLETE:
            return upload, end  # cut off before the first byte: nothing to commit
        return await self.ctx.commit(upload, new_offset), end

    async def _start_inspector(self, upload: Upload) -> StartInspector | None:
        wanted = self.ctx.hooks.head_bytes
        if wanted <= 0 or upload.kind is not UploadKind.SINGLE or upload.offset >= wanted:
            return None
        already = b""
        if upload.offset:  # an earlier PATCH was cut short before the inspection had enough
            already = b"".join([block async for block in self.ctx.staging.read(upload.id, upload.offset)])
        return StartInspector(self.ctx, upload, already, wanted)

    @staticmethod
    def _response(upload: Upload, extra: dict[str, str]) -> Response:
        headers = tus_headers() | {"Upload-Offset": str(upload.offset)} | expires_header(upload) | extra
        return Response(status_code=204, headers=headers)


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
