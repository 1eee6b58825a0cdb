"""HEAD: where an upload stands. Reads the committed state only, so it never waits for a
writer: the committed offset is the truth at every moment (invariant 1)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.tus.base import TusContext, expires_header, tus_headers


class HeadHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        upload = await self.ctx.load(upload_id)
        headers = tus_headers() | {"Cache-Control": "no-store", "Upload-Offset": str(upload.offset)}
        if upload.length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(upload.length)
        if upload.metadata:
            headers["Upload-Metadata"] = upload.metadata
        headers |= expires_header(upload)
        return Response(status_code=200, headers=headers)
