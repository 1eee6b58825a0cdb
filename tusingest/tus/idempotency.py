"""Idempotent creation: a POST with an ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header)
that is sent again, because its answer was lost, finds the upload its first request made instead of
making a second one. For the tus POST (creation, creation-with-upload) and the IETF draft's creation.

The key is a Structured Field String, scoped to the caller (the token's subject) and kept in the
session store, so a repeat sent to another node finds it too. It is claimed under the new upload's
own lock, before a byte of the body is read: a repeat whose first request is still running finds
that lock held (409); one whose first request died before it created its upload finds the lock
free and no upload, and creates anew. A repeat answers where the first upload stands (its Location
and offset) without reading its own body; one that differs in what the fingerprint covers (the
lengths and the kind of upload) is refused (422), as the draft says for a reused key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from starlette.requests import Request

from tusingest.sessions import Upload, UploadState
from tusingest.sessions.locks import LockTimeout
from tusingest.sessions.model import IdempotencyKey, utcnow
from tusingest.tus.append import Appended, AppendRules, RequestBody, create
from tusingest.tus.base import Requester, TusContext
from tusingest.tus.errors import IdempotencyKeyInUse, IdempotencyKeyInvalid, IdempotencyKeyReused

_MAX_KEY_LENGTH = 255
# RFC 9651 section 3.3.3: printable ASCII in double quotes, with \" and \\ the only escapes; then
# optional parameters, which carry nothing for us.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"\s*(;.*)?')
# What makes two creations the same one: the lengths they declare and the kind of upload.
_FINGERPRINTED = ("upload-length", "upload-defer-length", "content-length", "upload-concat", "upload-complete")
_DEFAULT_LIFETIME = timedelta(hours=24)  # when uploads never expire (no UPLOAD_SESSION_TTL_HOURS)
# Gone this way, an upload frees its key: a repeat then creates anew.
_GONE = frozenset({UploadState.TERMINATED, UploadState.EXPIRED, UploadState.INVALID})


def parse_idempotency_key(value: str) -> str:
    """The key of an ``Idempotency-Key`` field; 400 unless it is a non-empty Structured Field String."""
    match = _SF_STRING.fullmatch(value.strip())
    if match is None:
        raise IdempotencyKeyInvalid('Idempotency-Key must be a Structured Field String, e.g. "8e03978e"')
    key = re.sub(r"\\(.)", r"\1", match.group(1))
    if not key or len(key) > _MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(f"Idempotency-Key must hold 1 to {_MAX_KEY_LENGTH} characters")
    return key


def fingerprint(request: Request) -> str:
    return "\n".join(f"{name}={request.headers.get(name, '').strip()}" for name in _FINGERPRINTED)


class RepeatedCreation(Exception):
    """The key names an upload an earlier request made: answer with it."""

    def __init__(self, upload: Upload) -> None:
        super().__init__(upload.id)
        self.upload = upload


@dataclass(frozen=True, slots=True)
class IdempotentCreation:
    ctx: TusContext
    requester: Requester
    key: str
    fingerprint: str

    @classmethod
    def of(cls, ctx: TusContext, request: Request, requester: Requester) -> IdempotentCreation | None:
        value = request.headers.get("idempotency-key")
        if value is None:
            return None
        return cls(ctx, requester, parse_idempotency_key(value), fingerprint(request))

    async def claim(self, upload_id: str) -> None:
        """Claim the key for ``upload_id``, whose lock this request holds; raises RepeatedCreation
        when an earlier request with the key made an upload that is still there."""
        store = self.ctx.store
        for _ in range(2):  # a holder whose upload is gone is let go, and the key claimed once more
            now = utcnow()
            lifetime = self.ctx.options.ttl or _DEFAULT_LIFETIME
            claim = IdempotencyKey(self.requester.subject, self.key, self.fingerprint, upload_id, now, now + lifetime)
            holder = await store.claim_idempotency_key(claim)
            if holder.upload_id == upload_id:
                return
            if holder.fingerprint != self.fingerprint:
                raise IdempotencyKeyReused()
            first = await self._made_by(holder)
            if first is not None:
                raise RepeatedCreation(first)
            await store.release_idempotency_key(holder.subject, holder.key, holder.upload_id)
        raise IdempotencyKeyInUse()  # another request took the key at the same moment

    async def _made_by(self, holder: IdempotencyKey) -> Upload | None:
        """The upload ``holder``'s request made; None if there is none (any more); 409 while it runs."""
        store = self.ctx.store
        upload = await store.get(holder.upload_id)
        if upload is None:
            try:  # its creator holds the lock until the row is written
                async with self.ctx.locker.lock(holder.upload_id, timeout=0, ask_holder=False):
                    upload = await store.get(holder.upload_id)
            except LockTimeout:
                raise IdempotencyKeyInUse() from None
        if upload is None or upload.state in _GONE or upload.is_expired(utcnow()):
            return None
        return upload

    async def release(self, upload_id: str) -> None:
        """The creation of ``upload_id`` failed before its row was written: free the key."""
        if await self.ctx.store.get(upload_id) is None:
            await self.ctx.store.release_idempotency_key(self.requester.subject, self.key, upload_id)


async def create_once(
    ctx: TusContext,
    request: Request,
    upload: Upload,
    body: RequestBody | None,
    rules: AppendRules,
    requester: Requester,
) -> tuple[Upload, bool]:
    """``create``, or, for a repeat of an ``Idempotency-Key``, the upload its first request made
    (True), with nothing of this request's body read."""
    creation = IdempotentCreation.of(ctx, request, requester)
    if creation is None:
        return (await create(ctx, upload, body, rules, requester)).upload, False
    try:
        created: Appended = await create(ctx, upload, body, rules, requester, claimed=creation.claim)
    except RepeatedCreation as repeat:
        return repeat.upload, True
    except BaseException:
        await creation.release(upload.id)
        raise
    return created.upload, False
