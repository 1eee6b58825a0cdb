"""What every tus handler shares: options, the parts it works with, loading an upload,
completing one, the headers every response carries."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from starlette.requests import HTTPConnection, Request

from tusingest.observability.logs import note_upload
from tusingest.observability.metrics import Metrics
from tusingest.sessions import SessionStore, Upload, UploadKind, UploadState
from tusingest.sessions.audit import ANONYMOUS, Action, AuditEvent, Outcome
from tusingest.sessions.locks import Locker, LockTimeout
from tusingest.sessions.model import utcnow
from tusingest.staging import Staging
from tusingest.tus.body import BodyPace
from tusingest.tus.errors import InvalidatedUpload, TusError, UploadGone, UploadLocked, UploadNotFound
from tusingest.tus.headers import TUS_VERSION, http_date


class StoredUpload(Protocol):
    """A complete upload's bytes where the completion hook put them (a Storage Element): what a
    GET serves once they left staging. The tus layer knows nothing of where that is."""

    @property
    def size(self) -> int:
        """Of the original bytes, as received."""
        ...

    @property
    def content_type(self) -> str | None:
        """As the completion hook found it; None: not known."""
        ...

    @property
    def filename(self) -> str | None: ...

    def read(self, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        """The original bytes ``start`` up to ``stop``, streamed; a TusError (e.g. 503) before the
        first byte when they cannot be read now."""
        ...


class UploadHooks(Protocol):
    """What happens to an upload beyond the protocol: the tus layer calls these and knows
    nothing of what they do (the finaliser, in app.py). Each may refuse with a TusError."""

    head_bytes: int
    """How many first bytes ``inspect_start`` wants to see; 0: never called."""

    wants_digests: bool
    """Whether ``completed`` uses the running MD5 and SHA-256 of the committed bytes (the staging
    digest cache): staging then hashes every byte as it writes it, and only then."""

    async def inspect_start(self, upload: Upload, head: bytes) -> None:
        """The first bytes of a single upload, as soon as they arrive, before they are committed.
        Raising refuses the upload there and then (a type that will never be accepted)."""

    def committed(self, upload: Upload, started_at: int) -> None:
        """A commit on this node took the upload's offset from ``started_at`` to ``upload.offset``
        (single and partial uploads alike; called under its lock, so it must not wait for anything)."""

    async def completed(self, upload: Upload) -> None:
        """The upload holds all its bytes (single or final, never partial): take it over durably.

        Called under the upload's lock, after the commit that recorded its completion as owed
        (``Upload.completion_pending``, cleared once this returns). After a crash it may be called
        again for the same upload, and must then start nothing twice. Raising leaves the completion
        owed; recovery calls again later."""

    async def result(self, upload: Upload) -> Mapping[str, str]:
        """Headers for the response of the request that completed ``upload``, asked once its lock
        is released (it may wait a bounded time for what ``completed`` started); raising answers
        that request with the error."""

    async def describe(self, upload: Upload) -> Mapping[str, str]:
        """Extra headers for HEAD and PATCH on an upload that is complete or failed."""

    async def refusal(self, upload: Upload) -> TusError:
        """The answer to a PATCH on a FAILED upload."""

    async def settled(self, upload: Upload) -> bool:
        """Whether what runs after completion is done with the upload's staged bytes, so that a
        termination may free them; False while the finaliser still reads them."""

    async def check_creation(self, metadata: Mapping[str, bytes | None]) -> None:
        """The decoded Upload-Metadata of an upload about to be created, before anything is
        staged or stored. Raising a TusError (400) refuses the creation."""

    async def stored(self, upload: Upload) -> StoredUpload | None:
        """Where a complete upload's bytes are kept once the completion hook placed them; None
        while staging still holds them (or the hook keeps none)."""


class PlainHooks:
    """No finaliser: a complete upload is simply marked complete."""

    head_bytes = 0
    wants_digests = False  # nothing reads them

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def inspect_start(self, upload: Upload, head: bytes) -> None:
        return None

    def committed(self, upload: Upload, started_at: int) -> None:
        return None

    async def completed(self, upload: Upload) -> None:
        return None  # the commit made it COMPLETE; nothing else is owed

    async def result(self, upload: Upload) -> Mapping[str, str]:
        return {}

    async def describe(self, upload: Upload) -> Mapping[str, str]:
        return {}

    async def refusal(self, upload: Upload) -> TusError:
        return UploadGone("upload failed")

    async def settled(self, upload: Upload) -> bool:
        return True

    async def check_creation(self, metadata: Mapping[str, bytes | None]) -> None:
        return None  # the metadata is kept as the header was sent; nothing derives names from it

    async def stored(self, upload: Upload) -> StoredUpload | None:
        return None  # a complete upload stays in staging


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Requester:
    """Who sends a request, as far as uploads care: the subject that owns what it creates (and its
    display name), and whether it may touch anyone's upload. The tus layer knows nothing of tokens:
    app.py's authentication puts one in the request scope's state (``REQUESTER``)."""

    subject: str
    name: str = ""
    admin: bool = False
    address: str | None = None  # the client's, for the audit log

    def audit(
        self, action: str, upload: Upload | str, *, outcome: str = Outcome.OK, reason: str | None = None
    ) -> AuditEvent:
        """The audit event of what this requester does to ``upload`` (or the upload of that id)."""
        return AuditEvent(
            action,
            outcome,
            subject=self.subject or ANONYMOUS,
            subject_name=self.name or None,
            client_address=self.address,
            upload_id=upload if isinstance(upload, str) else upload.id,
            reason=reason,
        )

    async def refused(self, store: SessionStore, upload_id: str, reason: str = "not_owner") -> None:
        """Record that this requester was refused the upload: it is somebody else's (answered 404)."""
        await store.record_audit(self.audit(Action.REFUSED, upload_id, outcome=Outcome.REFUSED, reason=reason))

    def may_touch(self, upload: Upload) -> bool:
        """Invariant 7: an upload is its owner's or an admin's (one made before owners: admin only)."""
        return self.admin or (bool(self.subject) and upload.owner_id == self.subject)

    def owning(self, upload: Upload) -> Upload:
        """``upload`` recorded as this requester's."""
        return upload.evolve(owner_id=self.subject, owner_name=self.name or self.subject)


