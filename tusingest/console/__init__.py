"""The browser upload console at /console: a page, one script and one stylesheet, built from
tusingest/console/src by esbuild (package.json, build.mjs) and shipped prebuilt in static/, so a
pip install needs no Node.js. The page talks only to this server: the tus endpoint, the session
API under /api and /health/elements; its Content-Security-Policy allows nothing else."""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

PATH = "/console"
ASSETS = PATH + "/assets"
_MEDIA_TYPES = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
# Assets are named with their content hash (?v=) by the page, so they may be kept for a year; the page
# itself is revalidated each time, so a new build is picked up at once.
_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    tus_base_path: str
    chunk_size: int


def content_security_policy() -> str:
    """Only this origin: scripts, styles, fonts and requests (the tus endpoint, /api and /health are all
    on it; CSP has no path-only sources); images also from blob: and data: (the Dashboard's thumbnails
    and icons); no inline script or style; never framed."""
    return "; ".join(
        (
            "default-src 'self'",
            "connect-src 'self'",
            "img-src 'self' blob: data:",
            "style-src 'self'",
            "script-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def asset(name: str) -> bytes:
    return resources.files("tusingest.console").joinpath("static", name).read_bytes()


class Console:
    """The console's routes; the page and the assets are read once, when the app is built."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.assets = {name: asset(name) for name in _MEDIA_TYPES}
        digest = hashlib.sha256(b"".join(self.assets.values())).hexdigest()[:16]
        self.version = digest
        page = asset("index.html").decode()
        values = {
            "{assets}": ASSETS,
            "{version}": digest,
            "{tus_endpoint}": html.escape(settings.tus_base_path),
            "{chunk_size}": str(settings.chunk_size),
        }
        for placeholder, value in values.items():
            page = page.replace(placeholder, value)
        self.page = page.encode()
        self.headers = {
            "Content-Security-Policy": content_security_policy(),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

    def routes(self) -> list[BaseRoute]:
        return [
            Route(PATH, self.index, methods=["GET", "HEAD"]),
            Route(ASSETS + "/{name}", self.static, methods=["GET", "HEAD"]),
        ]

    async def index(self, request: Request) -> Response:
        headers = self.headers | {"Cache-Control": _REVALIDATE}
        return Response(self.page, media_type="text/html; charset=utf-8", headers=headers)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.assets:
            return Response("no such console asset\n", status_code=404, media_type="text/plain; charset=utf-8")
        cache = _IMMUTABLE if request.query_params.get("v") == self.version else _REVALIDATE
        headers = self.headers | {"Cache-Control": cache, "ETag": f'"{self.version}"'}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        return Response(self.assets[name], media_type=_MEDIA_TYPES[name], headers=headers)
