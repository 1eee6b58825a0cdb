"""build_app(settings): the one place that builds the parts and connects them.

Routes, middleware and a lifespan that opens the session store and the upload locker,
prepares staging and runs the expiry task. Everything else receives what it needs as arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tusingest.api import finaliser
from tusingest.api.errors import ApiError, api_exception_handlers
from tusingest.api.files import FilesApi
from tusingest.api.limits import RateLimits
from tusingest.api.openapi import ApiRoute, openapi_routes
from tusingest.api.sessions import SessionEvents, SessionStatus
from tusingest.api.uploads import FacadeSettings, FacadeUploads
from tusingest.auth import (
    IDENTITY_STATE,
    Authenticator,
    AuthError,
    AuthSettings,
    AuthUnavailable,
    Identity,
    Operation,
    is_admin,
    may,
    www_authenticate,
    www_authenticate_insufficient_scope,
)
from tusingest.config import Settings, database_engine
from tusingest.console import Console, ConsoleSettings
from tusingest.elements.breaker import BreakerSettings
from tusingest.elements.runtime import StorageElements
from tusingest.elements.settings import DiscoverySettings, ElementSettings, S3Settings
from tusingest.finalise.clamd import ClamdScanner
from tusingest.finalise.delete import DeleteSagas
from tusingest.finalise.pipeline import FinalisePolicy
from tusingest.finalise.transfer import TransferSagas
from tusingest.finalise.upload import UploadSagas
from tusingest.observability.metrics import CONTENT_TYPE, BreakerStates, Metrics, ReadGauge
from tusingest.observability.middleware import RequestTelemetry
from tusingest.observability.tracing import Tracing, TracingSettings
from tusingest.ratelimit import RateLimiter, RateLimitSettings
from tusingest.saga.failpoints import Failpoints
from tusingest.saga.outbox import OutboxRelay
from tusingest.saga.runner import SagaSettings, cancel_and_wait
from tusingest.saga.store import SagaStore
from tusingest.serving import RequestHeadLimit
from tusingest.sessions import SessionStore
from tusingest.sessions.audit import Action, AuditEvent, Auditor, Outcome
from tusingest.sessions.expiry import expire_partials, expire_uploads
from tusingest.sessions.locks import Locker, MemoryLocker
from tusingest.sessions.progress import ProgressBus
from tusingest.staging import DirectoryStaging, Staging
from tusingest.tus import TusOptions, TusServer
from tusingest.tus.base import REQUESTER, Requester
from tusingest.tus.body import BodyPace
from tusingest.tus.headers import TUS_VERSION
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
    # GET on an upload (a download, resumable by Range)
    "Accept-Ranges",
    "Content-Range",
    "Content-Disposition",
    "ETag",
    *finaliser.EXPOSED_HEADERS,
)


@dataclass(slots=True)
class Parts:
    """What the running app is made of; tests and the CLI reach in through ``app.state.parts``."""

    settings: Settings
    store: SessionStore
    staging: Staging
    locker: Locker
    tus: TusServer
    elements: StorageElements
    saga_store: SagaStore
    relay: OutboxRelay
    sagas: UploadSagas
    deletes: DeleteSagas
    transfers: TransferSagas
    files_api: FilesApi
    auth: Authenticator
    tracing: Tracing
    metrics: Metrics
    progress: ProgressBus


@dataclass(frozen=True, slots=True)
class Database:
    """The session store, the saga store, the upload locker and the progress bus of one DATABASE_URL."""

    sessions: SessionStore
    sagas: SagaStore
    locker: Locker
    progress: ProgressBus


def open_database(database_url: str, lock_timeout: float = 10.0, metrics: Metrics | None = None) -> Database:
    """The one place a DATABASE_URL becomes stores, a locker and a progress bus. Same database for all:
    advisory locks and LISTEN/NOTIFY on PostgreSQL (across nodes), in-process on SQLite (one node).
    The session store tells the bus of each committed offset."""
    match database_engine(database_url):
        case "sqlite":
            from tusingest.saga.sqlite import SQLiteSagaStore
            from tusingest.sessions.sqlite import SQLiteSessionStore

            sessions = SQLiteSessionStore(database_url)
            # One connection for both stores on one SQLite file: one writer, so no "database is locked".
            return Database(
                sessions, SQLiteSagaStore(sessions.database), MemoryLocker(lock_timeout, metrics), sessions.progress
            )
        case "postgresql":
            from tusingest.saga.postgres import PostgresSagaStore
            from tusingest.sessions.pglocks import PostgresLocker
            from tusingest.sessions.pgprogress import PostgresProgressBus
            from tusingest.sessions.postgres import PostgresSessionStore

            postgres_sessions = PostgresSessionStore(database_url)
            # PostgreSQL carries progress across nodes even when Redis is configured: the NOTIFY of an
            # offset rides in the statement that commits it, where Redis would cost a round trip per PATCH.
            postgres_sessions.progress = PostgresProgressBus(database_url)
            return Database(
                postgres_sessions,
                PostgresSagaStore(database_url),
                PostgresLocker(database_url, default_timeout=lock_timeout, metrics=metrics),
                postgres_sessions.progress,
            )


def facade_settings(settings: Settings) -> FacadeSettings:
    return FacadeSettings(
        max_file_size=settings.max_file_size,
        finalise_wait_seconds=settings.finalise_wait_seconds,
        max_batch_bytes=settings.max_batch_size_mb << 20,
        max_batch_files=settings.max_batch_files,
        batch_parallelism=settings.batch_parallelism,
    )


def rate_limit_settings(settings: Settings) -> RateLimitSettings:
    return RateLimitSettings(
        creations_per_minute=settings.rate_limit_creations_per_minute,
        creations_per_minute_per_address=settings.rate_limit_creations_per_minute_per_address,
        bytes_per_second=settings.rate_limit_bytes_per_second,
        concurrent_uploads=settings.rate_limit_concurrent_uploads,
        redis_url=settings.redis_url,
    )


def element_settings(settings: Settings, environ: Mapping[str, str] = os.environ) -> ElementSettings:
    """What elements/ needs: the settings it uses and the per-element ELEMENT_<ID>_* variables."""
    return ElementSettings(
        discovery=DiscoverySettings(
            redis_url=settings.redis_url,
            key=settings.service_discovery_key,
            channel=settings.service_discovery_channel,
            fallback_path=settings.service_discovery_fallback_config,
            cache_path=settings.service_discovery_cache_file,
            default_element_dir=settings.default_element_dir,
            reconnect_max_seconds=settings.service_discovery_reconnect_max_seconds,
        ),
        s3=S3Settings(
            verify_tls=settings.s3_verify_tls,
            ca_bundle=settings.s3_ca_bundle,
            connect_timeout=settings.s3_connect_timeout_seconds,
            read_timeout=settings.s3_read_timeout_seconds,
            part_size=settings.chunk_size,
            element_variables={name: value for name, value in environ.items() if name.startswith("ELEMENT_")},
            tls_min_version=settings.tls_min_version,
        ),
        breaker=BreakerSettings(
            failure_threshold=settings.circuit_breaker_failure_threshold,
            timeout=settings.circuit_breaker_timeout_seconds,
            success_threshold=settings.circuit_breaker_success_threshold,
            enabled=settings.circuit_breaker_enabled,
        ),
        selection_strategy=settings.storage_selection_strategy,
        datacenter=settings.storage_preferred_datacenter,
        retry_attempts=settings.storage_retry_max_attempts,
        retry_base_delay=settings.storage_retry_base_delay_seconds,
        probe_timeout=settings.storage_health_check_timeout_seconds,
        health_interval=settings.storage_health_check_interval_seconds,
        # No put runs longer than its saga's timeout, and a taken-over saga waited a lease first.
        put_lifetime=settings.saga_timeout_seconds + settings.saga_lease_seconds,
    )


def open_staging(settings: Settings) -> Staging:
    """STAGING_BACKEND: chunk files under STAGING_DIR, or an S3 bucket (STAGING_DIR holds scratch)."""
    if settings.staging_backend == "directory":
        return DirectoryStaging(
            settings.staging_dir,
            chunk_max_bytes=settings.staging_chunk_max_mb << 20,
            write_buffer_bytes=settings.staging_write_buffer_kb << 10,
        )
    from tusingest.elements.s3 import S3Access, S3ClientPool
    from tusingest.staging.s3 import S3Staging

    clients = S3ClientPool(
        connect_timeout=settings.s3_connect_timeout_seconds,
        read_timeout=settings.s3_read_timeout_seconds,
        tls_min_version=settings.tls_min_version,
        max_pool_connections=32,
    )
    secret = settings.staging_s3_secret_access_key
    access = S3Access(
        settings.staging_s3_endpoint_url,
        region=settings.staging_s3_region,
        access_key_id=settings.staging_s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        verify=settings.s3_ca_bundle or (None if settings.s3_verify_tls else False),
    )
    assert settings.staging_s3_bucket is not None  # the settings' own check
    return S3Staging(
        lambda: clients.client(access),
        settings.staging_s3_bucket,
        prefix=settings.staging_s3_prefix,
        root=settings.staging_dir,
        part_size=settings.chunk_size,
        closing=clients.close,
        identity=access,  # an S3 element of the same endpoint and keys copies sealed uploads server-side
    )


def build_parts(settings: Settings) -> Parts:
    metrics = Metrics()
    database = open_database(settings.database_url, lock_timeout=settings.lock_timeout_seconds, metrics=metrics)
    store = database.sessions
    # One auditor for both stores: each publishes the audit events it commits (log line, Redis stream).
    store.auditor = database.sagas.auditor = Auditor(settings.redis_url)
    staging = open_staging(settings)
    locker = database.locker
    metrics.watch(
        ReadGauge(
            "staging_free_bytes", "Free bytes on the staging volume", lambda: shutil.disk_usage(staging.root).free
        )
    )

    options = TusOptions(
        base_path=settings.tus_base_path,
        max_size=settings.max_file_size,
        extensions=settings.tus_extensions,
        ttl=timedelta(hours=settings.upload_session_ttl_hours),
        lock_timeout=settings.lock_timeout_seconds,
        trust_proxy_headers=settings.trust_proxy_headers,
        min_append_size=settings.upload_min_append_size_kb << 10,
        max_append_size=settings.upload_max_append_size_mb << 20,
        body_pace=BodyPace(
            idle_timeout=settings.body_idle_timeout_seconds,
            min_rate=int(settings.body_min_rate_kbps * 1024),
            window=settings.body_min_rate_window_seconds,
        ),
    )
    elements = StorageElements.from_settings(element_settings(settings))
    metrics.watch(BreakerStates(lambda: ((row.element_id, row.breaker) for row in elements.pool.statuses())))
    saga_store = database.sagas
    relay = OutboxRelay(
        saga_store,
        redis_url=settings.redis_url,
        webhook_secret=settings.webhook_secret,
        webhook_timeout=settings.webhook_timeout_seconds,
        retry_max_seconds=settings.webhook_retry_max_seconds,
        poll_interval=settings.outbox_poll_interval_seconds,
        tls_min_version=settings.tls_min_version,
        metrics=metrics,
    )
    policy = FinalisePolicy(
        max_size=settings.max_file_size,
        mime_validation=settings.mime_type_validation,
        allowed_mime_types=settings.allowed_mime_types,
        compression_enabled=settings.compression_enabled,
        compression_algorithm=settings.compression_algorithm,
        compression_level=settings.compression_level,
        compression_min_size=int(settings.compression_min_size_mb * (1 << 20)),
        compression_min_saving=settings.compression_min_saving,
        scan_fail_open=settings.virus_scan_fail_open,
    )
    scanner = (
        ClamdScanner(settings.clamd_url, timeout=settings.virus_scan_timeout_seconds)
        if settings.virus_scan_enabled
        else None
    )
    saga_settings = SagaSettings(
        owner=node_id(),
        lease_seconds=settings.saga_lease_seconds,
        retry_attempts=settings.saga_retry_max_attempts,
        retry_base_delay=settings.saga_retry_base_delay_seconds,
        timeout=settings.saga_timeout_seconds,
        webhook_urls=settings.webhook_urls,
        events_stream=settings.file_events_stream if settings.redis_url else None,
        default_username=settings.default_username,
        concurrency=settings.finalise_concurrency,
    )
    failpoints = Failpoints(settings.saga_failpoints)
    sagas = UploadSagas(
        sessions=store,
        staging=staging,
        sagas=saga_store,
        pool=elements.pool,
        relay=relay,
        scanner=scanner,
        policy=policy,
        settings=saga_settings,
        failpoints=failpoints,
        metrics=metrics,
        progress=database.progress,
    )
    deletes = DeleteSagas(
        store=saga_store,
        pool=elements.pool,
        relay=relay,
        settings=saga_settings,
        failpoints=failpoints,
        record_audit=store.record_audit,
        metrics=metrics,
    )
    transfers = TransferSagas(
        store=saga_store,
        pool=elements.pool,
        settings=saga_settings,
        failpoints=failpoints,
        record_audit=store.record_audit,
        metrics=metrics,
    )
    hooks = finaliser.FinaliserHooks(sagas, store, policy, wait_seconds=settings.finalise_wait_seconds)
    tus = TusServer(options, store, staging, locker, hooks, metrics)
    files_api = FilesApi(deletes, transfers, verify_checksum_default=settings.transfer_verify_checksum_default)
    auth = Authenticator(auth_settings(settings))
    tracing = Tracing(
        TracingSettings(
            enabled=settings.opentelemetry_enabled,
            otlp_endpoint=settings.otel_exporter_otlp_endpoint,
            service_name=settings.otel_service_name,
        )
    )
    return Parts(
        settings,
        store,
        staging,
        locker,
        tus,
        elements,
        saga_store,
        relay,
        sagas,
        deletes,
        transfers,
        files_api,
        auth,
        tracing,
        metrics,
        database.progress,
    )


def auth_settings(settings: Settings) -> AuthSettings:
    return AuthSettings(
        public_key_paths=tuple(Path(path) for path in settings.jwt_public_key_path),
        jwks_url=settings.jwt_jwks_url,
        secret=settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
        jwks_cache_seconds=settings.jwt_jwks_cache_seconds,
        jwks_refetch_min_seconds=settings.jwt_jwks_refetch_min_seconds,
        jwks_ca_bundle=settings.jwt_jwks_ca_bundle,
        tls_min_version=settings.tls_min_version,
        anonymous_name=settings.default_username,
    )


def metrics_auth(settings: Settings) -> str:
    """METRICS_AUTH, or its default: "token" when a JWT key is configured, "open" in anonymous mode."""
    if settings.metrics_auth is not None:
        return settings.metrics_auth
    return "token" if auth_settings(settings).enabled else "open"


def node_id() -> str:
    """This process's name in the saga log: host, pid and a random part (pids repeat across restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def _expire_periodically(parts: Parts) -> None:
    interval = parts.settings.upload_session_cleanup_interval_hours * 3600
    while True:
        try:
            # A staging folder no session knows, untouched for the TTL, belongs to no live creation.
            grace = timedelta(hours=parts.settings.upload_session_ttl_hours)
            report = await expire_uploads(parts.store, parts.staging, parts.locker, staging_grace=grace)
            parts.metrics.tus_uploads.labels("expired").inc(report.expired)
            await free_partials(parts)
            await purge_outbox(parts)
        except Exception:  # a failed sweep must not end the task; the next one retries
            log.exception("upload expiry sweep failed")
        await asyncio.sleep(interval)


