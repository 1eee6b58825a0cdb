"""The tus endpoint: routes, the checks every request passes, dispatch to one handler per
method, and the one place where protocol errors become responses."""

from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tusingest.observability.metrics import Metrics
from tusingest.sessions import SessionStore
from tusingest.sessions.locks import Locker, LockTimeout
from tusingest.sessions.model import is_upload_id
from tusingest.sessions.store import StoreError
from tusingest.staging import Staging, StagingError, StagingUnavailable
from tusingest.tus.base import PlainHooks, TusContext, TusOptions, UploadHooks, tus_headers
from tusingest.tus.delete import DeleteHandler
from tusingest.tus.errors import (
    BadRequest,
    MethodNotAllowed,
    ServerError,
    ServiceUnavailable,
    TusError,
    UploadLocked,
    UploadNotFound,
    UploadProblem,
    VersionNotSupported,
)
from tusingest.tus.get import GetHandler
from tusingest.tus.head import HeadHandler
from tusingest.tus.headers import TUS_VERSION
from tusingest.tus.ietf import IetfDraft, uses_ietf_draft
from tusingest.tus.options import OptionsHandler
from tusingest.tus.patch import PatchHandler
from tusingest.tus.post import PostHandler

__all__ = ["PlainHooks", "TusOptions", "TusServer", "UploadHooks"]

log = logging.getLogger(__name__)

_OVERRIDABLE = frozenset({"PATCH", "DELETE", "HEAD"})
# Every method reaches _dispatch, so even a 405 carries the tus headers.
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class TusServer:
    def __init__(
        self,
        options: TusOptions,
        store: SessionStore,
        staging: Staging,
        locker: Locker,
        hooks: UploadHooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.ctx = TusContext(options, store, staging, locker, hooks or PlainHooks(store), metrics or Metrics())
        self.options_handler = OptionsHandler(self.ctx)
        self.post = PostHandler(self.ctx)
        self.head = HeadHandler(self.ctx)
        self.patch = PatchHandler(self.ctx)
        self.delete = DeleteHandler(self.ctx)
        self.get = GetHandler(self.ctx)
        self.ietf = IetfDraft(self.ctx, self.options_handler)

    def routes(self) -> list[BaseRoute]:
        base = self.ctx.options.base_path  # always ends with "/"
        return [
            Route(base, self.collection, methods=_ALL_METHODS),
            Route(base.rstrip("/") or "/", self.collection, methods=_ALL_METHODS),
            Route(base + "{upload_id}", self.resource, methods=_ALL_METHODS),
        ]

    async def collection(self, request: Request) -> Response:
        return await self._dispatch(request, None)

    async def resource(self, request: Request) -> Response:
        return await self._dispatch(request, request.path_params["upload_id"])

    async def _dispatch(self, request: Request, upload_id: str | None) -> Response:
        try:
            method = self._method(request)
            if upload_id is not None and method != "OPTIONS" and not is_upload_id(upload_id):
                raise UploadNotFound()  # no upload has such an id: the store is not asked
            if method == "GET" and upload_id is not None:  # a download, in either protocol: not a tus request
                return await self.get.handle(request, upload_id)
            if uses_ietf_draft(request):  # the IETF resumable-upload draft needs no Tus-Resumable
                return await self.ietf.handle(request, method, upload_id)
            if method == "OPTIONS":
                return await self.options_handler.handle(request, upload_id)
            if request.headers.get("tus-resumable") != TUS_VERSION:
                raise VersionNotSupported(headers={"Tus-Version": TUS_VERSION})
            if upload_id is None:
                if method == "POST":
                    return await self.post.handle(request)
                raise MethodNotAllowed(headers={"Allow": "POST, OPTIONS"})
            if method == "HEAD":
                return await self.head.handle(request, upload_id)
            if method == "PATCH":
                return await self.patch.handle(request, upload_id)
            if method == "DELETE":
                return await self.delete.handle(request, upload_id)
            raise MethodNotAllowed(headers={"Allow": "GET, HEAD, PATCH, DELETE, OPTIONS"})
        except TusError as error:
            return self.error_response(error)
        except LockTimeout:
            self.ctx.metrics.lock_timeouts.inc()
            retry = str(max(1, round(self.ctx.options.lock_timeout)))
            return self.error_response(UploadLocked(headers={"Retry-After": retry}))
        except StagingUnavailable as exc:
            log.warning("staging unavailable for upload %s: %s", upload_id, exc)
            return self.error_response(
                ServiceUnavailable("staging is unavailable; retry shortly", headers={"Retry-After": "5"})
            )
        except StagingError as exc:
            log.error("staging failed for upload %s: %s", upload_id, exc)
            return self.error_response(ServerError("the upload's staged data cannot be used"))
        except StoreError as exc:
            log.error("session store failed for upload %s: %s", upload_id, exc)
            return self.error_response(ServiceUnavailable("the session store is unavailable; retry shortly"))
        except Exception:
            # Still a tus answer (Tus-Resumable, CORS headers) so clients see a clean 500 and retry.
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return self.error_response(ServerError())

    @staticmethod
    def _method(request: Request) -> str:
        method = request.method
        override = request.headers.get("x-http-method-override")
        if method == "POST" and override is not None:
            override = override.strip().upper()
            if override not in _OVERRIDABLE:
                raise BadRequest("X-HTTP-Method-Override must be PATCH, DELETE or HEAD")
            return override
        return method

    @staticmethod
    def error_response(error: TusError) -> Response:
        headers = tus_headers() | error.headers
        if isinstance(error, UploadProblem):  # RFC 9457, as the IETF draft asks
            return Response(json.dumps(error.document()), error.status, headers, media_type="application/problem+json")
        return Response(error.message + "\n", status_code=error.status, headers=headers, media_type="text/plain")
