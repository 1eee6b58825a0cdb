"""The bytes of an upload, wherever they are staged: what the finaliser reads.

A single or partial upload is its own staged bytes up to its committed offset (invariant 1).
A final upload (concatenation) has no bytes of its own: it is its partials' staged bytes, in
order, each bounded by the partial's length. Either way the bytes stream in blocks, never
all at once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from tusingest.sessions.model import Upload, UploadKind, UploadState
from tusingest.sessions.store import SessionStore
from tusingest.staging import Digests, Staging, StagingError


def digest_tag(upload: Upload) -> str | None:
    """What tells this upload's running digest from that of an earlier upload of the same id; None
    for uploads that keep none: a partial's bytes are hashed as part of its final upload, once that
    is complete (MD5 and SHA-256 states cannot be joined)."""
    if upload.kind is not UploadKind.SINGLE:
        return None
    return f"{upload.created_at.timestamp():.6f}"


def whole_digests(staging: Staging, upload: Upload) -> Digests | None:
    """MD5 and SHA-256 of a complete upload as its bytes were committed on this node, or None when
    this node did not see them all (the finaliser then hashes them as it reads them)."""
    tag = digest_tag(upload)
    if tag is None or upload.length is None or upload.offset != upload.length:
        return None
    return staging.digests.whole(upload.id, tag, upload.length)


async def read_upload(
    store: SessionStore,
    staging: Staging,
    upload: Upload,
    block_size: int = 1 << 20,
    *,
    start: int = 0,
    stop: int | None = None,
) -> AsyncGenerator[bytes, None]:
    """The upload's committed bytes from ``start`` up to ``stop`` (default: all of them), in blocks
    of at most ``block_size``; never past the committed offset.

    A final upload is readable once all its partials are complete; otherwise, or when a
    partial is gone, StagingError is raised before the first byte.
    """
    stop = upload.offset if stop is None else min(stop, upload.offset)
    if upload.kind is not UploadKind.FINAL:
        if upload.is_complete and upload.length is not None:
            await staging.seal(upload.id, upload.length)  # complete: it takes no more bytes
        async for block in staging.read(upload.id, stop, block_size, start=start, committed=upload.offset):
            yield block
        return
    partials = await store.get_many(list(dict.fromkeys(upload.parts)))
    lengths = []
    for part_id in upload.parts:
        part = partials.get(part_id)
        if part is None or part.state in (UploadState.TERMINATED, UploadState.EXPIRED):
            raise StagingError(f"partial upload {part_id} of final upload {upload.id} is gone")
        if part.length is None or not part.is_complete:
            raise StagingError(f"partial upload {part_id} of final upload {upload.id} is not complete")
        lengths.append((part_id, part.length))
    position = 0  # where the partial begins in the final upload
    for part_id, length in lengths:
        if position >= stop:
            break
        if position + length > start:
            await staging.seal(part_id, length)
            part_start = max(0, start - position)
            async for block in staging.read(part_id, min(length, stop - position), block_size, start=part_start):
                yield block
        position += length