async def free_partials(parts: Parts, now: datetime | None = None) -> int:
    """Free partial uploads no final upload needs any more (the rule is in sessions/expiry.py)."""
    ttl = timedelta(hours=parts.settings.upload_session_ttl_hours)
    return await expire_partials(parts.store, parts.staging, parts.locker, parts.tus.ctx.hooks.settled, ttl, now)


async def recover_uploads(parts: Parts) -> None:
    """One recovery round: completions owed since a crash get their saga, then sagas of every kind whose
    node died are taken over. A completion younger than the lock timeout is left to the request that made it.
    A part that fails is logged and the rest of the round still runs; the next round tries it again."""
    grace = timedelta(seconds=parts.settings.lock_timeout_seconds)
    try:
        await parts.tus.ctx.finish_pending_completions(before=datetime.now(UTC) - grace)
    except Exception:
        log.exception("finishing owed upload completions failed")
    for runner in (parts.sagas, parts.deletes, parts.transfers):
        try:
            await runner.recover()
        except Exception:
            log.exception("recovery of %s sagas failed", runner.kind)


async def _recover_periodically(parts: Parts) -> None:
    while True:
        await recover_uploads(parts)
        await asyncio.sleep(parts.settings.saga_recovery_interval_seconds)


async def purge_outbox(parts: Parts) -> int:
    """Forget outbox messages delivered longer than OUTBOX_RETENTION_DAYS ago (undelivered ones stay)."""
    cutoff = datetime.now(UTC) - timedelta(days=parts.settings.outbox_retention_days)
    return await parts.saga_store.purge_delivered(delivered_before=cutoff)


