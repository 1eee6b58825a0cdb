"""Expiry: uploads without activity for the TTL lose their staged bytes and answer 410; staging
folders no upload needs any more (of an id the store does not know, or of an upload terminated
or expired) are removed.

Partial uploads of a concatenation are COMPLETE once their bytes are in, and final uploads read
those bytes in place, so they follow their own rule (``expire_partials``).

Run by a background task every UPLOAD_SESSION_CLEANUP_INTERVAL_HOURS (the first time at start)
and by `tusingest cleanup`. An upload whose lock is held is being written right now, so it is
skipped, never interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tusingest.sessions.audit import Action, AuditEvent
from tusingest.sessions.locks import Locker, LockTimeout
from tusingest.sessions.model import Upload, UploadState, utcnow
from tusingest.sessions.store import SessionStore
from tusingest.staging import Staging, StagingError

log = logging.getLogger(__name__)

# Their staged bytes are garbage: nothing reads or writes them again.
_FINISHED_WITH_STAGING = frozenset({UploadState.TERMINATED, UploadState.EXPIRED, UploadState.INVALID})
DEFAULT_STAGING_GRACE = timedelta(hours=24)  # UPLOAD_SESSION_TTL_HOURS' default
SWEEP_BATCH = 500


@dataclass(frozen=True, slots=True)
class CleanupReport:
    expired: int
    skipped_busy: int
    staging_removed: int = 0


async def expire_uploads(
    store: SessionStore,
    staging: Staging,
    locker: Locker,
    now: datetime | None = None,
    *,
    staging_grace: timedelta = DEFAULT_STAGING_GRACE,
) -> CleanupReport:
    now = now or utcnow()
    expired = busy = 0
    seen: set[str] = set()
    while batch := [u for u in await store.list_expired(now) if u.id not in seen]:
        for upload in batch:
            seen.add(upload.id)
            try:
                async with locker.lock(upload.id, timeout=0, ask_holder=False):
                    audit = AuditEvent.for_owner(Action.UPLOAD_TERMINATED, upload, reason="expired")
                    if await store.set_state(upload.id, UploadState.EXPIRED, only_from=UploadState.ACTIVE, audit=audit):
                        await staging.remove(upload.id)
                        expired += 1
            except LockTimeout:
                busy += 1
    if expired or busy:
        log.info("expired %d upload(s); %d busy ones left for later", expired, busy)
    removed = await sweep_staging(store, staging, locker, grace=staging_grace, now=now)
    await store.forget_expired_idempotency_keys(now)
    return CleanupReport(expired=expired, skipped_busy=busy, staging_removed=removed)


async def sweep_staging(
    store: SessionStore, staging: Staging, locker: Locker, *, grace: timedelta, now: datetime | None = None
) -> int:
    """Remove the staging folders no upload needs; returns how many.

    A folder of an upload terminated or expired lost its removal to a crash. A folder whose id
    the store does not know is either a creation that died before its row was written, or a
    creation with a body still arriving (the row is written after the body): only one untouched
    for grace (the TTL: longer than any body goes without a write) is taken for the former.
    """
    now = now or utcnow()
    removed = 0
    ids = await staging.list_upload_ids()
    for start in range(0, len(ids), SWEEP_BATCH):
        batch = ids[start : start + SWEEP_BATCH]
        known = await store.get_many(batch)
        for upload_id in batch:
            if _needed(known.get(upload_id)):
                continue
            try:
                written = await staging.last_written(upload_id)
            except StagingError:
                continue  # not a name staging gives an upload's folder
            if written is None or (upload_id not in known and now - written < grace):
                continue
            try:
                # The lock and a second look: a creation on this node that writes its row right now keeps its folder.
                async with locker.lock(upload_id, timeout=0, ask_holder=False):
                    if _needed(await store.get(upload_id)):
                        continue
                    await staging.remove(upload_id)
            except LockTimeout:
                continue
            removed += 1
            upload = known.get(upload_id)
            log.info(
                "removed the staging folder of upload %s (%s)",
                upload_id,
                f"upload {upload.state.value}" if upload is not None else "no session knows it",
            )
    return removed


def _needed(upload: Upload | None) -> bool:
    """Whether an upload's staged bytes may still be read or written."""
    return upload is not None and upload.state not in _FINISHED_WITH_STAGING


async def expire_partials(
    store: SessionStore,
    staging: Staging,
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
                    audit = AuditEvent.for_owner(Action.UPLOAD_TERMINATED, partial, reason="expired")
                    if await store.set_state(
                        partial.id, UploadState.EXPIRED, only_from=UploadState.COMPLETE, audit=audit
                    ):
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
