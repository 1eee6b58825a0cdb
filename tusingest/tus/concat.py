"""Concatenation (and concatenation-unfinished): uploads in parts, joined without copying.

``Upload-Concat: partial`` makes an upload a partial one; ``Upload-Concat: final;<url> ...``
makes a final upload whose bytes are its partials' staged bytes, in that order (a partial may
appear more than once). The final's length is the sum of the partials' lengths. It completes
when its partials do: at once when they are complete already, else when the last of them
completes (``TusContext.complete``).

A partial is named by a path below the tus base path or by an absolute URL of this server: the
scheme and host the request reached it by (``TusContext.location``), so a final never names,
nor makes the server look up, an upload it did not hand out itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.sessions.audit import Action
from tusingest.sessions.model import is_upload_id, new_upload_id, utcnow
from tusingest.tus.base import TusContext, expires_header, partials_complete, requester_of, tus_headers
from tusingest.tus.errors import BadRequest, TooLarge

MAX_PARTS = 1000  # far above what a client splits a file into; bounds the lookup


@dataclass(frozen=True, slots=True)
class FinalConcat:
    parts: tuple[str, ...]  # upload ids, in order
    urls: tuple[str, ...]  # as the client sent them, for error messages


def parse_upload_concat(value: str, base_path: str) -> UploadKind | FinalConcat:
    """``partial`` → UploadKind.PARTIAL; ``final;<url> <url> ...`` → the partials' ids.

    A URL is absolute or a path; the upload id is its last segment below ``base_path``.
    """
    value = value.strip()
    if value == "partial":
        return UploadKind.PARTIAL
    kind, separator, rest = value.partition(";")
    if kind.strip() != "final" or not separator:
        raise BadRequest("invalid Upload-Concat header: must be partial or final;<url> <url> ...")
    urls = tuple(rest.split())
    if not urls:
        raise BadRequest("invalid Upload-Concat header: a final upload needs at least one partial upload URL")
    if len(urls) > MAX_PARTS:
        raise BadRequest(f"invalid Upload-Concat header: at most {MAX_PARTS} partial uploads")
    return FinalConcat(tuple(_upload_id(url, base_path) for url in urls), urls)


def _upload_id(url: str, base_path: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("", "http", "https") or parts.query or parts.fragment:
        raise BadRequest(f"invalid Upload-Concat header: {url!r} is not an upload URL")
    upload_id = parts.path.removeprefix(base_path) if parts.path.startswith(base_path) else ""
    if not is_upload_id(upload_id):
        raise BadRequest(f"invalid Upload-Concat header: {url!r} is not an upload URL below {base_path}")
    return upload_id


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def same_origin(url: str, location: str) -> bool:
    """Whether ``url`` (a partial's URL as the client sent it) points at the server whose upload
    URLs look like ``location``: a path, or the same scheme and host (default ports aside)."""
    try:
        named, own = urlsplit(url), urlsplit(location)
    except ValueError:
        return False
    if not named.scheme and not named.netloc:
        return True
    scheme = (named.scheme or own.scheme).lower()
    return scheme == own.scheme.lower() and _host(named.netloc, scheme) == _host(own.netloc, scheme)


def _host(netloc: str, scheme: str) -> str:
    host = netloc.lower()
    default_port = _DEFAULT_PORTS.get(scheme)
    return host.removesuffix(default_port) if default_port else host


def upload_concat_header(ctx: TusContext, request: Request, upload: Upload) -> dict[str, str]:
    """The Upload-Concat a HEAD answers: ``partial``, or ``final;`` and the partials' URLs."""
    if upload.kind is UploadKind.PARTIAL:
        return {"Upload-Concat": "partial"}
    if upload.kind is UploadKind.FINAL:
        urls = " ".join(ctx.location(request, part) for part in upload.parts)
        return {"Upload-Concat": f"final;{urls}"}
    return {}


async def create_final(ctx: TusContext, request: Request, concat: FinalConcat, metadata: str) -> Response:
    """POST with ``Upload-Concat: final;...``: check the partials, then create the final upload."""
    own = ctx.location(request, "")
    for url in concat.urls:
        if not same_origin(url, own):
            raise BadRequest(f"Upload-Concat: {url} is not an upload of this server")
    partials = await ctx.store.get_many(list(dict.fromkeys(concat.parts)))
    requester = requester_of(request)
    now = utcnow()
    for part_id, url in zip(concat.parts, concat.urls, strict=True):
        part = partials.get(part_id)
        # Somebody else's partial is answered as an unknown one: a final folds only its creator's.
        if part is not None and not requester.may_touch(part):
            await requester.refused(ctx.store, part_id)
            part = None
        if part is None:
            raise BadRequest(f"Upload-Concat: {url} is not a known upload")
        if part.kind is not UploadKind.PARTIAL:
            raise BadRequest(f"Upload-Concat: {url} is not a partial upload (create it with Upload-Concat: partial)")
        if part.state is UploadState.TERMINATED or part.is_expired(now):
            raise BadRequest(f"Upload-Concat: partial upload {url} was terminated or has expired")
        if part.length is None:
            raise BadRequest(f"Upload-Concat: partial upload {url} has no Upload-Length yet")
    length = sum(partials[part_id].length or 0 for part_id in concat.parts)
    if length > ctx.options.max_size:
        raise TooLarge(f"the partial uploads add up to {length} bytes, more than Tus-Max-Size ({ctx.options.max_size})")

    complete = partials_complete(concat.parts, partials)
    if not complete and not ctx.options.has("concatenation-unfinished"):
        raise BadRequest("Upload-Concat: every partial upload must be complete (concatenation-unfinished is off)")
    final = Upload(
        id=new_upload_id(),
        length=length,
        offset=length if complete else 0,
        metadata=metadata,
        kind=UploadKind.FINAL,
        parts=concat.parts,
        created_at=now,
        updated_at=now,
        expires_at=ctx.expires_at(now),
    )
    final = requester.owning(final)
    await ctx.store.create(final, audit=requester.audit(Action.UPLOAD_CREATED, final))
    extra: dict[str, str] = {}
    if complete:
        async with ctx.locker.lock(final.id):
            await ctx.complete(final)
        extra = await ctx.result(final)
    elif (completed := await ctx.complete_final(final.id)) is not None:
        # The last partial completed while this request looked: it found no final to complete then.
        final = completed
    headers = tus_headers() | {"Location": ctx.location(request, final.id)}
    if not final.is_complete:
        headers |= expires_header(final)
    return Response(status_code=201, headers=headers | extra)
