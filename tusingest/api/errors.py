"""The one place where /api refusals become answers: ``ApiError`` (a code, a status, a message, as
``{"error": code, "message": ...}``) and the Starlette ``exception_handlers`` app.py registers, so an
/api handler raises and never builds an error response itself.

What reaches here from below keeps its own code: a domain ``Refused`` (finalise/refusals.py) and
a finaliser refusal met on the tus path (``UploadRefused``) carry it as an attribute; nothing is
read back out of a header.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from tusingest.api.models import ErrorBody, dump
from tusingest.api.multipart import MultipartError, TruncatedBody
from tusingest.finalise.refusals import Refused
from tusingest.sessions.locks import LockTimeout
from tusingest.sessions.store import StoreError
from tusingest.staging import StagingUnavailable
from tusingest.tus.body import BodyPace, BodyTooSlow
from tusingest.tus.errors import TusError, UploadGone, UploadNotFound

BUSY = "another request is writing to this upload session; retry shortly"
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody is listening, so nothing is said


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return dump(ErrorBody(error=self.code, message=self.message, **self.extra))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)

    @classmethod
    def refused(cls, refusal: Refused) -> ApiError:
        return cls(refusal.status, refusal.code, refusal.message)

    @classmethod
    def from_tus(cls, problem: TusError) -> ApiError:
        """A protocol error met on the way (a refused type, a session that went away), in the facade's words."""
        if isinstance(problem, UploadNotFound):
            return cls(404, "session_not_found", "the upload session no longer exists")
        if isinstance(problem, UploadGone):
            return cls(409, "session_not_active", problem.message)
        return cls(problem.status, problem.code, problem.message)


Handler = Callable[[Request, Exception], Awaitable[Response]]


def api_exception_handlers(pace: BodyPace) -> dict[Any, Handler]:
    """Every exception an /api handler lets out, by type (Starlette picks the most specific)."""

    def answer(convert: Callable[[Any], ApiError]) -> Handler:
        async def handle(request: Request, exc: Exception) -> Response:
            return convert(exc).response()

        return handle

    async def closed(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # what arrived is committed (or dropped)

    too_slow = f"the body arrived too slowly ({pace.describe()}); a resumable session keeps what arrived"
    return {
        ApiError: answer(lambda error: error),
        Refused: answer(ApiError.refused),
        TusError: answer(ApiError.from_tus),
        TruncatedBody: answer(lambda exc: ApiError(400, "truncated_body", f"{exc}; nothing was kept")),
        MultipartError: answer(lambda exc: ApiError(400, "invalid_request", str(exc))),
        BodyTooSlow: answer(lambda exc: ApiError(408, "body_too_slow", too_slow)),
        ClientDisconnect: closed,
        LockTimeout: answer(lambda exc: ApiError(409, "session_busy", BUSY)),
        StagingUnavailable: answer(
            lambda exc: ApiError(
                503, "staging_unavailable", "staging is unavailable; retry shortly", headers={"Retry-After": "5"}
            )
        ),
        # Was a 500 from Starlette: the store being down is not a bug, and the client may retry.
        StoreError: answer(
            lambda exc: ApiError(
                503, "store_unavailable", "the store is unavailable; retry shortly", headers={"Retry-After": "5"}
            )
        ),
    }
