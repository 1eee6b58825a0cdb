"""Expiry: uploads without activity for the TTL lose their staged bytes and answer 410.

Run by a background task every UPLOAD_SESSION_CLEANUP_INTERVAL_HOURS and by `tusingest cleanup`.
An upload whose lock is held is being written right now, so it is skipped, never interrupted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from tusingest.sessions.locks import Locker, LockTimeout
from tusingest.sessions.model import UploadState, utcnow
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
