"""POST /api/files/upload and POST /api/files/batch/upload: uploads for services that do not speak tus.

A file part is the body of the one append operation the tus endpoint uses (``tus.append``: lock,
offset check inside the lock, staging, fsync, offset commit, completion), then the same saga
makes it a file. With ``X-Upload-Session-ID`` a body may stop half way and a later request
continues the session from its offset. This module keeps only the form and the JSON answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tusingest.api import models
from tusingest.api.errors import CLIENT_CLOSED, ApiError
from tusingest.api.jsonbody import JsonRefused, loads_bounded
from tusingest.api.multipart import (
    MAX_FIELD_BYTES,
    Event,
    Field,
    FileData,
    FileEnd,
    FileStart,
    MultipartError,
    TruncatedBody,
    boundary_of,
    multipart_events,
)
from tusingest.api.openapi import ApiRoute, Operation, header_parameter
from tusingest.finalise.upload import UploadOutcome, UploadSagas, file_json
from tusingest.sessions import Upload, UploadState
from tusingest.sessions.audit import Action, AuditEvent
from tusingest.sessions.model import UPLOAD_ID_RULE, is_upload_id, new_upload_id, utcnow
from tusingest.tus.append import Appended, AppendRules, NoBody, UploadExists, append, create
from tusingest.tus.base import Requester, TusContext, requester_of
from tusingest.tus.body import BodyEnd, BodyTooSlow, body_chunks
from tusingest.tus.errors import TusError, UploadRefused
from tusingest.tus.headers import non_negative_integer

log = logging.getLogger(__name__)

CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
METADATA_DEPTH = 8  # flat key/value pairs; a value may hold a little structure, never a deep one

UPLOAD = Operation(
    "uploadFile",
    "uploads",
    "Upload one file in one request, or one chunk of a resumable session",
    parameters=[
        header_parameter(
            "X-Upload-Session-ID",
            {"type": "string", "pattern": models.SESSION_ID_PATTERN},
            "names a resumable session, or continues it",
        ),
        header_parameter(
            "Content-Range",
            {"type": "string", "pattern": models.CONTENT_RANGE_PATTERN},
            "bytes <start>-<end>/<total> (total * when not known yet): where this chunk sits",
        ),
    ],
    request=models.UploadForm,
    media_type="multipart/form-data",
    encoding={"file": "application/octet-stream"},
    responses={
        201: ("stored and verified", models.UploadResult),
        202: ("a resumable session that still expects bytes, or a file still being stored", models.UploadProgress),
    },
    errors={
        400: "invalid_request, invalid_metadata, invalid_session_id, invalid_content_range or truncated_body",
        408: "body_too_slow",
        409: (
            "offset_mismatch (the chunk does not start where the session stands; see bytes_uploaded), "
            "length_mismatch, session_not_active or session_busy"
        ),
        413: "file_too_large",
        415: "mime_type_not_allowed",
        422: "refused after receipt: virus_detected, checksum_mismatch, ...",
        503: "no Storage Element can take the file now",
    },
)
BATCH = Operation(
    "uploadBatch",
    "uploads",
    "Upload several files in one request; each succeeds or fails on its own",
    request=models.BatchUploadForm,
    media_type="multipart/form-data",
    encoding={"files": "application/octet-stream"},
    responses={207: ("one result per file", models.BatchResult)},
    errors={
        400: "invalid request",
        408: "body_too_slow",
        413: "too_many_files or batch_too_large",
        503: "no Storage Element can take files now",
    },
)


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


class FileTooLarge(ApiError):
    """A file part longer than its upload may be: in a batch, only that file fails."""


class FilePart:
    """A file part of a form as the ``Body`` of an append: its bytes until the part ends, and how
    the request body ended if it broke off first (``truncated``: the form stopped before its
    closing boundary, a disconnect in all but name)."""

    def __init__(self, events: AsyncIterator[Event]) -> None:
        self.events = events
        self.end = BodyEnd.COMPLETE
        self.finished = False  # the part's end was read
        self.truncated = False

    async def chunks(self) -> AsyncGenerator[bytes]:
        try:
            async for event in self.events:
                if isinstance(event, FileEnd):
                    self.finished = True
                    return
                if isinstance(event, FileData):
                    yield event.data
        except TruncatedBody:
            self.end, self.truncated = BodyEnd.DISCONNECTED, True
        except BodyTooSlow:
            self.end = BodyEnd.TOO_SLOW
        except ClientDisconnect:
            self.end = BodyEnd.DISCONNECTED

    async def skip(self) -> int:
        """Read the rest of the part and throw it away; how many bytes that was."""
        skipped = 0
        async for chunk in self.chunks():
            skipped += len(chunk)
        return skipped


class FacadeRules(AppendRules):
    """The facade's side of the one append operation: its JSON errors, and what the end of a
    file part means.

    Late form fields: ``curl -F file=@report.pdf -F 'metadata=...'`` sends the metadata *after*
    the file. The file part is staged first and the session's row is written only once the form
    has ended (``create`` writes the row after the body), so fields after the file are applied
    to a new upload like fields before it. Refusing them with a 400 would be honest too, but
    would break the README's own example and every client that orders its form that way.
    ``offset`` and ``total_size`` place the bytes, so they must come before the file part. On a
    session that exists already, fields change nothing (its metadata was set at its creation).
    """

    def __init__(
        self,
        facade: FacadeUploads,
        start: FileStart,
        options: FormOptions,
        part: FilePart,
        *,
        offset: int | None,
        total: int | None,
        resumable: bool,
        batch: bool = False,
    ) -> None:
        super().__init__(offset, completes=not resumable)
        self.facade = facade
        self.start = start
        self.options = options
        self.part = part
        self.total = total
        self.resumable = resumable
        self.batch = batch  # a batch's files are completed once the whole form has arrived

    async def admit(self, ctx: TusContext, upload: Upload) -> Upload:
        # A COMPLETE session holds every byte (a request cut after its last byte, or a retry after
        # the answer was lost): an empty part at its end asks for the result, and gets it.
        if upload.state not in (UploadState.ACTIVE, UploadState.COMPLETE):
            raise ApiError(409, "session_not_active", f"the upload session is {upload.state.value}")
        if self.total is not None and upload.length is not None and self.total != upload.length:
            raise ApiError(409, "length_mismatch", f"the session's total size is {upload.length}, not {self.total}")
        if self.total is not None and upload.length is None:
            upload = await ctx.store.set_length(upload.id, self.total) or upload
        return upload

    def offset_mismatch(self, upload: Upload) -> Exception:
        return ApiError(
            409,
            "offset_mismatch",
            f"the session is at byte {upload.offset}, the request starts at {self.offset}",
            bytes_uploaded=upload.offset,
        )

    def too_large(self, room: int) -> Exception:
        return FileTooLarge(413, "file_too_large", f"the file runs past the upload's length ({room} bytes left)")

    def cut_short(self, upload: Upload, end: BodyEnd) -> Exception | None:
        if end is BodyEnd.INTERRUPTED:
            message = "another request took this upload session over before a byte of this one was kept"
            return ApiError(409, "session_busy", message, bytes_uploaded=upload.offset)
        return None  # a disconnect or a slow body is answered from how the part ended

    async def settle(self, ctx: TusContext, upload: Upload, end: BodyEnd, *, new: bool) -> Upload:
        if end is BodyEnd.COMPLETE and self.part.finished and not self.batch:
            await self._rest_of_form(new=new)
        if not new:
            return upload
        if not self.resumable and (end is not BodyEnd.COMPLETE or self.part.truncated):
            raise _cut(end, self.part)  # nobody can resume an upload whose id they never got: keep nothing
        upload = upload.evolve(metadata=await self.facade.metadata(self.start, self.options))
        if not self.resumable and not self.batch and upload.length is None:
            upload = upload.evolve(length=upload.offset)  # a one-shot upload: its length is what arrived
        return upload

    def hand_on(self) -> bool:
        # A body that never ended is not finalised from: its bytes stay, the client resumes.
        return not self.part.truncated

    async def _rest_of_form(self, *, new: bool) -> None:
        """Read the form to its end: late fields (applied to a new upload), its closing boundary."""
        try:
            async for event in self.part.events:
                if isinstance(event, FileStart):
                    raise ApiError(400, "invalid_request", "send one part named file (use /api/files/batch/upload)")
                if isinstance(event, Field) and new:
                    if event.name in ("offset", "total_size"):
                        raise ApiError(400, "invalid_request", f"{event.name} must come before the file part")
                    self.options.take(event)
        except TruncatedBody:
            self.part.truncated = True
        except BodyTooSlow:
            self.part.end = BodyEnd.TOO_SLOW
        except ClientDisconnect:
            self.part.end = BodyEnd.DISCONNECTED


class ClosingRules(AppendRules):
    """An empty append that ends an upload of open length where it stands (a batch's files,
    once the whole form has arrived): its completion then runs like any other."""

    def __init__(self) -> None:
        super().__init__(inspect=False)

    async def settle(self, ctx: TusContext, upload: Upload, end: BodyEnd, *, new: bool) -> Upload:
        if upload.length is not None:
            return upload
        return await ctx.store.set_length(upload.id, upload.offset) or upload


def _cut(end: BodyEnd, part: FilePart) -> Exception:
    """What a one-shot upload whose body broke off answers (nothing of it is kept)."""
    if part.truncated:
        return TruncatedBody("the body ended before the closing boundary of the form")
    if end is BodyEnd.TOO_SLOW:
        return BodyTooSlow()
    if end is BodyEnd.INTERRUPTED:
        return ApiError(503, "interrupted", "the server is shutting down; nothing was kept: send the file again")
    return ClientDisconnect()


@dataclass(frozen=True, slots=True)
class FacadeSettings:
    """What the REST facade needs of the configuration; built in app.py."""

    max_file_size: int
    finalise_wait_seconds: float
    max_batch_bytes: int
    max_batch_files: int
    batch_parallelism: int


class FacadeUploads:
    """The facade keeps only the form and its JSON answers; every byte goes through the one
    append operation (``tus.append``) of the tus endpoint's ``TusContext``."""

    def __init__(self, settings: FacadeSettings, ctx: TusContext, sagas: UploadSagas) -> None:
        self.settings = settings
        self.ctx = ctx
        self.pace = ctx.options.body_pace  # a body slower than this is cut off like a disconnect
        self.sagas = sagas

    def routes(self) -> list[Route]:
        return [
            ApiRoute("/api/files/upload", self.upload, "POST", UPLOAD),
            ApiRoute("/api/files/batch/upload", self.batch, "POST", BATCH),
        ]

    # -- one file, possibly resumable --------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        """Refusals are raised, and answered by api/errors.py."""
        session_id = request.headers.get("x-upload-session-id")
        if session_id is not None and not is_upload_id(session_id):
            raise ApiError(400, "invalid_session_id", f"X-Upload-Session-ID must be {UPLOAD_ID_RULE}")
        content_range = _content_range(request.headers.get("content-range"))
        boundary = boundary_of(request.headers.get("content-type"))
        options = FormOptions()
        events = multipart_events(body_chunks(request.receive, self.pace), boundary)
        try:
            start = await _file_start(events, options, "file")
            if start is None:
                raise ApiError(400, "invalid_request", "the form has no file part named file")
            offset = content_range[0] if content_range else options.offset
            total = content_range[1] if content_range else options.total_size
            part = FilePart(events)
            rules = FacadeRules(
                self, start, options, part, offset=offset, total=total, resumable=session_id is not None
            )
            appended = await self._receive(start, rules, session_id, requester_of(request))
        finally:
            await events.aclose()
        upload = appended.upload
        if part.end is BodyEnd.TOO_SLOW:
            raise BodyTooSlow()  # a session keeps what arrived
        if part.truncated:
            raise _truncated(upload)  # a session keeps its bytes; the client resumes
        if part.end is BodyEnd.DISCONNECTED:
            return Response(status_code=CLIENT_CLOSED)  # nobody is listening; what arrived is committed
        if upload.state is UploadState.COMPLETE and not part.finished and await part.skip():
            raise ApiError(413, "file_too_large", f"the upload session already holds all its {upload.offset} bytes")
        if not upload.is_complete:
            return JSONResponse(models.dump(_progress(upload)), status_code=202)
        # The lock is released: the saga runs on, a HEAD or a status request answers meanwhile.
        return _outcome_response(upload, await self._outcome(upload))

    async def _receive(
        self, start: FileStart, rules: FacadeRules, session_id: str | None, requester: Requester
    ) -> Appended:
        """The file part into a session: appended to one that exists, else a new upload created
        with it. Two requests may name one new session at once: the loser of the creation appends.
        A session of somebody else's is not found (404, from ``TusContext.load``): nothing is written."""
        if rules.total is not None and rules.total > self.settings.max_file_size:
            raise ApiError(
                413, "file_too_large", f"the file has {rules.total} bytes; the limit is {self.settings.max_file_size}"
            )
        if session_id is not None and await self.ctx.store.get(session_id) is not None:
            return await append(self.ctx, session_id, rules.part, rules, requester)
        upload = await self._new_upload(session_id or new_upload_id(), rules.total, start, rules.options, requester)
        try:
            return await create(self.ctx, upload, rules.part, rules, requester, client_named=session_id is not None)
        except UploadExists:
            return await append(self.ctx, upload.id, rules.part, rules, requester)

    async def _new_upload(
        self, upload_id: str, total: int | None, start: FileStart, options: FormOptions, requester: Requester
    ) -> Upload:
        """An upload not yet stored, its metadata from the fields so far (checked now, so a bad one
        is refused before a byte is read; checked again with the late fields before it is stored)."""
        now = utcnow()
        upload = Upload(
            id=upload_id,
            length=total,
            metadata=await self.metadata(start, options),
            created_at=now,
            updated_at=now,
            expires_at=self.ctx.expires_at(now),
        )
        return requester.owning(upload)

    async def metadata(self, start: FileStart, options: FormOptions) -> str:
        """The Upload-Metadata of a new upload from its form, refused (400) as tus creation refuses it."""
        values: dict[str, str | None] = dict(options.metadata)
        values["filename"] = options.metadata.get("filename") or start.filename or None
        values["retention_policy"] = options.retention_policy or options.metadata.get("retention_policy")
        values["description"] = options.description or options.metadata.get("description")
        if start.content_type:
            values.setdefault("filetype", start.content_type)
        await self._check_creation(values)
        return tus_metadata(values)

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
            await self.ctx.hooks.check_creation(encoded)
        except TusError as refusal:
            raise ApiError(400, "invalid_metadata", refusal.message) from None

    async def _drop(self, upload: Upload) -> None:
        """Forget a batch's file nobody can resume (a failed one keeps its state and reason)."""
        with contextlib.suppress(Exception):
            dropped = AuditEvent.for_owner(Action.UPLOAD_TERMINATED, upload, reason="batch_file_refused")
            await self.ctx.store.set_state(
                upload.id, UploadState.TERMINATED, only_from=UploadState.ACTIVE, audit=dropped
            )
            await self.ctx.staging.remove(upload.id)

    async def _outcome(self, upload: Upload) -> UploadOutcome:
        """The saga's answer for a complete upload, waited for a bounded time after its lock is released."""
        outcome = await self.sagas.wait(upload.id, self.settings.finalise_wait_seconds)
        return outcome or UploadOutcome("finalizing")

    # -- many files in one request --------------------------------------------------------------

    async def batch(self, request: Request) -> Response:
        """Refusals are raised, and answered by api/errors.py."""
        max_bytes = self.settings.max_batch_bytes
        declared = non_negative_integer(request.headers.get("content-length") or "")
        if declared is not None and declared > max_bytes + (1 << 20):
            raise ApiError(
                413, "batch_too_large", f"a batch may carry at most {self.settings.max_batch_bytes >> 20} MiB"
            )
        boundary = boundary_of(request.headers.get("content-type"))
        requester = requester_of(request)
        options = FormOptions()
        staged: list[tuple[str, Upload | ApiError]] = []
        events = multipart_events(body_chunks(request.receive, self.pace), boundary)
        total = 0
        try:
            # Fields apply to the files after them: a batch's files are staged as they arrive.
            while (start := await _file_start(events, options, "files")) is not None:
                if len(staged) >= self.settings.max_batch_files:
                    raise ApiError(
                        413, "too_many_files", f"a batch may carry at most {self.settings.max_batch_files} files"
                    )
                item = await self._stage_file(start, events, options, requester)
                staged.append((start.filename, item))
                total += item.offset if isinstance(item, Upload) else 0
                if total > max_bytes:
                    raise ApiError(
                        413, "batch_too_large", f"a batch may carry at most {self.settings.max_batch_bytes >> 20} MiB"
                    )
        except (ApiError, TusError, MultipartError, ClientDisconnect):
            for _, item in staged:  # a refused batch keeps nothing
                if isinstance(item, Upload):
                    await self._drop(item)
            raise
        finally:
            await events.aclose()
        if not staged:
            raise ApiError(400, "invalid_request", "the form has no file parts")

        limit = asyncio.Semaphore(self.settings.batch_parallelism)

        async def finalise(name: str, item: Upload | ApiError) -> models.BatchFileResult:
            if isinstance(item, ApiError):
                return _failed(name, item.code, item.message)
            async with limit:
                # The whole form arrived: each file ends where it stands and is completed.
                upload = (await append(self.ctx, item.id, NoBody(), ClosingRules(), requester)).upload
                outcome = await self._outcome(upload)
            if outcome.status == "completed" and outcome.file is not None:
                info = file_json(outcome.file)
                return models.BatchFileResult(
                    filename=name,
                    status="success",
                    file_id=info["file_id"],
                    size_bytes=info["size_bytes"],
                    storage_element_id=info["storage_element_id"],
                    sha256_hash=info["sha256_hash"],
                )
            if outcome.refusal is None:  # still finalizing
                return _failed(name, "finalizing", f"still being finalised: see session {item.id}")
            return _failed(name, outcome.refusal.code, outcome.refusal.message)

        results = await asyncio.gather(*(finalise(name, item) for name, item in staged))
        succeeded = sum(1 for result in results if result.status == "success")
        summary = models.BatchSummary(total=len(results), succeeded=succeeded, failed=len(results) - succeeded)
        return JSONResponse(models.dump(models.BatchResult(results=results, summary=summary)), status_code=207)

    async def _stage_file(
        self, start: FileStart, events: AsyncIterator[Event], options: FormOptions, requester: Requester
    ) -> Upload | ApiError:
        """One file of a batch, staged as an upload of open length; a refused file (too large, a type
        not accepted) is skipped to its end and its refusal returned, so the other files go on."""
        part = FilePart(events)
        rules = FacadeRules(self, start, options, part, offset=None, total=None, resumable=False, batch=True)
        upload = await self._new_upload(new_upload_id(), None, start, options, requester)
        try:
            return (await create(self.ctx, upload, part, rules, requester)).upload
        except (FileTooLarge, UploadRefused) as refused:
            if not part.finished:
                await part.skip()
            return refused if isinstance(refused, ApiError) else ApiError.from_tus(refused)


