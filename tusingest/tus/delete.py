"""DELETE (termination): stop an upload for good and free its staged bytes. Later requests get 410."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.tus.base import TusContext, requester_of, tus_headers
from tusingest.tus.errors import MethodNotAllowed


class DeleteHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        if not self.ctx.options.has("termination"):
            raise MethodNotAllowed("termination is not enabled")
        await self.ctx.terminate(upload_id, requester_of(request))
        return Response(status_code=204, headers=tus_headers())
