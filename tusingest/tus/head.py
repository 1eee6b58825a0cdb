"""HEAD: where an upload stands.

It takes the upload's lock like a writer and so asks a running PATCH to commit and let go:
a client sends HEAD when it resumes, which means its previous PATCH is dead or dying (a
dropped connection the server has not noticed yet). It then reports the true offset at once
instead of one that the old request is about to move.

For concatenation it also says what an upload is made of (``Upload-Concat``); a final upload
reports no ``Upload-Offset`` until all its partials are complete.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import UploadKind, UploadState
from tusingest.tus.base import TusContext, expires_header, requester_of, tus_headers
from tusingest.tus.concat import upload_concat_header


class HeadHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        async with self.ctx.locker.lock(upload_id, timeout=self.ctx.options.lock_timeout):
            upload = await self.ctx.load(upload_id, requester_of(request))
            if upload.completion_pending:
                # Owed since a crash: a client that sees the full offset sends nothing more, so this
                # HEAD is its last chance to set the completion going (recovery would, later).
                await self.ctx.hand_over(upload)
        if upload.kind is UploadKind.FINAL and upload.state is UploadState.ACTIVE and not upload.is_complete:
            # Normally the last partial's PATCH completes the final; this catches a final whose
            # completion was cut short there (a crash, a busy lock) once its partials are done.
            upload = await self.ctx.complete_final(upload.id) or upload
        headers = tus_headers() | {"Cache-Control": "no-store"} | upload_concat_header(self.ctx, request, upload)
        if upload.kind is not UploadKind.FINAL or upload.is_complete:
            # A final upload has no offset of its own until its partials are all complete.
            headers["Upload-Offset"] = str(upload.offset)
        if upload.length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(upload.length)
        if upload.metadata:
            headers["Upload-Metadata"] = upload.metadata
        headers |= expires_header(upload)
        if upload.state in (UploadState.COMPLETE, UploadState.FAILED):
            headers |= await self.ctx.hooks.describe(upload)
        return Response(status_code=200, headers=headers)
