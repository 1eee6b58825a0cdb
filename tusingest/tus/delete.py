"""DELETE (termination): stop an upload for good and free its staged bytes. Later requests get 410."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import UploadState
from tusingest.tus.base import TusContext, tus_headers
from tusingest.tus.errors import MethodNotAllowed, UploadGone


class DeleteHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        if not self.ctx.options.has("termination"):
            raise MethodNotAllowed("termination is not enabled")
        # Asks a running PATCH to commit and let go, like any other writer would.
        async with self.ctx.locker.lock(upload_id, timeout=self.ctx.options.lock_timeout):
            upload = await self.ctx.load(upload_id)
            if await self.ctx.store.set_state(upload.id, UploadState.TERMINATED, only_from=upload.state) is None:
                raise UploadGone("upload changed state while being terminated")
            await self.ctx.staging.remove(upload.id)
        return Response(status_code=204, headers=tus_headers())
