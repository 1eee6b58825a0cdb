"""GET /api/files/upload/session/{session_id}: where an upload stands, for tus and facade uploads
alike (the session id is the last path segment of the tus URL); and ``.../events``, the same as it
changes, as Server-Sent Events fed by the progress bus (sessions/progress.py).

The stream: first where the upload stands (``progress``, ``status``), then a ``progress`` per
committed offset, a ``status`` when the status changes and a ``stage`` per finalisation step, and
last ``registered`` (the file) or ``failed`` (the error), after which it ends. A quiet stream gets a
``: ping`` comment every heartbeat. A reconnecting client is sent the current state again, so it
needs no ``Last-Event-ID`` (progress events carry the offset as their id; nothing is replayed).

Starlette's ``StreamingResponse`` carries it (it ends the stream when the client disconnects), not
sse-starlette: that one keeps process-wide shutdown state tied to uvicorn and runs a watcher task
per loop, and what it would add here is the event format and the ping, a few lines below.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tusingest.api import models
from tusingest.api.errors import ApiError
from tusingest.api.openapi import ApiRoute, Operation, path_parameter
from tusingest.finalise.upload import UploadSagas, file_json
from tusingest.sessions import SessionStore, Upload, UploadState
from tusingest.sessions.model import is_upload_id, utc_iso
from tusingest.sessions.progress import RESYNC, ProgressBus, ProgressEvent
from tusingest.tus.base import requester_of

SESSION_ID = path_parameter(
    "session_id",
    {"type": "string", "pattern": models.SESSION_ID_PATTERN},
    "the upload's id: the last path segment of its tus URL, or X-Upload-Session-ID",
)
GET_SESSION = Operation(
    "getUploadSession",
    "uploads",
    "Where an upload session (tus or facade) stands",
    parameters=[SESSION_ID],
    responses={200: ("the session", models.SessionStatus)},
    errors={404: "session_not_found"},
)
EVENT_STREAM = "text/event-stream"
GET_SESSION_EVENTS = Operation(
    "streamUploadSessionEvents",
    "uploads",
    "Live progress of an upload session, as Server-Sent Events",
    parameters=[SESSION_ID],
    responses={
        200: (
            "Server-Sent Events until the upload settles: `progress` (ProgressData) per committed offset, "
            "`status` (StatusData) when it changes, `stage` (StageData) per finalisation step, then "
            "`registered` (FileInfo) or `failed` (ErrorDetail), and the stream ends. It starts with the "
            "current state (a settled upload: its final event at once); `: ping` comments keep it open.",
            None,
        )
    },
    errors={404: "session_not_found"},
    streamed={200: EVENT_STREAM},
    extra_models=(models.ProgressData, models.StatusData, models.StageData, models.FileInfo, models.ErrorDetail),
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
        upload = await self.owned(request)
        return JSONResponse(models.dump(models.SessionStatus.model_validate(await self.describe(upload))))

    async def owned(self, request: Request) -> Upload:
        """The upload the request's ``session_id`` names, if it is the requester's (or they are an admin)."""
        session_id = request.path_params["session_id"]
        upload = await self.store.get(session_id) if is_upload_id(session_id) else None
        # Somebody else's session is not found either, so session ids cannot be probed (invariant 7).
        if upload is None or not requester_of(request).may_touch(upload):
            raise ApiError(404, "session_not_found", f"no upload session {session_id}")
        return upload

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


class SessionEvents:
    """GET /api/files/upload/session/{session_id}/events: see the module docstring."""

    def __init__(self, status: SessionStatus, bus: ProgressBus, *, heartbeat: float = 15.0) -> None:
        self.status = status
        self.bus = bus
        self.heartbeat = heartbeat

    def routes(self) -> list[Route]:
        return [ApiRoute("/api/files/upload/session/{session_id}/events", self.get, "GET", GET_SESSION_EVENTS)]

    async def get(self, request: Request) -> StreamingResponse:
        upload = await self.status.owned(request)  # refused before the stream starts: a plain JSON 404
        # Starlette stops the stream (and so its subscription) when the client disconnects.
        return StreamingResponse(
            _ProgressStream(self, upload.id).events(),
            media_type=EVENT_STREAM,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no proxy buffering (nginx)
        )


class _ProgressStream:
    """One client's stream: what it was told so far, so each step is sent once and in order."""

    def __init__(self, route: SessionEvents, upload_id: str) -> None:
        self.route = route
        self.upload_id = upload_id
        self.offset = -1
        self.status: str | None = None
        self.ended = False

    async def events(self) -> AsyncIterator[str]:
        # Subscribed before the state is read: a step committed in between is queued, not lost.
        with self.route.bus.subscribe(self.upload_id) as queue:
            for chunk in await self._state():
                yield chunk
            while not self.ended:
                try:
                    async with asyncio.timeout(self.route.heartbeat):
                        event = await queue.get()
                except TimeoutError:
                    yield ": ping\n\n"
                    continue
                if self.route.bus.closing:
                    return  # the node shuts down: the client's reconnect reaches another
                for chunk in await self._step(event):
                    yield chunk

    async def _step(self, event: ProgressEvent | None) -> list[str]:
        if event is RESYNC or event.state is not None:  # events may be lost, or the upload ended: look again
            return await self._state()
        if event.offset is not None:
            return self._progress(event.offset, event.length)
        if event.stage is None:
            return []
        stage = _sse("stage", models.StageData(session_id=self.upload_id, stage=event.stage))  # type: ignore[arg-type]
        if event.stage == "failed" and event.error is not None:
            failed = models.ErrorDetail(error=event.error, message=event.message or "the file was not stored")
            return [stage, *self._status("failed"), self._end("failed", failed)]
        if event.stage in ("registered", "failed"):
            return [stage, *await self._state()]
        return [stage]

    async def _state(self) -> list[str]:
        """Where the upload stands now, as far as this client has not been told; its end if it settled."""
        status = self.route.status
        upload = await status.store.get(self.upload_id)
        if upload is None:  # deleted meanwhile (expired uploads are purged)
            gone = models.ErrorDetail(error="session_not_found", message=f"no upload session {self.upload_id}")
            return [*self._status("failed"), self._end("failed", gone)]
        described = await status.describe(upload)
        chunks = self._progress(described["bytes_uploaded"], described["bytes_total"], first=self.offset < 0)
        chunks += self._status(described["status"])
        if described["status"] == "completed" and described["file"] is not None:
            chunks.append(self._end("registered", models.FileInfo.model_validate(described["file"])))
        elif described["status"] == "failed" and described["error"] is not None:
            chunks.append(self._end("failed", models.ErrorDetail.model_validate(described["error"])))
        return chunks

    def _progress(self, offset: int, length: int | None, *, first: bool = False) -> list[str]:
        if offset <= self.offset and not first:
            return []  # told already (a step read with the state, then heard from the bus)
        self.offset = offset
        data = models.ProgressData(session_id=self.upload_id, bytes_uploaded=offset, bytes_total=length)
        chunks = [_sse("progress", data, event_id=str(offset))]
        if length is not None and offset == length and self.status == "in_progress":
            chunks += self._status("finalizing")  # what the status route says from now on
        return chunks

    def _status(self, status: str) -> list[str]:
        if status == self.status:
            return []
        self.status = status
        return [_sse("status", models.StatusData(session_id=self.upload_id, status=status))]  # type: ignore[arg-type]

    def _end(self, event: str, data: BaseModel) -> str:
        self.ended = True
        return _sse(event, data)


def _sse(event: str, data: BaseModel, *, event_id: str | None = None) -> str:
    """One Server-Sent Event; its data is the model's JSON on one line."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return f"{head}data: {json.dumps(models.dump(data), separators=(',', ':'))}\n\n"