async def _file_start(events: AsyncIterator[Event], options: FormOptions, name: str) -> FileStart | None:
    """The next file part, the fields before it taken into ``options``; None at the form's end.
    A file part under another name is refused: it would be silently left out otherwise."""
    async for event in events:
        if isinstance(event, Field):
            options.take(event)
        elif isinstance(event, FileStart):
            if event.name != name:
                raise ApiError(
                    400, "invalid_request", f"the file part is named {event.name!r}; it must be named {name!r}"
                )
            return event
    return None


def _truncated(upload: Upload) -> ApiError:
    return ApiError(
        400,
        "truncated_body",
        f"the body ended before the form's closing boundary; the session holds {upload.offset} bytes: resume there",
        upload_session_id=upload.id,
        bytes_uploaded=upload.offset,
    )


def _failed(name: str, code: str, message: str) -> models.BatchFileResult:
    return models.BatchFileResult(filename=name, status="failed", error=models.ErrorDetail(error=code, message=message))


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


def _progress(upload: Upload, **finalizing: Any) -> models.UploadProgress:
    total = upload.length
    percent = round(100 * upload.offset / total, 2) if total else 0.0
    return models.UploadProgress(
        upload_session_id=upload.id,
        bytes_uploaded=upload.offset,
        bytes_total=total,
        percent_complete=percent,
        **finalizing,
    )


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
        return JSONResponse(models.dump(models.UploadResult.model_validate({key: info[key] for key in keys})), 201)
    if outcome.refusal is None:  # still finalizing
        return JSONResponse(models.dump(_progress(upload, status="finalizing")), status_code=202)
    return ApiError.refused(outcome.refusal).response()
