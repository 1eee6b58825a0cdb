"""The IETF draft "Resumable Uploads for HTTP" (draft-ietf-httpbis-resumable-upload), interop
version 8, served on the tus endpoint to requests carrying ``Upload-Draft-Interop-Version: 8``.

Same uploads, store, staging, locks and completion path as tus 1.0; only the headers differ.
The draft marks an upload complete explicitly (``Upload-Complete: ?1``); here that fixes the
upload's length at its offset, so ``Upload.is_complete`` and the completion hook work unchanged.
"""

from __future__ import annotations

import base64
import email.utils
from email.message import Message

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.sessions.audit import Action, Outcome
from tusingest.sessions.model import new_upload_id, utcnow
from tusingest.tus.append import AppendRules, RequestBody, append
from tusingest.tus.base import NOBODY, Requester, TusContext, requester_of
from tusingest.tus.body import BodyEnd
from tusingest.tus.errors import (
    AppendTooSmall,
    BadRequest,
    CompletedUpload,
    Forbidden,
    InconsistentUploadLength,
    InterruptedUploadAppend,
    MethodNotAllowed,
    MismatchingUploadOffset,
    TooLarge,
    TusError,
    UnsupportedMediaType,
    UploadGone,
)
from tusingest.tus.headers import non_negative_integer, parse_metadata, parse_non_negative
from tusingest.tus.idempotency import create_once
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
    """``Upload-Limit``, a Structured Field Dictionary of Integers: max-size, the append sizes when
    configured, and max-age: the lifetime a new upload gets (OPTIONS, ``upload`` None) or what is
    left of an active upload's. Every member is one we enforce."""
    options = ctx.options
    members = {"max-size": options.max_size}
    if options.min_append_size:
        members["min-append-size"] = options.min_append_size
    if options.max_append_size:
        members["max-append-size"] = options.max_append_size
    now = utcnow()
    expires_at = ctx.expires_at(now) if upload is None else upload.expires_at
    if expires_at is not None and (upload is None or upload.state is UploadState.ACTIVE):
        members["max-age"] = max(0, int((expires_at - now).total_seconds()))
    return {"Upload-Limit": ", ".join(f"{key}={value}" for key, value in members.items())}


def disposition_filename(value: str | None) -> str | None:
    """The file name of a ``Content-Disposition`` field (RFC 6266): ``filename*`` (RFC 8187,
    decoded) before ``filename`` (section 4.3); None without one. RFC 6266 keeps RFC 2231's
    parameter syntax, which the standard library's email parser reads: no parser of our own."""
    if not value:
        return None
    message = Message()
    message["Content-Disposition"] = value
    params = message.get_params(header="content-disposition", unquote=False) or []
    named = [param for key, param in params[1:] if key == "filename"]
    named.sort(key=lambda param: not isinstance(param, tuple))  # the parser gives filename* as a tuple
    if not named:
        return None
    return email.utils.unquote(email.utils.collapse_rfc2231_value(named[0])).strip() or None


def creation_metadata(request: Request) -> str:
    """Upload-Metadata for a draft creation: the header as sent, if any (kept byte-exact, as on the
    tus side), plus the file name of ``Content-Disposition`` (which -11 recommends) when the header
    names none. Upload-Metadata wins where both name one: it is the explicit, tus-shaped field."""
    metadata = (request.headers.get("upload-metadata") or "").strip()
    filename = disposition_filename(request.headers.get("content-disposition"))
    if filename is None or "filename" in parse_metadata(metadata):
        return metadata
    encoded = "filename " + base64.b64encode(filename.encode()).decode()
    return f"{metadata},{encoded}" if metadata else encoded


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
        metadata = creation_metadata(request)
        await self.ctx.hooks.check_creation(parse_metadata(metadata))
        content_length = parse_sf_integer(request.headers.get("content-length"))

        now = utcnow()
        upload = Upload(
            id=new_upload_id(),
            length=length,
            metadata=metadata,
            created_at=now,
            updated_at=now,
            expires_at=self.ctx.expires_at(now),
        )
        requester = requester_of(request)
        upload = requester.owning(upload)
        limit = upload_limit(self.ctx)
        rules = IetfRules(None, length, complete, limit=limit, content_length=content_length, inspect=False)
        body = RequestBody(request.receive, options.body_pace)
        upload, _ = await create_once(self.ctx, request, upload, body, rules, requester)
        return await self.created(request, upload)

    async def created(self, request: Request, upload: Upload) -> Response:
        """The answer to a creation of ``upload`` (also to a repeat of it, by its Idempotency-Key):
        -11 asks for Location and Upload-Limit; ``Upload-Complete: ?1`` only once it is complete."""
        headers = draft_headers() | {
            "Location": self.ctx.location(request, upload.id),
            "Upload-Offset": str(upload.offset),
        }
        if upload.is_complete:
            headers |= await completion_result(self.ctx, upload)
        return Response(status_code=201, headers=headers | upload_limit(self.ctx, upload))