def build_app(settings: Settings) -> Starlette:
    parts = build_parts(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        parts.tracing.activate()  # the tasks started here (recovery, outbox) trace into this app's provider
        await asyncio.to_thread(Path(settings.staging_dir).mkdir, parents=True, exist_ok=True)
        await parts.store.open()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(parts.tracing.shutdown)
            stack.push_async_callback(parts.staging.aclose)
            stack.push_async_callback(parts.store.close)
            stack.push_async_callback(parts.store.auditor.aclose)
            stack.push_async_callback(parts.auth.aclose)
            await parts.progress.open()
            stack.push_async_callback(parts.progress.close)
            await parts.locker.open()
            stack.push_async_callback(parts.locker.close)
            await parts.elements.open()
            stack.push_async_callback(parts.elements.close)
            await parts.saga_store.open()
            stack.push_async_callback(parts.saga_store.close)
            await parts.relay.start()
            stack.push_async_callback(parts.relay.close)
            for runner in (parts.sagas, parts.deletes, parts.transfers):
                stack.push_async_callback(runner.close)
            recovery = asyncio.create_task(_recover_periodically(parts), name="saga-recovery")
            stack.push_async_callback(cancel_and_wait, recovery)
            sweeper = asyncio.create_task(_expire_periodically(parts), name="upload-expiry")
            stack.push_async_callback(cancel_and_wait, sweeper)
            yield

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> JSONResponse:
        checks = {
            "session_store": _check(await parts.store.ping(), "database does not answer"),
            "saga_store": _check(await parts.saga_store.ping(), "database does not answer"),
            "staging": await asyncio.to_thread(_staging_check, parts.staging.root, settings.staging_min_free_mb),
            "writable_storage_element": _check(
                parts.elements.pool.has_writable_element(), "no writable storage element can take a file"
            ),
        }
        if settings.redis_url:
            checks["redis"] = _check_reason(await parts.relay.ping_redis())
        if parts.sagas.scanner is not None:
            checks["clamd"] = _check_reason(await _clamd_down(parts.sagas.scanner))
        ok = all(check["ok"] for check in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
        )

    async def metrics(request: Request) -> Response:
        return Response(parts.metrics.render(), media_type=CONTENT_TYPE)

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

    api_routes: list[BaseRoute] = [
        *SessionStatus(parts.store, parts.sagas).routes(),
        *SessionEvents(
            SessionStatus(parts.store, parts.sagas), parts.progress, heartbeat=settings.events_heartbeat_seconds
        ).routes(),
        *FacadeUploads(facade_settings(settings), parts.tus.ctx, parts.sagas).routes(),
        *parts.files_api.routes(),
    ]
    routes = [
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/health/elements", elements),
        *([Route("/metrics", metrics)] if settings.prometheus_metrics_enabled else []),
        *api_routes,
        *openapi_routes(api_routes),  # the document of exactly these routes
        *parts.tus.routes(),
        *(
            Console(ConsoleSettings(settings.tus_base_path, settings.chunk_size)).routes()
            if settings.console_enabled
            else []
        ),
    ]
    if not settings.resumable_uploads_enabled:
        routes = _without_resumable_uploads(routes, settings.tus_base_path)
    middleware = [
        # Outermost: every answer, refusals included, is in the request's span and access line.
        Middleware(
            RequestTelemetry,
            traces=parts.tracing,
            upload_prefix=settings.tus_base_path.rstrip("/") or "/",
            upload_routes=("/api/files/upload", "/api/files/batch/upload"),
            subject_of=_subject,
            # With metrics off the requests are not counted; the few counters elsewhere stay (unread).
            metrics=parts.metrics if settings.prometheus_metrics_enabled else None,
            trust_proxy_headers=settings.trust_proxy_headers,
        ),
        Middleware(UnreadBodyGuard),
        Middleware(
            RequestHeadLimit,
            max_bytes=settings.request_head_max_kb << 10,
            max_headers=settings.request_headers_max,
        ),
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allowed_origins),
            allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=list(EXPOSED_HEADERS),
            max_age=86400,
        ),
        # Inside CORS, so a refusal still carries the CORS headers a browser needs to read it.
        Middleware(
            Authentication,
            auth=parts.auth,
            tus_base_path=settings.tus_base_path,
            record_audit=parts.store.record_audit,
            guard_metrics=metrics_auth(settings) == "token",
        ),
        # Last, so after authentication: it reads the caller's identity from the scope state.
        Middleware(
            RateLimits, limiter=RateLimiter(rate_limit_settings(settings)), tus_base_path=settings.tus_base_path
        ),
    ]
    # The /api refusals' one mapping to HTTP; the tus routes answer their own (TusServer._dispatch).
    handlers = api_exception_handlers(parts.tus.ctx.options.body_pace)
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers=handlers)
    app.state.parts = parts
    return app


