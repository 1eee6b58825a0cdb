"""Expiry: uploads without activity for the TTL lose their staged bytes and answer 410.

Partial uploads of a concatenation are COMPLETE once their bytes are in, and final uploads read
those bytes in place, so they follow their own rule (``expire_partials``).

Run by a background task every UPLOAD_SESSION_CLEANUP_INTERVAL_HOURS and by `tusingest cleanup`.
An upload whose lock is held is being written right now, so it is skipped, never interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tusingest.sessions.locks import Locker, LockTimeout
from tusingest.sessions.model import Upload, UploadState, utcnow
from tusingest.sessions.store import SessionStore
from tusingest.staging import DirectoryStaging

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CleanupReport:
    expired: int
    skipped_busy: int


async def expire_uploads(
    store: SessionStore, staging: DirectoryStaging, locker: Locker, now: datetime | None = None
) -> CleanupReport:
    now = now or utcnow()
    expired = busy = 0
    seen: set[str] = set()
    while batch := [u for u in await store.list_expired(now) if u.id not in seen]:
        for upload in batch:
            seen.add(upload.id)
            try:
                async with locker.lock(upload.id, timeout=0, ask_holder=False):
                    if await store.set_state(upload.id, UploadState.EXPIRED, only_from=UploadState.ACTIVE):
                        await staging.remove(upload.id)
                        expired += 1
            except LockTimeout:
                busy += 1
    if expired or busy:
        log.info("expired %d upload(s); %d busy ones left for later", expired, busy)
    return CleanupReport(expired=expired, skipped_busy=busy)


async def expire_partials(
    store: SessionStore,
    staging: DirectoryStaging,
    locker: Locker,
    settled: Callable[[Upload], Awaitable[bool]],
    ttl: timedelta,
    now: datetime | None = None,
) -> int:
    """Free the bytes of partial uploads that no final upload can still need.

    A partial is freed (EXPIRED, staging removed) once its own TTL has run out since its last byte,
    and every final upload that names it is settled (its completion done, ``settled`` says so; or
    it is gone) and was last used more than the TTL ago. Until then a client may still build
    another final from it, as tus-js-client's ``parallelUploads`` may after a retry. ``settled``
    is the completion hook's view (``UploadHooks.settled``): False while a saga reads the bytes.
    """
    now = now or utcnow()
    freed = 0
    seen: set[str] = set()
    while batch := [u for u in await store.list_expired_partials(now) if u.id not in seen]:
        for partial in batch:
            seen.add(partial.id)
            finals = await store.list_final_uploads_with_part(partial.id)
            if any([await _needs_parts(final, settled, ttl, now) for final in finals]):
                continue
            try:
                async with locker.lock(partial.id, timeout=0, ask_holder=False):
                    if await store.set_state(partial.id, UploadState.EXPIRED, only_from=UploadState.COMPLETE):
                        await staging.remove(partial.id)
                        freed += 1
            except LockTimeout:
                continue
    if freed:
        log.info("freed the staged bytes of %d partial upload(s)", freed)
    return freed


async def _needs_parts(
    final: Upload, settled: Callable[[Upload], Awaitable[bool]], ttl: timedelta, now: datetime
) -> bool:
    if final.state in (UploadState.TERMINATED, UploadState.EXPIRED, UploadState.FAILED) or final.is_expired(now):
        return False
    if final.state is UploadState.ACTIVE:
        return True  # still waiting for its partials (concatenation-unfinished)
    if final.completion_pending or not await settled(final):
        return True  # its saga reads the partials' bytes
    return final.updated_at + ttl > now
