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
from tusingest.tus.append import AppendRules, RequestBody, append
from tusingest.tus.base import TusContext, expires_header, requester_of, tus_headers
from tusingest.tus.checksum import BodyChecksum, request_checksum
from tusingest.tus.errors import BadRequest, Forbidden, TooLarge, UnsupportedMediaType, UploadGone
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
        rules = PatchRules(offset, new_length, content_length, request_checksum(request, self.ctx.options))
        body = RequestBody(request.receive, self.ctx.options.body_pace)
        appended = await append(self.ctx, upload_id, body, rules, requester_of(request))
        upload = appended.upload
        # The lock is free again: a HEAD answers at once while the completion runs.
        if appended.completed:
            return self._response(upload, await self.ctx.result(upload))
        if upload.state is UploadState.COMPLETE:
            return self._response(upload, dict(await self.ctx.hooks.describe(upload)))
        return self._response(upload, {})

    @staticmethod
    def _response(upload: Upload, extra: dict[str, str]) -> Response:
        headers = tus_headers() | {"Upload-Offset": str(upload.offset)} | expires_header(upload) | extra
        return Response(status_code=204, headers=headers)


class PatchRules(AppendRules):
    """tus 1.0's PATCH: a final upload is never patched, a failed one answers with its refusal,
    ``Upload-Length`` may fix a deferred length (before the offset check, as tusd does)."""

    def __init__(
        self, offset: int, new_length: int | None, content_length: int | None, checksum: BodyChecksum | None
    ) -> None:
        super().__init__(offset, content_length=content_length, checksum=checksum)
        self.new_length = new_length

    async def admit(self, ctx: TusContext, upload: Upload) -> Upload:
        if upload.kind is UploadKind.FINAL:
            raise Forbidden("a final upload of a concatenation cannot be patched")
        if upload.state is UploadState.FAILED:
            raise await ctx.hooks.refusal(upload)
        if self.new_length is None:
            return upload
        if upload.length is not None:
            if self.new_length != upload.length:
                raise BadRequest("Upload-Length cannot be changed once set")
            return upload
        if self.new_length > ctx.options.max_size:
            raise TooLarge(f"Upload-Length exceeds Tus-Max-Size ({ctx.options.max_size})")
        if self.new_length < upload.offset:
            raise BadRequest(f"Upload-Length {self.new_length} is below the upload's offset {upload.offset}")
        updated = await ctx.store.set_length(upload.id, self.new_length)
        if updated is None:
            raise UploadGone("upload changed while its length was being set")
        return updated