class Authentication:
    """ASGI middleware: every request on the tus endpoint or under /api carries a verified Bearer
    token (or, with no key configured, is the anonymous identity). A refused token answers 401
    with the RFC 6750 header, a key set that cannot be had 503, an operation the caller's role and
    scopes do not grant 403. Otherwise the Identity and the tus layer's Requester go into the
    request scope's state. /health/*, /openapi.json and CORS preflights are not guarded."""

    def __init__(
        self,
        app: ASGIApp,
        auth: Authenticator,
        tus_base_path: str,
        record_audit: Callable[[AuditEvent], Awaitable[None]] | None = None,
        guard_metrics: bool = False,
    ) -> None:
        self.app = app
        self.auth = auth
        self.tus_base = tus_base_path
        self.record_audit = record_audit  # every 401 and 403 goes to the audit log
        self.guard_metrics = guard_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        is_tus = path == self.tus_base.rstrip("/") or path.startswith(self.tus_base)
        guarded = is_tus or path.startswith("/api/") or (self.guard_metrics and path == "/metrics")
        if scope["type"] != "http" or not guarded:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = _method(scope["method"], headers, is_tus)
        if method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers:
            await self.app(scope, receive, send)  # a CORS preflight carries no credentials
            return
        client = scope.get("client")
        address = str(client[0]) if client else None
        try:
            identity = await self.auth.authenticate(headers.get("authorization"))
        except AuthError as error:
            answer = _refusal(401, "invalid_token", error.reason, {"WWW-Authenticate": www_authenticate(error)}, is_tus)
            # The subject of a refused token is not known (nor trusted): recorded as anonymous.
            await self._audit_refusal(
                AuditEvent(
                    Action.REFUSED, Outcome.REFUSED, client_address=address, reason=f"401 invalid_token: {error.reason}"
                )
            )
        except AuthUnavailable as down:
            answer = _refusal(503, "auth_unavailable", down.reason, {"Retry-After": str(down.retry_after)}, is_tus)
        else:
            operation = _operation(method, path, is_tus)
            if operation is None or may(identity, operation):
                state = scope.setdefault("state", {})
                state[IDENTITY_STATE] = identity
                state[REQUESTER] = _requester(identity, address)
                await self.app(scope, receive, send)
                return
            why = f"the token does not allow {operation.value}"
            refused = {"WWW-Authenticate": www_authenticate_insufficient_scope(operation)}
            answer = _refusal(403, "insufficient_scope", why, refused, is_tus)
            await self._audit_refusal(
                AuditEvent(
                    Action.REFUSED,
                    Outcome.REFUSED,
                    identity.subject,
                    identity.name or None,
                    address,
                    upload_id=_upload_in(path, self.tus_base) if is_tus else None,
                    reason=f"403 insufficient_scope: {why}",
                )
            )
        await answer(scope, receive, send)

    async def _audit_refusal(self, event: AuditEvent) -> None:
        """Best effort: a store that cannot take the row costs a warning, not the (already refused) answer."""
        if self.record_audit is None:
            return
        try:
            await self.record_audit(event)
        except Exception as exc:  # any store's failure; the client is refused either way
            log.warning("cannot record the refusal in the audit log: %s", exc)


