"""Reading a placed file back: a range of its original bytes from its Storage Element, decompressed
where it was stored compressed, streamed in blocks (memory stays flat whatever the file's size)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tusingest.elements.backend import close_stream
from tusingest.elements.pool import ElementPool, ElementUnavailable
from tusingest.finalise.compression import decompress_stream
from tusingest.saga.records import FileRecord

READ_BLOCK = 1 << 20


async def read_file(
    pool: ElementPool, record: FileRecord, start: int, stop: int, block_size: int = READ_BLOCK
) -> AsyncIterator[bytes]:
    """The file's original bytes ``start`` up to ``stop`` (clamped to its size).

    Stored as received, the element is asked from ``start`` on. Stored compressed, the object is
    decompressed from its beginning and the bytes before ``start`` are dropped: a compressed stream
    has no index to seek by. Raises ElementUnavailable (breaker open, element unknown) or the
    backend's BackendError (ObjectNotFound among them) on the first iteration.
    """
    stop = min(stop, record.size_bytes)
    if start >= stop:
        return
    element_id = record.storage_element_id
    if not pool.state(element_id).breaker.allows_calls():
        raise ElementUnavailable(element_id, "circuit breaker open")
    backend = pool.backend(element_id)
    if record.content_encoding is None:
        chunks = backend.get(record.storage_key, start=start)
        position = start
    else:
        chunks = decompress_stream(backend.get(record.storage_key), record.content_encoding, block_size)
        position = 0
    try:
        async for chunk in chunks:
            end = position + len(chunk)
            if end > start:
                yield chunk[max(0, start - position) : stop - position]
            position = end
            if position >= stop:
                break
    finally:
        await close_stream(chunks)
