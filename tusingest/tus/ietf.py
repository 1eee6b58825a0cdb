"""The IETF draft "Resumable Uploads for HTTP" (draft-ietf-httpbis-resumable-upload), interop
version 8, served on the tus endpoint to requests carrying ``Upload-Draft-Interop-Version: 8``.

Same uploads, store, staging, locks and completion path as tus 1.0; only the headers differ.
The draft marks an upload complete explicitly (``Upload-Complete: ?1``); here that fixes the
upload's length at its offset, so ``Upload.is_complete`` and the completion hook work unchanged.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.sessions.model import new_upload_id, utcnow
from tusingest.tus.append import AppendRules, RequestBody, append, create
from tusingest.tus.base import TusContext, requester_of
from tusingest.tus.body import BodyEnd
from tusingest.tus.errors import (
    BadRequest,
    CompletedUpload,
    Forbidden,
    InconsistentUploadLength,
    InterruptedUploadAppend,
    MethodNotAllowed,
    MismatchingUploadOffset,
    TooLarge,
    UnsupportedMediaType,
    UploadGone,
)
from tusingest.tus.headers import non_negative_integer, parse_non_negative
from tusingest.tus.options import OptionsHandler
from tusingest.tus.patch import content_type

INTEROP_VERSION = "8"
PARTIAL_UPLOAD = "application/partial-upload"

_SF_INTEGER_DIGITS = 15  # a Structured Field Integer has at most 15 digits (RFC 9651)


def uses_ietf_draft(request: Request) -> bool:
    """Whether a request speaks the draft (interop version 8) instead of tus 1.0."""
    return request.headers.get("upload-draft-interop-version", "").strip() == INTEROP_VERSION


def parse_sf_boolean(value: str | None) -> bool | None:
    """``?1``/``?0``; None for anything else, which the draft says to ignore. Parameters are ignored."""
    if value is None:
        return None
    item = value.split(";", 1)[0].strip()
    return {"?1": True, "?0": False}.get(item)


def parse_sf_integer(value: str | None) -> int | None:
    """A non-negative Integer item; None for anything else (ignored, as the draft says)."""
    if value is None:
        return None
    item = value.split(";", 1)[0].strip()
    return non_negative_integer(item, max_digits=_SF_INTEGER_DIGITS)


def sf_boolean(value: bool) -> str:
    return "?1" if value else "?0"


def draft_headers() -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": INTEROP_VERSION}


class IetfDraft:
    """Dispatch of draft requests: one handler per method, like the tus side."""

    def __init__(self, ctx: TusContext, tus_options: OptionsHandler) -> None:
        self.ctx = ctx
        self.options_handler = IetfOptionsHandler(ctx, tus_options)
        self.post = IetfPostHandler(ctx)
        self.head = IetfHeadHandler(ctx)
        self.patch = IetfPatchHandler(ctx)
        self.delete = IetfDeleteHandler(ctx)

    async def handle(self, request: Request, method: str, upload_id: str | None) -> Response:
        if method == "OPTIONS":
            return await self.options_handler.handle(request, upload_id)
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
        raise MethodNotAllowed(headers={"Allow": "HEAD, PATCH, DELETE, OPTIONS"})


def upload_limit(ctx: TusContext, upload: Upload | None = None) -> dict[str, str]:
    """``Upload-Limit``: the maximum size, and for an active upload its remaining lifetime."""
    members = [f"max-size={ctx.options.max_size}"]
    if upload is not None and upload.state is UploadState.ACTIVE and upload.expires_at is not None:
        remaining = max(0, int((upload.expires_at - utcnow()).total_seconds()))
        members.append(f"max-age={remaining}")
    return {"Upload-Limit": ", ".join(members)}


def _declared_length(request: Request, complete: bool, offset: int) -> int | None:
    """The length a request indicates: ``Upload-Length``, or offset + Content-Length when it completes.

    Both present must agree (400 inconsistent-upload-length).
    """
    by_header = parse_sf_integer(request.headers.get("upload-length"))
    by_content: int | None = None
    if complete:
        content_length = parse_sf_integer(request.headers.get("content-length"))
        if content_length is not None:
            by_content = offset + content_length
    if by_header is not None and by_content is not None and by_header != by_content:
        raise InconsistentUploadLength(f"Upload-Length is {by_header}, the request completes it at {by_content}")
    return by_header if by_header is not None else by_content


def _require_complete_header(request: Request) -> bool:
    complete = parse_sf_boolean(request.headers.get("upload-complete"))
    if complete is None:
        raise BadRequest("missing or invalid Upload-Complete header: must be ?0 or ?1")
    return complete


class IetfOptionsHandler:
    """OPTIONS: the tus answer, plus what the draft asks for (``Upload-Limit``, ``Accept-Patch``)."""

    def __init__(self, ctx: TusContext, tus_options: OptionsHandler) -> None:
        self.ctx = ctx
        self.tus_options = tus_options

    async def handle(self, request: Request, upload_id: str | None) -> Response:
        response = await self.tus_options.handle(request, upload_id)
        extra = draft_headers() | upload_limit(self.ctx) | {"Accept-Patch": PARTIAL_UPLOAD}
        for name, value in extra.items():
            response.headers[name] = value
        return response


class IetfPostHandler:
    """Upload creation: the body (possibly empty, possibly partial) is staged, then the row written."""

    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request) -> Response:
        options = self.ctx.options
        if not options.has("creation"):
            raise MethodNotAllowed("creation is not enabled")
        complete = _require_complete_header(request)
        length = _declared_length(request, complete, 0)
        if length is not None and length > options.max_size:
            raise TooLarge(f"the upload is larger than max-size ({options.max_size})", headers=upload_limit(self.ctx))
        await self.ctx.hooks.check_creation({})  # the draft carries no metadata; the hooks still decide

        now = utcnow()
        upload = Upload(
            id=new_upload_id(), length=length, created_at=now, updated_at=now, expires_at=self.ctx.expires_at(now)
        )
        requester = requester_of(request)
        upload = requester.owning(upload)
        rules = IetfRules(None, length, complete, limit=upload_limit(self.ctx), inspect=False)
        body = RequestBody(request.receive, options.body_pace)
        upload = (await create(self.ctx, upload, body, rules, requester)).upload
        extra = await self.ctx.result(upload) if upload.is_complete else {}

        headers = draft_headers() | {
            "Location": self.ctx.location(request, upload.id),
            "Upload-Offset": str(upload.offset),
            "Upload-Complete": sf_boolean(upload.is_complete),
        }
        return Response(status_code=201, headers=headers | upload_limit(self.ctx, upload) | extra)


class IetfHeadHandler:
    """Offset retrieval; like the tus HEAD, it first asks a running append to commit and let go."""

    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        async with self.ctx.locker.lock(upload_id, timeout=self.ctx.options.lock_timeout):
            upload = await self.ctx.load(upload_id, requester_of(request))
            if upload.completion_pending:
                await self.ctx.hand_over(upload)  # owed since a crash, as in the tus HEAD
        if upload.kind is UploadKind.FINAL and upload.state is UploadState.ACTIVE and not upload.is_complete:
            upload = await self.ctx.complete_final(upload.id) or upload
        headers = draft_headers() | {
            "Upload-Offset": str(upload.offset),
            "Upload-Complete": sf_boolean(upload.is_complete),
            "Cache-Control": "no-store",
        }
        if upload.length is not None:
            headers["Upload-Length"] = str(upload.length)
        return Response(status_code=204, headers=headers | upload_limit(self.ctx, upload))


class IetfPatchHandler:
    """Upload append: bytes at the offset, committed like a tus PATCH; ``?1`` completes the upload."""

    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        if content_type(request) != PARTIAL_UPLOAD:
            raise UnsupportedMediaType("Content-Type must be " + PARTIAL_UPLOAD)
        offset = parse_sf_integer(request.headers.get("upload-offset"))
        if offset is None:
            raise BadRequest("missing or invalid Upload-Offset header")
        complete = _require_complete_header(request)
        content_length = parse_non_negative("Content-Length", request.headers.get("content-length"), required=False)

        length = _declared_length(request, complete, offset)
        rules = IetfRules(offset, length, complete, limit=upload_limit(self.ctx), content_length=content_length)
        body = RequestBody(request.receive, self.ctx.options.body_pace)
        appended = await append(self.ctx, upload_id, body, rules, requester_of(request))
        upload = appended.upload
        extra = await self.ctx.result(upload) if upload.is_complete else {}
        headers = draft_headers() | {
            "Upload-Offset": str(upload.offset),
            "Upload-Complete": sf_boolean(upload.is_complete),
        }
        return Response(status_code=204, headers=headers | extra)


class IetfDeleteHandler:
    """Upload cancellation: the tus termination, answered without tus headers."""

    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        if not self.ctx.options.has("termination"):
            raise MethodNotAllowed("termination is not enabled")
        await self.ctx.terminate(upload_id, requester_of(request))
        return Response(status_code=204, headers=draft_headers())


class IetfRules(AppendRules):
    """The draft's append and creation: its own problem documents for a mismatching offset, an
    inconsistent length and an interrupted append; ``Upload-Complete: ?1`` ends the upload where
    its body ends."""

    def __init__(
        self,
        offset: int | None,
        length: int | None,
        complete: bool,
        *,
        limit: dict[str, str],
        content_length: int | None = None,
        inspect: bool = True,
    ) -> None:
        super().__init__(offset, content_length=content_length, inspect=inspect, completes=complete)
        self.length = length
        self.limit = limit  # Upload-Limit, sent with a 413

    async def admit(self, ctx: TusContext, upload: Upload) -> Upload:
        if upload.kind is UploadKind.FINAL:
            raise Forbidden("a final upload of a concatenation cannot be appended to")
        if upload.is_complete or upload.state is UploadState.COMPLETE:
            raise CompletedUpload(headers={"Upload-Offset": str(upload.offset), "Upload-Complete": "?1"})
        if self.offset != upload.offset:
            raise self.offset_mismatch(upload)  # before the length: the draft answers the offset first
        return await self._record_length(ctx, upload, self.length)

    def offset_mismatch(self, upload: Upload) -> Exception:
        return MismatchingUploadOffset(
            headers=self.where(upload),
            members={"expected-offset": upload.offset, "provided-offset": self.offset or 0},
        )

    def too_large(self, room: int) -> Exception:
        return TooLarge(f"the body runs past the upload's length ({room} bytes left)", self.limit)

    interrupted = InterruptedUploadAppend

    def where(self, upload: Upload) -> dict[str, str]:
        return {"Upload-Offset": str(upload.offset), "Upload-Complete": "?0"}

    async def settle(self, ctx: TusContext, upload: Upload, end: BodyEnd, *, new: bool) -> Upload:
        """``Upload-Complete: ?1`` and the whole body arrived: the upload ends where it stands."""
        if not self.completes or end is not BodyEnd.COMPLETE or upload.is_complete:
            return upload
        if upload.length is not None:
            # A declared length the body fell short of (a chunked body without Content-Length).
            raise InconsistentUploadLength(
                f"the upload's length is {upload.length}, it was completed at {upload.offset}",
                headers=self.where(upload),
            )
        if new:
            return upload.evolve(length=upload.offset)
        return await self._record_length(ctx, upload, upload.offset)

    @staticmethod
    async def _record_length(ctx: TusContext, upload: Upload, length: int | None) -> Upload:
        if length is None:
            return upload
        if upload.length is not None:
            if length != upload.length:
                raise InconsistentUploadLength(f"the upload's length is {upload.length}, the request says {length}")
            return upload
        if length > ctx.options.max_size:
            raise TooLarge(f"the upload is larger than max-size ({ctx.options.max_size})", upload_limit(ctx))
        if length < upload.offset:
            raise InconsistentUploadLength(f"length {length} is below the upload's offset {upload.offset}")
        updated = await ctx.store.set_length(upload.id, length)
        if updated is None:
            raise UploadGone("upload changed while its length was being set")
        return updated