def _subject(scope: Scope) -> str | None:
    """The authenticated caller of a request, for its access line (None before or without authentication)."""
    requester = scope.get("state", {}).get(REQUESTER)
    return requester.subject if isinstance(requester, Requester) and requester.subject else None


def _requester(identity: Identity, address: str | None = None) -> Requester:
    return Requester(subject=identity.subject, name=identity.name, admin=is_admin(identity), address=address)


def _upload_in(path: str, tus_base: str) -> str | None:
    """The upload id of a tus URL (None for the creation endpoint)."""
    return path.removeprefix(tus_base).strip("/") or None


def _method(method: str, headers: Headers, is_tus: bool) -> str:
    """The method the request acts as: tus lets a POST say it is a PATCH, DELETE or HEAD."""
    override = headers.get("x-http-method-override") if is_tus and method == "POST" else None
    return override.strip().upper() if override else method


_TUS_OPERATIONS = {
    "POST": Operation.CREATE,
    "PATCH": Operation.APPEND,
    "DELETE": Operation.TERMINATE,
    "HEAD": Operation.READ,
    "GET": Operation.READ,
}


def _operation(method: str, path: str, is_tus: bool) -> Operation | None:
    """What a request does, for the role and scope policy (None: nothing an operation guards)."""
    if is_tus:
        return _TUS_OPERATIONS.get(method)
    if path == "/metrics":
        return Operation.METRICS
    if method == "GET":
        return Operation.READ
    if method == "DELETE":
        return Operation.DELETE
    if method == "POST" and path.endswith("/transfer"):
        return Operation.TRANSFER
    if method == "POST":
        return Operation.CREATE  # the facade's uploads, one file or a batch
    return None


