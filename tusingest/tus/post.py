"""POST (creation, creation-with-upload, creation-defer-length, concatenation): start a new upload.

With a body (creation-with-upload) the bytes are staged first and the upload row is written
once, with its offset: one database round trip for a small file.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import Upload, UploadKind
from tusingest.sessions.model import new_upload_id, utcnow
from tusingest.tus.base import TusContext, expires_header, tus_headers
from tusingest.tus.body import BodyEnd, Interrupt, receive_body
from tusingest.tus.checksum import BodyChecksum, request_checksum
from tusingest.tus.concat import FinalConcat, create_final, parse_upload_concat
from tusingest.tus.errors import BadRequest, ChecksumMismatch, MethodNotAllowed, TooLarge, UnsupportedMediaType
from tusingest.tus.headers import OFFSET_OCTET_STREAM, parse_metadata, parse_non_negative
from tusingest.tus.patch import content_type


class PostHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request) -> Response:
        options = self.ctx.options
        if not options.has("creation"):
            raise MethodNotAllowed("creation is not enabled")
        kind = UploadKind.SINGLE
        concat_value = request.headers.get("upload-concat")
        if concat_value is not None:
            if not options.has("concatenation"):
                raise BadRequest("concatenation is not enabled")
            concat = parse_upload_concat(concat_value, options.base_path)
            if isinstance(concat, FinalConcat):
                return await self._create_final(request, concat)
            kind = concat
        length = self._length(request)
        metadata = (request.headers.get("upload-metadata") or "").strip()
        # The header is kept as sent and echoed byte-exact; parsed here to validate and to check.
        await self.ctx.hooks.check_creation(parse_metadata(metadata))

        content_length = parse_non_negative("Content-Length", request.headers.get("content-length"), required=False)
        with_body = content_type(request) == OFFSET_OCTET_STREAM
        if with_body and not options.has("creation-with-upload"):
            raise BadRequest("creation-with-upload is not enabled")
        if not with_body and content_length:
            raise UnsupportedMediaType("a creation request with a body needs Content-Type: " + OFFSET_OCTET_STREAM)
        room = length if length is not None else options.max_size
        if content_length is not None and content_length > room:
            raise TooLarge(f"the body ({content_length} bytes) is longer than Upload-Length ({room})")
        checksum = request_checksum(request, options)  # verified over the body, if there is one

        upload_id = new_upload_id()
        interrupt = Interrupt()
        # Nobody else knows this id yet; the claim only makes the body stoppable at shutdown.
        async with self.ctx.locker.claim_new(upload_id, on_release_request=interrupt.fire):
            offset = 0
            if with_body:
                offset = await self._receive(request, upload_id, room, interrupt, checksum)
            now = utcnow()
            upload = Upload(
                id=upload_id,
                length=length,
                offset=offset,
                metadata=metadata,
                kind=kind,
                created_at=now,
                updated_at=now,
                expires_at=self.ctx.expires_at(now),
            )
            await self.ctx.store.create(upload)
            if upload.is_complete:
                await self.ctx.complete(upload)
        extra = await self.ctx.result(upload) if upload.is_complete else {}

        headers = tus_headers() | {"Location": self.ctx.location(request, upload_id)}
        if not upload.is_complete:
            headers |= expires_header(upload)
        if with_body:
            headers["Upload-Offset"] = str(upload.offset)
        return Response(status_code=201, headers=headers | extra)

    async def _create_final(self, request: Request, concat: FinalConcat) -> Response:
        """A final upload takes its length from its partials and its bytes from their staging."""
        if "upload-length" in request.headers or "upload-defer-length" in request.headers:
            raise BadRequest("a final upload takes its length from its partial uploads: send no Upload-Length")
        content_length = parse_non_negative("Content-Length", request.headers.get("content-length"), required=False)
        if content_length or "transfer-encoding" in request.headers:
            raise BadRequest("a final upload takes no body: its bytes are those of its partial uploads")
        metadata = (request.headers.get("upload-metadata") or "").strip()
        await self.ctx.hooks.check_creation(parse_metadata(metadata))
        return await create_final(self.ctx, request, concat, metadata)

    def _length(self, request: Request) -> int | None:
        options = self.ctx.options
        length = parse_non_negative("Upload-Length", request.headers.get("upload-length"), required=False)
        defer = request.headers.get("upload-defer-length")
        if defer is not None:
            if not options.has("creation-defer-length"):
                raise BadRequest("creation-defer-length is not enabled")
            if defer != "1":
                raise BadRequest("invalid Upload-Defer-Length header: must be 1")
            if length is not None:
                raise BadRequest("send either Upload-Length or Upload-Defer-Length, not both")
            return None
        if length is None:
            raise BadRequest("missing Upload-Length header")
        if length > options.max_size:
            raise TooLarge(f"Upload-Length exceeds Tus-Max-Size ({options.max_size})")
        return length

    async def _receive(
        self, request: Request, upload_id: str, room: int, interrupt: Interrupt, checksum: BodyChecksum | None
    ) -> int:
        async with await self.ctx.staging.open_writer(upload_id, 0) as writer:
            on_chunk = checksum.update if checksum is not None else None
            end = await receive_body(request.receive, writer, room, interrupt, self.ctx.options.body_pace, on_chunk)
            if end is BodyEnd.OVERFLOW:
                await writer.aclose()
                await self.ctx.staging.remove(upload_id)
                raise TooLarge(f"the body is longer than Upload-Length ({room})")
            if checksum is not None and end is not BodyEnd.COMPLETE:
                # Part of a body cannot be verified against the whole body's digest: keep none
                # of it. The upload is still created, at offset 0, so the client can resume.
                await writer.discard()
                return 0
            if checksum is not None and not checksum.matches():
                await writer.aclose()
                await self.ctx.staging.remove(upload_id)
                raise ChecksumMismatch(f"the body does not match its {checksum.algorithm} Upload-Checksum")
            return await writer.sync()