async def completion_result(ctx: TusContext, upload: Upload) -> dict[str, str]:
    """The headers of the request that completed ``upload``, with ``Upload-Complete: ?1``, which
    -11 puts on that answer also when processing the upload failed: the client learns that the
    error is the processing's, not the transfer's, and that resuming would not help."""
    complete = {"Upload-Complete": "?1"}
    try:
        return await ctx.result(upload) | complete
    except TusError as error:
        error.headers |= complete
        raise


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
        body = RequestBody(request.receive, self.ctx.options.body_pace)
        rules = IetfRules(
            offset,
            length,
            complete,
            limit=upload_limit(self.ctx),
            content_length=content_length,
            body=body,
            max_append=self.ctx.options.max_append_size or None,
            requester=requester_of(request),
        )
        appended = await append(self.ctx, upload_id, body, rules, requester_of(request))
        upload = appended.upload
        headers = draft_headers() | {"Upload-Offset": str(upload.offset)}
        if upload.is_complete:
            headers |= await completion_result(self.ctx, upload)
        else:
            headers["Upload-Complete"] = "?0"
        return Response(status_code=204, headers=headers)


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
    its body ends; a body past the upload's known length invalidates the upload (-11); the append
    sizes of ``Upload-Limit`` hold for an append (``body`` given), not for a creation."""

    def __init__(
        self,
        offset: int | None,
        length: int | None,
        complete: bool,
        *,
        limit: dict[str, str],
        content_length: int | None = None,
        body: RequestBody | None = None,
        max_append: int | None = None,
        requester: Requester = NOBODY,
        inspect: bool = True,
    ) -> None:
        super().__init__(offset, content_length=content_length, inspect=inspect, completes=complete)
        self.length = length
        self.limit = limit  # Upload-Limit, sent with a 413
        self.body = body  # an append's, read only to tell whether it is empty (see ``_empty``)
        self.max_append = max_append
        self.requester = requester

    async def admit(self, ctx: TusContext, upload: Upload) -> Upload:
        if upload.kind is UploadKind.FINAL:
            raise Forbidden("a final upload of a concatenation cannot be appended to")
        if upload.is_complete or upload.state is not UploadState.ACTIVE:
            # -11: nothing changes; an empty append is answered 410 completed-upload, a non-empty
            # one is an inconsistent length. Neither says Upload-Complete: the request completed nothing.
            if await self._empty():
                raise CompletedUpload()
            raise InconsistentUploadLength(f"the upload is complete at {upload.offset} bytes; it takes no more")
        if self.offset != upload.offset:
            raise self.offset_mismatch(upload)  # before the length: the draft answers the offset first
        minimum = ctx.options.min_append_size
        if minimum and not self.completes and self.content_length is not None and self.content_length < minimum:
            raise AppendTooSmall(f"an append that does not complete the upload carries at least {minimum} bytes")
        return await self._record_length(ctx, upload, self.length)

    async def _empty(self) -> bool:
        """Whether this request's body is empty; a body without Content-Length is read (and dropped) to tell."""
        if self.content_length is not None or self.body is None:
            return not self.content_length
        async for chunk in self.body.chunks():
            if chunk:
                return False
        return True

    def allowance(self, room: int) -> int:
        return room if self.max_append is None else min(room, self.max_append)

    async def overflow(self, ctx: TusContext, upload: Upload, room: int, allowed: int, *, new: bool) -> Exception:
        if allowed < room:
            return TooLarge(f"an append carries at most max-append-size ({allowed}) bytes", self.limit)
        if upload.length is None:
            return TooLarge(f"the upload is larger than max-size ({ctx.options.max_size})", self.limit)
        if not new:
            await invalidate(ctx, upload, self.requester)
        return InconsistentUploadLength(f"the body runs past the upload's length of {upload.length} bytes")

    def offset_mismatch(self, upload: Upload) -> Exception:
        return MismatchingUploadOffset(
            headers=self.where(upload),
            members={"expected-offset": upload.offset, "provided-offset": self.offset or 0},
        )

    def too_large(self, room: int) -> Exception:
        return TooLarge(f"the body runs past the upload's length ({room} bytes left)", self.limit)

    interrupted = InterruptedUploadAppend

    def where(self, upload: Upload) -> dict[str, str]:
        return {"Upload-Offset": str(upload.offset)}

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


async def invalidate(ctx: TusContext, upload: Upload, requester: Requester) -> None:
    """Mark ``upload`` invalid (a body ran past its known length) and free its staged bytes; under
    its lock. Every later request on it is refused (``TusContext.load``: InvalidatedUpload)."""
    failed = requester.audit(Action.UPLOAD_FAILED, upload, outcome=Outcome.FAILED, reason="length_exceeded")
    if await ctx.store.set_state(upload.id, UploadState.INVALID, only_from=UploadState.ACTIVE, audit=failed):
        await ctx.staging.remove(upload.id)
        ctx.metrics.tus_uploads.labels("invalidated").inc()