def _refusal(status: int, code: str, message: str, headers: dict[str, str], is_tus: bool) -> Response:
    """A refusal in the audience's own form: tus answers carry Tus-Resumable, /api answers are JSON."""
    if is_tus:
        headers = {"Tus-Resumable": TUS_VERSION} | headers
        return PlainTextResponse(message + "\n", status_code=status, headers=headers)
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


RESUMABLE_UPLOADS_DISABLED = "resumable uploads are disabled on this server (RESUMABLE_UPLOADS_ENABLED=false)"


def _without_resumable_uploads(routes: list[BaseRoute], tus_base_path: str) -> list[BaseRoute]:
    """RESUMABLE_UPLOADS_ENABLED=false: the tus endpoint is not routed (its paths answer 404 saying
    why), and the facade refuses X-Upload-Session-ID with 400 before reading the body. Whole-file
    uploads (POST /api/files/upload without the header, /api/files/batch/upload) stay."""
    tus_paths = {tus_base_path, tus_base_path.rstrip("/") or "/", tus_base_path + "{upload_id}"}
    kept: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, Route) and route.path in tus_paths:
            continue
        if isinstance(route, ApiRoute) and route.path == "/api/files/upload":
            route = route.with_endpoint(_refusing_upload_sessions(route.endpoint))
        kept.append(route)

    async def tus_disabled(request: Request) -> Response:
        return PlainTextResponse(RESUMABLE_UPLOADS_DISABLED + "\n", status_code=404)

    methods = ["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS", "PUT"]
    return [
        *kept,
        Route(tus_base_path.rstrip("/") or "/", tus_disabled, methods=methods),
        Route(tus_base_path + "{rest:path}", tus_disabled, methods=methods),
    ]


