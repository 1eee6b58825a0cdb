"""GET /api/files/upload/session/{session_id}: where an upload stands, for tus and facade uploads
alike (the session id is the last path segment of the tus URL)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tusingest.api import models
from tusingest.api.errors import ApiError
from tusingest.api.openapi import ApiRoute, Operation, path_parameter
from tusingest.finalise.upload import UploadSagas, file_json
from tusingest.sessions import SessionStore, Upload, UploadState
from tusingest.sessions.model import is_upload_id, utc_iso
from tusingest.tus.base import requester_of

GET_SESSION = Operation(
    "getUploadSession",
    "uploads",
    "Where an upload session (tus or facade) stands",
    parameters=[
        path_parameter(
            "session_id",
            {"type": "string", "pattern": models.SESSION_ID_PATTERN},
            "the upload's id: the last path segment of its tus URL, or X-Upload-Session-ID",
        )
    ],
    responses={200: ("the session", models.SessionStatus)},
    errors={404: "session_not_found"},
)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else utc_iso(value)


class SessionStatus:
    def __init__(self, store: SessionStore, sagas: UploadSagas) -> None:
        self.store = store
        self.sagas = sagas

    def routes(self) -> list[Route]:
        return [ApiRoute("/api/files/upload/session/{session_id}", self.get, "GET", GET_SESSION)]

    async def get(self, request: Request) -> JSONResponse:
        session_id = request.path_params["session_id"]
        upload = await self.store.get(session_id) if is_upload_id(session_id) else None
        # Somebody else's session is not found either, so session ids cannot be probed (invariant 7).
        if upload is None or not requester_of(request).may_touch(upload):
            raise ApiError(404, "session_not_found", f"no upload session {session_id}")
        return JSONResponse(models.dump(models.SessionStatus.model_validate(await self.describe(upload))))

    async def describe(self, upload: Upload) -> dict[str, Any]:
        body: dict[str, Any] = {
            "session_id": upload.id,
            "status": "in_progress",
            "bytes_uploaded": upload.offset,
            "bytes_total": upload.length,
            "created_at": _iso(upload.created_at),
            "last_activity_at": _iso(upload.updated_at),
            "expires_at": _iso(upload.expires_at),
            "file": None,
            "error": None,
        }
        if upload.state in (UploadState.TERMINATED, UploadState.EXPIRED, UploadState.INVALID):
            body["status"] = "failed"
            body["error"] = {"error": f"upload_{upload.state.value}", "message": f"the upload was {upload.state.value}"}
            return body
        outcome = await self.sagas.outcome(upload.id)
        if outcome is None:
            if upload.state is UploadState.COMPLETE:
                body["status"] = "finalizing"
            return body
        body["status"] = outcome.status
        if outcome.file is not None:
            body["file"] = file_json(outcome.file)
        if outcome.refusal is not None:
            body["error"] = {"error": outcome.refusal.code, "message": outcome.refusal.message}
        return body
