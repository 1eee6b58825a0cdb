"""POST /api/files/upload and POST /api/files/batch/upload: uploads for services that do not speak tus.

A file part streams into an upload session exactly as a tus PATCH would (staging, fsync, offset
commit), then the same finaliser and saga make it a file. With ``X-Upload-Session-ID`` a body
may stop half way and a later request continues the session from its offset.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tusingest.api.jsonbody import JsonRefused, loads_bounded
from tusingest.api.multipart import (
    MAX_FIELD_BYTES,
    Field,
    FileData,
    FileEnd,
    FileStart,
    MultipartError,
    TruncatedBody,
    boundary_of,
    multipart_events,
)
from tusingest.api.sessions import error
from tusingest.config import Settings
from tusingest.finalise.mime import HEAD_BYTES
from tusingest.finalise.upload import UploadOutcome, UploadSagas, file_json
from tusingest.sessions import SessionStore, Upload, UploadState
from tusingest.sessions.locks import Locker, LockTimeout
from tusingest.sessions.model import UPLOAD_ID_RULE, is_upload_id, new_upload_id, utcnow
from tusingest.staging import ChunkWriter, DirectoryStaging
from tusingest.tus.base import UploadHooks
from tusingest.tus.body import BodyPace, BodyTooSlow, body_chunks
from tusingest.tus.errors import TusError
from tusingest.tus.headers import non_negative_integer

log = logging.getLogger(__name__)

CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
METADATA_DEPTH = 8  # flat key/value pairs; a value may hold a little structure, never a deep one


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.code, "message": self.message, **self.extra}, status_code=self.status)


@dataclass(slots=True)
class FormOptions:
    metadata: dict[str, str] = field(default_factory=dict)
    retention_policy: str | None = None
    description: str | None = None
    offset: int | None = None
    total_size: int | None = None

    def take(self, form_field: Field) -> None:
        name, value = form_field.name, form_field.value
        if name == "metadata":
            self.metadata = _metadata_json(value)
        elif name == "retention_policy":
            if value not in ("temporary", "permanent"):
                raise ApiError(400, "invalid_request", "retention_policy must be temporary or permanent")
            self.retention_policy = value
        elif name == "description":
            self.description = value
        elif name in ("offset", "total_size"):
            number = non_negative_integer(value.strip(" \t\r\n"))
            if number is None:
                raise ApiError(400, "invalid_request", f"{name} must be a non-negative integer of at most 19 digits")
            setattr(self, name, number)


def _metadata_json(value: str) -> dict[str, str]:
    if not value.strip():
        return {}
    try:
        parsed = loads_bounded(value, max_bytes=MAX_FIELD_BYTES, max_depth=METADATA_DEPTH)
    except JsonRefused as refused:
        raise ApiError(400, "invalid_metadata", f"metadata must be a JSON object: {refused}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "invalid_metadata", "metadata must be a JSON object")
    result = {}
    for key, item in parsed.items():
        if not METADATA_KEY.match(str(key)):
            raise ApiError(400, "invalid_metadata", f"metadata key {key!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        result[str(key)] = item if isinstance(item, str) else json.dumps(item)
    return result


def tus_metadata(values: Mapping[str, str | None]) -> str:
    """The Upload-Metadata form the session store keeps (``key base64,...``)."""
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items() if value is not None
    )


@dataclass(frozen=True, slots=True)
class Received:
    """What one file part did to its session."""

    upload: Upload
    complete: bool
    refused: ApiError | None = None


class FacadeUploads:
    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        staging: DirectoryStaging,
        locker: Locker,
        hooks: UploadHooks,
        sagas: UploadSagas,
        pace: BodyPace,
    ) -> None:
        self.settings = settings
        self.pace = pace  # a body slower than this is cut off like a disconnect
        self.store = store
        self.staging = staging
        self.locker = locker
        self.hooks = hooks
        self.sagas = sagas

    def routes(self) -> list[Route]:
        return [
            Route("/api/files/upload", self.upload, methods=["POST"]),
            Route("/api/files/batch/upload", self.batch, methods=["POST"]),
        ]

    # -- one file, possibly resumable --------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        try:
            return await self._upload(request)
        except ApiError as problem:
            return problem.response()
        except TruncatedBody as exc:
            return error(400, "truncated_body", f"{exc}; nothing was kept")
        except MultipartError as exc:
            return error(400, "invalid_request", str(exc))
        except BodyTooSlow:
            return self._too_slow()
        except LockTimeout:
            return error(409, "session_busy", "another request is writing to this upload session; retry shortly")

    async def _upload(self, request: Request) -> Response:
        session_id = request.headers.get("x-upload-session-id")
        if session_id is not None and not is_upload_id(session_id):
            raise ApiError(400, "invalid_session_id", f"X-Upload-Session-ID must be {UPLOAD_ID_RULE}")
        content_range = _content_range(request.headers.get("content-range"))
        boundary = boundary_of(request.headers.get("content-type"))
        options = FormOptions()
        received: Received | None = None
        events = multipart_events(body_chunks(request.receive, self.pace), boundary)
        try:
            async for event in events:
                if isinstance(event, Field):
                    options.take(event)
                elif isinstance(event, FileStart):
                    if received is not None:
                        raise ApiError(400, "invalid_request", "send one part named file (use /api/files/batch/upload)")
                    received = await self._receive(event, events, options, session_id, content_range)
        except BodyTooSlow:
            raise  # answered by upload(); what arrived is committed (or dropped) like a disconnect
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening; what arrived is committed (or dropped)
        except MultipartError as exc:
            # The body broke after its file part: a one-shot upload keeps nothing; a session keeps its
            # bytes but is not finalised from a body that never ended (the client resumes).
            if received is not None and session_id is None:
                await self._drop(received.upload)
            elif received is not None and isinstance(exc, TruncatedBody):
                raise _truncated(received.upload) from None
            raise
        finally:
            await events.aclose()
        if received is None:
            raise ApiError(400, "invalid_request", "the form has no file part named file")
        if received.refused is not None:
            raise received.refused
        if not received.complete:
            return JSONResponse(_progress(received.upload), status_code=202)
        outcome = await self._finalise(received.upload)
        return _outcome_response(received.upload, outcome)

    async def _receive(
        self,
        start: FileStart,
        events: AsyncIterator[Any],
        options: FormOptions,
        session_id: str | None,
        content_range: tuple[int, int | None] | None,
        *,
        stop_on_refusal: bool = True,
    ) -> Received:
        offset = content_range[0] if content_range else options.offset
        total = content_range[1] if content_range else options.total_size
        upload = await self._session(start, options, session_id, total)
        if offset is not None and offset != upload.offset:
            raise ApiError(
                409,
                "offset_mismatch",
                f"the session is at byte {upload.offset}, the request starts at {offset}",
                bytes_uploaded=upload.offset,
            )
        # A COMPLETE session holds every byte (a request cut after its last byte, or a retry after the
        # answer was lost): an empty part at its end asks for the result, and gets it.
        if upload.state not in (UploadState.ACTIVE, UploadState.COMPLETE):
            raise ApiError(409, "session_not_active", f"the upload session is {upload.state.value}")
        resumable = session_id is not None
        try:
            async with self.locker.lock(upload.id, timeout=self.settings.lock_timeout_seconds):
                upload = await self.store.get(upload.id) or upload
                async with await self.staging.open_writer(upload.id, upload.offset) as writer:
                    try:
                        refused = await self._write_part(upload, writer, events, stop_on_refusal=stop_on_refusal)
                    except ClientDisconnect:
                        if resumable:
                            await self._commit(upload, writer)  # keep what arrived: the client resumes from there
                        raise
                    except TruncatedBody as exc:
                        if not resumable:
                            raise ApiError(400, "truncated_body", f"{exc}; nothing was kept") from None
                        # As a disconnect: keep what arrived, never finalise a part that did not end.
                        raise _truncated(await self._commit(upload, writer)) from None
                    if refused is not None:
                        await writer.discard()
                        return Received(upload, False, refused)
                    upload = await self._commit(upload, writer)
        except (ClientDisconnect, ApiError, MultipartError):
            if not resumable:
                await self._drop(upload)  # nobody can resume an upload whose id they never got
            raise
        if upload.length is None and not resumable:
            # A one-shot upload: its length is what arrived.
            upload = await self.store.set_length(upload.id, upload.offset) or upload
        return Received(upload, upload.length is not None and upload.offset == upload.length)

    async def _session(
        self, start: FileStart, options: FormOptions, session_id: str | None, total: int | None
    ) -> Upload:
        if total is not None and total > self.settings.max_file_size:
            raise ApiError(
                413, "file_too_large", f"the file has {total} bytes; the limit is {self.settings.max_file_size}"
            )
        if session_id is not None:
            existing = await self.store.get(session_id)
            if existing is not None:
                if total is not None and existing.length is not None and total != existing.length:
                    raise ApiError(
                        409, "length_mismatch", f"the session's total size is {existing.length}, not {total}"
                    )
                if total is not None and existing.length is None:
                    existing = await self.store.set_length(existing.id, total) or existing
                return existing
        now = utcnow()
        values: dict[str, str | None] = dict(options.metadata)
        values["filename"] = options.metadata.get("filename") or start.filename or None
        values["retention_policy"] = options.retention_policy or options.metadata.get("retention_policy")
        values["description"] = options.description or options.metadata.get("description")
        if start.content_type:
            values.setdefault("filetype", start.content_type)
        await self._check_creation(values)
        upload = Upload(
            id=session_id or new_upload_id(),
            length=total,
            metadata=tus_metadata(values),
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(hours=self.settings.upload_session_ttl_hours),
        )
        await self.store.create(upload)
        return upload

    async def _check_creation(self, values: Mapping[str, str | None]) -> None:
        """The same creation check as tus creation (UploadHooks.check_creation), as a JSON 400."""
        encoded: dict[str, bytes | None] = {}
        for key, value in values.items():
            if value is None:
                continue
            try:
                encoded[key] = value.encode()
            except UnicodeEncodeError:
                # JSON can spell a lone surrogate ("\ud800"); UTF-8 cannot carry it.
                raise ApiError(400, "invalid_metadata", f"the value of {key!r} is not valid Unicode text") from None
        try:
            await self.hooks.check_creation(encoded)
        except TusError as refusal:
            raise ApiError(400, "invalid_metadata", refusal.message) from None

    async def _write_part(
        self, upload: Upload, writer: ChunkWriter, events: AsyncIterator[Any], *, stop_on_refusal: bool
    ) -> ApiError | None:
        """Stream the part's bytes into staging. A refused file raises at once when stop_on_refusal
        (the answer goes out before the rest of the body); else the rest of the part is skipped
        and the refusal returned, so the other files of a batch go on."""
        limit = (upload.length if upload.length is not None else self.settings.max_file_size) - upload.offset
        inspect = self.hooks.head_bytes > 0 and upload.offset == 0
        head = bytearray()
        refused: ApiError | None = None
        async for event in events:
            if isinstance(event, FileEnd):
                break
            if not isinstance(event, FileData) or refused is not None:
                continue  # the rest of a refused part is read and thrown away
            if writer.written + len(event.data) > limit:
                refused = ApiError(413, "file_too_large", f"the file runs past {limit + upload.offset} bytes")
            elif inspect and len(head) < HEAD_BYTES:
                head += event.data[: HEAD_BYTES - len(head)]
                if len(head) >= HEAD_BYTES:
                    refused = await self._inspect(upload, bytes(head))
                    inspect = False
            if refused is not None:
                if stop_on_refusal:
                    await writer.discard()
                    raise refused
                continue
            await writer.write(event.data)
        if refused is None and inspect and head:
            refused = await self._inspect(upload, bytes(head))
        return refused

    async def _inspect(self, upload: Upload, head: bytes) -> ApiError | None:
        try:
            await self.hooks.inspect_start(upload, head)
        except TusError as refusal:
            code = refusal.headers.get("ArtStore-Error", "file_refused")
            return ApiError(refusal.status, code, refusal.message)
        return None

    async def _commit(self, upload: Upload, writer: ChunkWriter) -> Upload:
        new_offset = await writer.sync()
        if new_offset == upload.offset:
            return upload
        now = utcnow()
        expires = now + timedelta(hours=self.settings.upload_session_ttl_hours)
        committed = await self.store.commit_offset(upload.id, upload.offset, new_offset, now, expires)
        if committed is None:
            raise ApiError(409, "session_changed", "the upload session changed while receiving; retry")
        return committed

    async def _drop(self, upload: Upload) -> None:
        """Forget a one-shot upload nobody can resume (a failed one keeps its state and reason)."""
        with contextlib.suppress(Exception):
            await self.store.set_state(upload.id, UploadState.TERMINATED, only_from=UploadState.ACTIVE)
            await self.staging.remove(upload.id)

    async def _finalise(self, upload: Upload) -> UploadOutcome:
        # The commit made it COMPLETE and recorded its completion as owed; the saga pays that debt.
        await self.sagas.begin(upload)
        await self.store.completion_taken_over(upload.id)
        outcome = await self.sagas.wait(upload.id, self.settings.finalise_wait_seconds)
        return outcome or UploadOutcome("finalizing")

    # -- many files in one request --------------------------------------------------------------

    async def batch(self, request: Request) -> Response:
        try:
            return await self._batch(request)
        except ApiError as problem:
            return problem.response()
        except TruncatedBody as exc:
            return error(400, "truncated_body", f"{exc}; nothing was kept")
        except MultipartError as exc:
            return error(400, "invalid_request", str(exc))
        except BodyTooSlow:
            return self._too_slow()

    def _too_slow(self) -> Response:
        message = f"the body arrived too slowly ({self.pace.describe()}); a resumable session keeps what arrived"
        return error(408, "body_too_slow", message)

    async def _batch(self, request: Request) -> Response:
        max_bytes = self.settings.max_batch_size_mb << 20
        declared = non_negative_integer(request.headers.get("content-length") or "")
        if declared is not None and declared > max_bytes + (1 << 20):
            raise ApiError(413, "batch_too_large", f"a batch may carry at most {self.settings.max_batch_size_mb} MiB")
        boundary = boundary_of(request.headers.get("content-type"))
        options = FormOptions()
        staged: list[tuple[str, Received]] = []
        events = multipart_events(body_chunks(request.receive, self.pace), boundary)
        total = 0
        try:
            async for event in events:
                if isinstance(event, Field):
                    options.take(event)
                    continue
                if not isinstance(event, FileStart):
                    continue
                if len(staged) >= self.settings.max_batch_files:
                    raise ApiError(
                        413, "too_many_files", f"a batch may carry at most {self.settings.max_batch_files} files"
                    )
                received = await self._receive(event, events, options, None, None, stop_on_refusal=False)
                staged.append((event.filename, received))
                total += received.upload.offset
                if total > max_bytes:
                    raise ApiError(
                        413, "batch_too_large", f"a batch may carry at most {self.settings.max_batch_size_mb} MiB"
                    )
        except (ApiError, MultipartError, ClientDisconnect):
            for _, received in staged:  # a refused batch keeps nothing
                await self._drop(received.upload)
            raise
        finally:
            await events.aclose()
        if not staged:
            raise ApiError(400, "invalid_request", "the form has no file parts")

        limit = asyncio.Semaphore(self.settings.batch_parallelism)

        async def finalise(name: str, received: Received) -> dict[str, Any]:
            if received.refused is not None:
                await self._drop(received.upload)
                return _failed(name, received.refused.code, received.refused.message)
            async with limit:
                outcome = await self._finalise(received.upload)
            if outcome.status == "completed" and outcome.file is not None:
                info = file_json(outcome.file)
                return {
                    "filename": name,
                    "status": "success",
                    "file_id": info["file_id"],
                    "size_bytes": info["size_bytes"],
                    "storage_element_id": info["storage_element_id"],
                    "sha256_hash": info["sha256_hash"],
                }
            if outcome.status == "finalizing":
                return _failed(name, "finalizing", f"still being finalised: see session {received.upload.id}")
            return _failed(name, outcome.error_code or "failed", outcome.error or "the file was not stored")

        results = await asyncio.gather(*(finalise(name, received) for name, received in staged))
        succeeded = sum(1 for result in results if result["status"] == "success")
        summary = {"total": len(results), "succeeded": succeeded, "failed": len(results) - succeeded}
        return JSONResponse({"results": results, "summary": summary}, status_code=207)


def _truncated(upload: Upload) -> ApiError:
    return ApiError(
        400,
        "truncated_body",
        f"the body ended before the form's closing boundary; the session holds {upload.offset} bytes: resume there",
        upload_session_id=upload.id,
        bytes_uploaded=upload.offset,
    )


def _failed(name: str, code: str, message: str) -> dict[str, Any]:
    return {"filename": name, "status": "failed", "error": {"error": code, "message": message}}


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    if value is None:
        return None
    match = CONTENT_RANGE.fullmatch(value.strip(" \t"))
    if match is None:
        raise ApiError(400, "invalid_content_range", "Content-Range must be bytes <start>-<end>/<total>")
    start, end = _range_number(match[1]), _range_number(match[2])
    total = None if match[3] == "*" else _range_number(match[3])
    if end < start or (total is not None and end >= total):
        raise ApiError(400, "invalid_content_range", "Content-Range end must be >= start and below the total")
    return start, total


def _range_number(text: str) -> int:
    number = non_negative_integer(text)
    if number is None:
        raise ApiError(400, "invalid_content_range", "a Content-Range number has at most 19 digits")
    return number


def _progress(upload: Upload) -> dict[str, Any]:
    total = upload.length
    percent = round(100 * upload.offset / total, 2) if total else 0.0
    return {
        "upload_session_id": upload.id,
        "bytes_uploaded": upload.offset,
        "bytes_total": total,
        "percent_complete": percent,
    }


def _outcome_response(upload: Upload, outcome: UploadOutcome) -> JSONResponse:
    if outcome.status == "completed" and outcome.file is not None:
        info = file_json(outcome.file)
        keys = (
            "file_id",
            "storage_element_id",
            "storage_filename",
            "size_bytes",
            "md5_hash",
            "sha256_hash",
            "uploaded_at",
            "compression",
        )
        return JSONResponse({key: info[key] for key in keys}, status_code=201)
    if outcome.status == "finalizing":
        return JSONResponse(_progress(upload) | {"status": "finalizing"}, status_code=202)
    return JSONResponse(
        {"error": outcome.error_code or "failed", "message": outcome.error or "the file was not stored"},
        status_code=outcome.http_status,
    )
