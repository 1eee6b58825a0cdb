"""What every tus handler shares: options, the parts it works with, loading an upload,
the headers every response carries."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from starlette.requests import Request

from tusingest.sessions import SessionStore, Upload, UploadState
from tusingest.sessions.locks import Locker
from tusingest.sessions.model import utcnow
from tusingest.staging import DirectoryStaging
from tusingest.tus.errors import UploadGone, UploadNotFound
from tusingest.tus.headers import TUS_VERSION, http_date

CompletionHook = Callable[[Upload], Awaitable[Mapping[str, str] | None]]
"""Called once an upload holds all its bytes; may return extra response headers."""


@dataclass(frozen=True, slots=True)
class TusOptions:
    base_path: str = "/files/"
    max_size: int = 5 << 30
    extensions: frozenset[str] = frozenset()
    ttl: timedelta | None = timedelta(hours=24)  # None: uploads never expire
    lock_timeout: float = 10.0
    trust_proxy_headers: bool = False

    def has(self, extension: str) -> bool:
        return extension in self.extensions


@dataclass(slots=True)
class TusContext:
    options: TusOptions
    store: SessionStore
    staging: DirectoryStaging
    locker: Locker
    on_complete: CompletionHook

    def expires_at(self, now: datetime) -> datetime | None:
        if self.options.ttl is None or not self.options.has("expiration"):
            return None
        return now + self.options.ttl

    async def load(self, upload_id: str) -> Upload:
        """The upload, or the error a client gets for it: 404 unknown, 410 terminated/expired."""
        upload = await self.store.get(upload_id)
        if upload is None:
            raise UploadNotFound()
        if upload.state is UploadState.TERMINATED:
            raise UploadGone("upload was terminated")
        if upload.is_expired(utcnow()):
            raise UploadGone("upload has expired")
        return upload

    def location(self, request: Request, upload_id: str) -> str:
        scheme = request.url.scheme
        host = request.headers.get("host") or request.url.netloc
        if self.options.trust_proxy_headers:
            scheme = _first(request.headers.get("x-forwarded-proto")) or scheme
            host = _first(request.headers.get("x-forwarded-host")) or host
        return f"{scheme}://{host}{self.options.base_path}{upload_id}"

    async def complete(self, upload: Upload) -> dict[str, str]:
        extra = await self.on_complete(upload)
        return dict(extra or {})


def expires_header(upload: Upload) -> dict[str, str]:
    if upload.state is UploadState.ACTIVE and upload.expires_at is not None:
        return {"Upload-Expires": http_date(upload.expires_at)}
    return {}


def tus_headers() -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION}


def _first(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(",")[0].strip() or None