def _refusing_upload_sessions(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def upload(request: Request) -> Response:
        if "x-upload-session-id" in request.headers:
            message = f"{RESUMABLE_UPLOADS_DISABLED}: send the whole file without X-Upload-Session-ID"
            raise ApiError(400, "resumable_uploads_disabled", message)
        return await endpoint(request)

    return upload


def _check(ok: bool, failing: str) -> dict[str, object]:
    return {"ok": ok, "detail": "ok" if ok else failing}


def _check_reason(reason: str | None) -> dict[str, object]:
    return {"ok": reason is None, "detail": reason or "ok"}


async def _clamd_down(scanner: ClamdScanner) -> str | None:
    try:
        await scanner.ping()
    except Exception as exc:  # any failure to answer PING means not ready; the reason goes in the detail
        return f"clamd does not answer: {exc}"
    return None


def _staging_check(root: Path, min_free_mb: int) -> dict[str, object]:
    if not _writable(root):
        return {"ok": False, "detail": f"staging directory {root} is not writable"}
    free_mb = shutil.disk_usage(root).free >> 20
    if free_mb < min_free_mb:
        return {"ok": False, "detail": f"{free_mb} MiB free, below STAGING_MIN_FREE_MB={min_free_mb}"}
    return {"ok": True, "detail": f"{free_mb} MiB free"}


def _writable(path: Path) -> bool:
    probe = path / ".ready-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True
