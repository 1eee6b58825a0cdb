"""OPTIONS: what this server supports. Needs no Tus-Resumable from the client."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.tus.base import TusContext, tus_headers
from tusingest.tus.checksum import ALGORITHMS
from tusingest.tus.headers import TUS_VERSION


class OptionsHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str | None) -> Response:
        headers = tus_headers() | {"Tus-Version": TUS_VERSION, "Tus-Max-Size": str(self.ctx.options.max_size)}
        # The advertised list is what the configured parts can do, in the order app.py gave it.
        if self.ctx.options.extensions:
            headers["Tus-Extension"] = ",".join(self.ctx.options.extensions)
        if self.ctx.options.has("checksum"):
            headers["Tus-Checksum-Algorithm"] = ",".join(ALGORITHMS)
        return Response(status_code=204, headers=headers)
