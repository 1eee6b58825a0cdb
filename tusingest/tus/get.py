"""GET on an upload: the bytes it holds so far, for its owner or an admin (anyone else: 404).

A download, not a tus extension: it needs no ``Tus-Resumable`` and ``Tus-Extension`` does not
list it; tus 1.0 and the IETF draft share the upload URL, so both get it.

No lock: a read moves no offset. It reads no further than the committed offset the upload had
when the request arrived (invariant 1), never the bytes a running PATCH has staged but not
committed. The bytes come from staging while it holds them, else from where the completion hook
placed them (``UploadHooks.stored``: the Storage Element, decompressed), the same either way.

``Range`` (RFC 9110, section 14): one range of bytes answers 206 with ``Content-Range``; one that
starts past the end 416 with ``Content-Range: bytes */N``. Several ranges, a malformed one, another
unit or an ``If-Range`` that does not match answer the whole upload with 200, as the RFC allows
(no multipart/byteranges: the clients that resume a download ask for one range).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.sessions.content import read_upload
from tusingest.sessions.metadata import MetadataError, metadata_text
from tusingest.staging import StagingError
from tusingest.tus.base import StoredUpload, TusContext, requester_of, tus_headers
from tusingest.tus.errors import NotYetReadable, RangeNotSatisfiable, TusError, UploadGone
from tusingest.tus.headers import http_date

log = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# type/subtype with parameters; no quoted strings, so nothing a header could break on.
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(\s*;\s*{_TOKEN}={_TOKEN})*")
_MAX_MEDIA_TYPE = 255


@dataclass(frozen=True, slots=True)
class _Download:
    """What one GET serves: the upload's bytes, wherever they are now, and how to describe them."""

    size: int
    content_type: str
    filename: str | None
    stored: StoredUpload | None  # None: from staging


class GetHandler:
    def __init__(self, ctx: TusContext) -> None:
        self.ctx = ctx

    async def handle(self, request: Request, upload_id: str) -> Response:
        upload = await self.ctx.load(upload_id, requester_of(request))
        if upload.state is UploadState.FAILED:
            raise await self.ctx.hooks.refusal(upload)  # its bytes were let go with it
        download = await self._locate(upload, await self._stored(upload))
        etag = f'"{upload.id}-{download.size}"'  # the bytes up to an offset never change: a strong validator
        last_modified = http_date(upload.updated_at)
        span = wanted_range(request, download.size, (etag, last_modified))
        start, stop = span or (0, download.size)
        headers = tus_headers() | {
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-store",
            "Content-Disposition": content_disposition(download.filename),
            "Content-Length": str(stop - start),
            "ETag": etag,
            "Last-Modified": last_modified,
            "X-Content-Type-Options": "nosniff",  # served as sent, never as what a browser guesses
        }
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{download.size}"
        if start == stop:
            return Response(b"", status, headers, media_type=download.content_type)
        blocks, first = await self._open(upload, download, start, stop)
        return StreamingResponse(_continue(first, blocks, upload.id), status, headers, media_type=download.content_type)

    async def _stored(self, upload: Upload) -> StoredUpload | None:
        if upload.state is not UploadState.COMPLETE or upload.kind is UploadKind.PARTIAL:
            return None
        return await self.ctx.hooks.stored(upload)

    async def _locate(self, upload: Upload, stored: StoredUpload | None) -> _Download:
        try:
            metadata = metadata_text(upload.metadata)
        except MetadataError:
            metadata = {}
        filename = metadata.get("filename") or metadata.get("name") or (stored.filename if stored else None)
        content_type = _media_type(metadata.get("filetype")) or _media_type(stored.content_type if stored else None)
        # A final upload holds no bytes of its own until its partials are all complete.
        size = stored.size if stored is not None else upload.offset
        return _Download(size, content_type or OCTET_STREAM, filename, stored)

    async def _open(
        self, upload: Upload, download: _Download, start: int, stop: int
    ) -> tuple[AsyncGenerator[bytes, None], bytes]:
        """The blocks to send and the first of them, read now: a failure before the first byte
        is still an answer (a status code), one after it can only cut the response short."""
        if download.stored is not None:
            blocks = download.stored.read(start, stop)
            return blocks, await anext(blocks, b"")
        if (
            upload.kind is not UploadKind.FINAL
            and not upload.is_complete
            and not self.ctx.staging.reads_unsealed(upload.id, upload.offset, start)
        ):
            raise NotYetReadable(
                "this server stages uploads in S3, where the bytes of an upload in progress cannot be read"
                " (only its last bytes, after its last whole part); GET it once it is complete"
            )
        blocks = read_upload(self.ctx.store, self.ctx.staging, upload, start=start, stop=stop)
        try:
            return blocks, await anext(blocks, b"")
        except StagingError:
            if upload.state is not UploadState.COMPLETE:
                raise
        # Placed and cleaned up since the upload was loaded: read it where it is now.
        stored = await self._stored(upload)
        if stored is None:
            raise UploadGone("the upload's bytes are no longer kept")
        blocks = stored.read(start, stop)
        return blocks, await anext(blocks, b"")


def wanted_range(request: Request, size: int, validators: tuple[str, ...]) -> tuple[int, int] | None:
    """The one byte range asked for, as (start, stop); None for the whole. 416 when it starts past the end."""
    header = request.headers.get("range")
    if header is None:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() not in validators:
        return None  # the client's copy is not of these bytes: it gets them all
    from werkzeug.http import parse_range_header  # here: werkzeug costs ~3 MiB, and most servers never see a Range

    parsed = parse_range_header(header)
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        return None
    span = parsed.range_for_length(size)
    if span is None:
        raise RangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return span


def content_disposition(filename: str | None) -> str:
    """``attachment`` with the file name: quoted ASCII for every client, and the exact name as
    UTF-8 (RFC 8187 ``filename*``) when it is not plain ASCII. Never inline: the bytes are the
    client's, served from our origin."""
    if not filename:
        return "attachment"
    name = "".join("_" if ch in "/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in filename)
    fallback = "".join(ch if 0x20 <= ord(ch) < 0x7F and ch not in '"%' else "_" for ch in name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += "; filename*=UTF-8''" + quote(name, safe="!#$&+-.^_`|~")
    return value


def _media_type(value: str | None) -> str | None:
    if not value or len(value) > _MAX_MEDIA_TYPE or _MEDIA_TYPE.fullmatch(value.strip()) is None:
        return None
    return value.strip()


async def _continue(first: bytes, blocks: AsyncGenerator[bytes, None], upload_id: str) -> AsyncGenerator[bytes, None]:
    try:
        yield first
        async for block in blocks:
            yield block
    except (StagingError, TusError) as exc:
        # The status line is out: all that is left is to cut the body short (its Content-Length
        # tells the client so) and say why here.
        log.warning("download of upload %s cut short: %s", upload_id, exc)
        raise
    finally:
        await blocks.aclose()
