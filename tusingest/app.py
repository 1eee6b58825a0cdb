"""build_app(settings): the one place that builds the parts and connects them.

Routes, middleware and a lifespan that opens the session store and the upload locker,
prepares staging and runs the expiry task. Everything else receives what it needs as arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tusingest.config import Settings
from tusingest.elements.runtime import StorageElements
from tusingest.sessions import SessionStore, Upload, UploadState, open_session_store
from tusingest.sessions.expiry import expire_uploads
from tusingest.sessions.locks import Locker, open_locker
from tusingest.staging import DirectoryStaging
from tusingest.tus import TusOptions, TusServer
from tusingest.tus.unread_body import UnreadBodyGuard

log = logging.getLogger(__name__)

EXPOSED_HEADERS = (
    "Location",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Defer-Length",
    "Upload-Metadata",
    "Upload-Expires",
    "Upload-Concat",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
    "Tus-Checksum-Algorithm",
    "Retry-After",
    "Upload-Complete",
    "Upload-Limit",
    "Upload-Draft-Interop-Version",
)


@dataclass(slots=True)
class Parts:
    """What the running app is made of; tests and the CLI reach in through ``app.state.parts``."""

    settings: Settings
    store: SessionStore
    staging: DirectoryStaging
    locker: Locker
    tus: TusServer
    elements: StorageElements


def build_parts(settings: Settings) -> Parts:
    store = open_session_store(settings.database_url)
    staging = DirectoryStaging(
        settings.staging_dir,
        chunk_max_bytes=settings.staging_chunk_max_mb << 20,
        write_buffer_bytes=settings.staging_write_buffer_kb << 10,
    )
    # Same database as the store: advisory locks on PostgreSQL (one writer across nodes), in-process on SQLite.
    locker = open_locker(settings.database_url, default_timeout=settings.lock_timeout_seconds)

    async def mark_complete(upload: Upload) -> Mapping[str, str] | None:
        # The finaliser takes over here; until then a complete upload is simply marked so.
        await store.set_state(upload.id, UploadState.COMPLETE, only_from=UploadState.ACTIVE)
        return None

    options = TusOptions(
        base_path=settings.tus_base_path,
        max_size=settings.max_file_size,
        extensions=frozenset(settings.tus_extensions),
        ttl=timedelta(hours=settings.upload_session_ttl_hours),
        lock_timeout=settings.lock_timeout_seconds,
        trust_proxy_headers=settings.trust_proxy_headers,
    )
    tus = TusServer(options, store, staging, locker, mark_complete)
    elements = StorageElements.from_settings(settings)
    return Parts(settings, store, staging, locker, tus, elements)


async def _expire_periodically(parts: Parts) -> None:
    interval = parts.settings.upload_session_cleanup_interval_hours * 3600
    while True:
        try:
            await expire_uploads(parts.store, parts.staging, parts.locker)
        except Exception:  # a failed sweep must not end the task; the next one retries
            log.exception("upload expiry sweep failed")
        await asyncio.sleep(interval)


def build_app(settings: Settings) -> Starlette:
    parts = build_parts(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(Path(settings.staging_dir).mkdir, parents=True, exist_ok=True)
        await parts.store.open()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(parts.staging.close)
            stack.push_async_callback(parts.store.close)
            await parts.locker.open()
            stack.push_async_callback(parts.locker.close)
            await parts.elements.open()
            stack.push_async_callback(parts.elements.close)
            sweeper = asyncio.create_task(_expire_periodically(parts), name="upload-expiry")
            stack.push_async_callback(_cancel, sweeper)
            yield

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> JSONResponse:
        checks = {
            "session_store": await parts.store.ping(),
            "staging": _writable(parts.staging.root),
            "writable_storage_element": parts.elements.pool.has_writable_element(),
        }
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
        )

    async def elements(request: Request) -> JSONResponse:
        discovery = parts.elements.discovery
        return JSONResponse(
            {
                "version": parts.elements.pool.version,
                "source": discovery.source,
                "discovery_connected": discovery.connected,
                "storage_elements": [asdict(row) for row in parts.elements.pool.statuses()],
            }
        )

    routes = [
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/health/elements", elements),
        *parts.tus.routes(),
    ]
    middleware = [
        Middleware(UnreadBodyGuard),
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allowed_origins),
            allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=list(EXPOSED_HEADERS),
            max_age=86400,
        ),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.parts = parts
    return app


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _writable(path: Path) -> bool:
    probe = path / ".ready-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True