REQUESTER = "requester"  # the key of the Requester in the request scope's state
# No requester in the scope (a route the authentication did not see): owns nothing, may touch nothing.
NOBODY = Requester(subject="")


def requester_of(connection: HTTPConnection) -> Requester:
    found = connection.scope.get("state", {}).get(REQUESTER)
    return found if isinstance(found, Requester) else NOBODY


@dataclass(frozen=True, slots=True)
class TusOptions:
    base_path: str = "/files/"
    max_size: int = 5 << 30
    extensions: tuple[str, ...] = ()  # the enabled ones, in the order Tus-Extension lists them
    ttl: timedelta | None = timedelta(hours=24)  # None: uploads never expire
    lock_timeout: float = 10.0
    trust_proxy_headers: bool = False
    body_pace: BodyPace = field(default_factory=BodyPace)  # how slowly a body may arrive before it is cut off
    # The IETF draft's append sizes (Upload-Limit min-append-size / max-append-size); 0: none.
    min_append_size: int = 0
    max_append_size: int = 0

    def has(self, extension: str) -> bool:
        return extension in self.extensions


@dataclass(slots=True)
class TusContext:
    options: TusOptions
    store: SessionStore
    staging: Staging
    locker: Locker
    hooks: UploadHooks
    metrics: Metrics = field(default_factory=Metrics)

    def expires_at(self, now: datetime) -> datetime | None:
        if self.options.ttl is None or not self.options.has("expiration"):
            return None
        return now + self.options.ttl

    async def load(self, upload_id: str, requester: Requester) -> Upload:
        """The upload, or the error a client gets for it: 404 unknown or not the requester's to
        touch (so ids cannot be probed: the same answer, before its state says anything), 410
        terminated/expired. Every request on an existing upload passes here (invariant 7)."""
        note_upload(upload_id)  # its span and log lines name the upload from here on
        upload = await self.store.get(upload_id)
        if upload is None:
            raise UploadNotFound()
        if not requester.may_touch(upload):
            await requester.refused(self.store, upload_id)
            raise UploadNotFound()
        if upload.state is UploadState.TERMINATED:
            raise UploadGone("upload was terminated")
        if upload.state is UploadState.INVALID:
            raise InvalidatedUpload()
        if upload.is_expired(utcnow()):
            raise UploadGone("upload has expired")
        return upload

    def location(self, request: Request, upload_id: str) -> str:
        scheme = request.url.scheme
        host = request.headers.get("host") or request.url.netloc
        if self.options.trust_proxy_headers:
            scheme = _first(request.headers.get("x-forwarded-proto")) or scheme
            host = _first(request.headers.get("x-forwarded-host")) or host
        return f"{scheme}://{host}{self.options.base_path}{upload_id}"

    async def commit(self, upload: Upload, new_offset: int) -> Upload:
        """The commit point: move the upload's offset to ``new_offset`` once its bytes are synced.

        Conditional on the offset the request started from, so a request that lost its upload
        meanwhile (terminated, expired, or written by another node after a lost lock) changes nothing.
        """
        now = utcnow()
        committed = await self.store.commit_offset(upload.id, upload.offset, new_offset, now, self.expires_at(now))
        if committed is None:
            raise UploadGone("upload changed while receiving; its state was kept")
        return committed

    async def terminate(self, upload_id: str, requester: Requester) -> None:
        """Stop an upload for good and free its staged bytes (tus termination, draft cancellation).

        Takes the lock like any writer, so a running PATCH is asked to commit and let go first.
        """
        async with self.locker.lock(upload_id, timeout=self.options.lock_timeout):
            upload = await self.load(upload_id, requester)
            if upload.completion_pending or (
                upload.state is UploadState.COMPLETE and not await self.hooks.settled(upload)
            ):
                retry = str(max(1, round(self.options.lock_timeout)))
                raise UploadLocked("the upload is being finalised; retry once that ends", {"Retry-After": retry})
            terminated = requester.audit(Action.UPLOAD_TERMINATED, upload, reason="terminated")
            if (
                await self.store.set_state(upload.id, UploadState.TERMINATED, only_from=upload.state, audit=terminated)
                is None
            ):
                raise UploadGone("upload changed state while being terminated")
            await self.staging.remove(upload.id)
        self.metrics.tus_uploads.labels("terminated").inc()

    async def complete(self, upload: Upload) -> None:
        """Run under the upload's lock once ``upload`` holds all its bytes (its commit made it COMPLETE).

        A single or final upload is handed to the completion hook. A partial upload completes every
        final upload waiting for it as its last missing partial (concatenation-unfinished) instead.
        The answer for the client comes from ``result``, asked after the lock is released.
        """
        if upload.kind is not UploadKind.PARTIAL:
            await self.hand_over(upload)
            self.metrics.tus_uploads.labels("completed").inc()
            return
        for final in await self.store.list_final_uploads_with_part(upload.id):
            if final.state is not UploadState.ACTIVE or final.is_complete:
                continue
            try:
                await self.complete_final(final.id)
            except LockTimeout:
                # The partial's own request succeeded; a HEAD on the final completes it later.
                log.warning("final upload %s was busy when its partial %s completed", final.id, upload.id)

    async def hand_over(self, upload: Upload) -> None:
        """Give a complete upload whose completion is owed to the completion hook, then clear the debt.

        Under the upload's lock. The commit recorded the debt (``completion_pending``) in the same
        statement as the last byte, so a crash anywhere before the hook has taken the upload over
        leaves it owed, and ``finish_pending_completions`` on any node pays it.
        """
        await self.hooks.completed(upload)
        await self.store.completion_taken_over(upload.id)

    async def result(self, upload: Upload) -> dict[str, str]:
        """The completion hook's headers for the request that completed ``upload``; after the lock."""
        if upload.kind is UploadKind.PARTIAL:
            return {}
        return dict(await self.hooks.result(upload))

    async def complete_final(self, final_id: str) -> Upload | None:
        """Complete a final upload whose partials all hold their bytes; None if it is not ready.

        Runs under the final's lock; the conditional offset commit makes sure only one request
        ever completes it, so the completion hook runs once. Its result belongs to no response:
        the request that got here was about another upload.
        """
        async with self.locker.lock(final_id, timeout=self.options.lock_timeout):
            final = await self.store.get(final_id)
            now = utcnow()
            if final is None or final.state is not UploadState.ACTIVE or final.is_complete or final.is_expired(now):
                return None
            partials = await self.store.get_many(list(dict.fromkeys(final.parts)))
            if final.length is None or not partials_complete(final.parts, partials):
                return None
            completed = await self.store.commit_offset(final.id, final.offset, final.length, now, self.expires_at(now))
            if completed is None:
                return None
            await self.hand_over(completed)
            return await self.store.get(final_id) or completed  # the hook may have moved its state

    async def finish_pending_completions(self, before: datetime, limit: int = 100) -> int:
        """Pay every completion still owed since ``before``: uploads whose node died (or whose hook
        failed) between the commit of their last byte and the hook taking them over. Runs on every
        node; the upload's lock, and the debt re-read under it, make each hand-over happen once."""
        done = 0
        for upload in await self.store.list_completion_pending(before, limit):
            try:
                async with self.locker.lock(upload.id, timeout=self.options.lock_timeout, ask_holder=False):
                    current = await self.store.get(upload.id)
                    if current is None or not current.completion_pending:
                        continue  # a request or another node paid it meanwhile
                    log.info("finishing the completion of upload %s, owed since %s", upload.id, upload.updated_at)
                    await self.hand_over(current)
                    done += 1
            except LockTimeout:
                continue  # someone is working on it; the next round looks again
            except Exception:  # one upload's failure must not stop the others
                log.exception("cannot finish the completion of upload %s yet", upload.id)
        return done


def partials_complete(part_ids: Iterable[str], partials: Mapping[str, Upload]) -> bool:
    """Whether every partial upload named holds all its bytes and is still there."""
    now = utcnow()
    for part_id in part_ids:
        part = partials.get(part_id)
        if part is None or not part.is_complete or part.state is UploadState.TERMINATED or part.is_expired(now):
            return False
    return True


def expires_header(upload: Upload) -> dict[str, str]:
    if upload.state is UploadState.ACTIVE and upload.expires_at is not None:
        return {"Upload-Expires": http_date(upload.expires_at)}
    return {}


def tus_headers() -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION}


def _first(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(",")[0].strip() or None
