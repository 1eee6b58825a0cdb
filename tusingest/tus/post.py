"""POST (creation, creation-with-upload, creation-defer-length, concatenation): start a new upload.

With a body (creation-with-upload) the bytes go through the one append operation's creation
(``tus.append.create``): staged first, then the upload row written once, with its offset.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.sessions.model import new_upload_id, utcnow
from tusingest.tus.append import AppendRules, RequestBody
from tusingest.tus.base import TusContext, expires_header, requester_of, tus_headers
from tusingest.tus.checksum import request_checksum
from tusingest.tus.concat import FinalConcat, create_final, parse_upload_concat
from tusingest.tus.errors import BadRequest, MethodNotAllowed, TooLarge, UnsupportedMediaType
from tusingest.tus.headers import OFFSET_OCTET_STREAM, parse_metadata, parse_non_negative
from tusingest.tus.idempotency import create_once
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
        checksum = request_checksum(request, options)  # verified over the body, if there is one

        now = utcnow()
        upload = Upload(
            id=new_upload_id(),
            length=length,
            metadata=metadata,
            kind=kind,
            created_at=now,
            updated_at=now,
            expires_at=self.ctx.expires_at(now),
        )
        requester = requester_of(request)
        upload = requester.owning(upload)
        # Creation-with-upload takes the bytes the start inspector would want before the row exists;
        # the first PATCH inspects them (it reads back what is staged).
        rules = AppendRules(content_length=content_length, checksum=checksum, inspect=False)
        body = RequestBody(request.receive, options.body_pace) if with_body else None
        upload, repeated = await create_once(self.ctx, request, upload, body, rules, requester)
        if repeated:  # its Idempotency-Key's first request made it: where it stands now
            extra = dict(await self.ctx.hooks.describe(upload)) if upload.state is not UploadState.ACTIVE else {}
        else:
            extra = await self.ctx.result(upload) if upload.is_complete else {}

        headers = tus_headers() | {"Location": self.ctx.location(request, upload.id)}
        if not upload.is_complete:
            headers |= expires_header(upload)
        if with_body or repeated:
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
