"""The finaliser seen from the tus layer: the UploadHooks that refuse a type on the first bytes,
run the upload saga when the last byte arrives, and describe the result in ArtStore-* headers.

It speaks both languages (the finaliser's refusals, the tus layer's errors), so it sits above both,
beside the REST facade, the finaliser's other HTTP face; neither tus/ nor finalise/ imports the other."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from tusingest.elements.backend import BackendError, ObjectNotFound
from tusingest.elements.pool import ElementPool, ElementUnavailable
from tusingest.finalise.mime import HEAD_BYTES, detect_mime
from tusingest.finalise.naming import MAX_SIDECAR_BYTES, MAX_USER_ID, MAX_USERNAME, sidecar_worst_case_size
from tusingest.finalise.pipeline import FileRejected, FinalisePolicy, check_mime
from tusingest.finalise.readback import read_file
from tusingest.finalise.refusals import Refused
from tusingest.finalise.upload import UploadOutcome, UploadSagas
from tusingest.saga.records import FileRecord
from tusingest.sessions import SessionStore, Upload
from tusingest.tus.base import StoredUpload
from tusingest.tus.errors import ServiceUnavailable, TusError, UploadGone, UploadRefused

log = logging.getLogger(__name__)

FILE_ID_HEADER = "ArtStore-File-Id"
ELEMENT_HEADER = "ArtStore-Storage-Element-Id"
SHA256_HEADER = "ArtStore-Sha256"
STATUS_HEADER = "ArtStore-Upload-Status"
ERROR_HEADER = "ArtStore-Error"
EXPOSED_HEADERS = (FILE_ID_HEADER, ELEMENT_HEADER, SHA256_HEADER, STATUS_HEADER, ERROR_HEADER)
INVALID_METADATA = "invalid_metadata"
# Stands in for ``<upload id>.bin``, the name the saga gives a file sent without a filename.
_UNNAMED = "u" * 64 + ".bin"


class FinaliserHooks:
    def __init__(self, sagas: UploadSagas, store: SessionStore, policy: FinalisePolicy, *, wait_seconds: float) -> None:
        self.sagas = sagas
        self.store = store
        self.policy = policy
        self.wait_seconds = wait_seconds
        # Only worth looking early when some types are refused.
        self.head_bytes = HEAD_BYTES if policy.mime_validation and policy.allowed_mime_types else 0
        self.wants_digests = True  # the saga checks and records them instead of reading the file again

    async def inspect_start(self, upload: Upload, head: bytes) -> None:
        mime = await asyncio.to_thread(detect_mime, head)
        try:
            check_mime(mime, self.policy)
        except FileRejected as rejection:
            await self.sagas.refuse_early(upload, rejection)
            raise refused(rejection) from None

    def committed(self, upload: Upload, started_at: int) -> None:
        self.sagas.followers.committed(upload, started_at)  # compression may begin while the bytes arrive

    async def completed(self, upload: Upload) -> None:
        # Test-only pause between the commit of the last byte and the saga's first row (the window
        # that ``Upload.completion_pending`` closes); free when no failpoint is set.
        await self.sagas.failpoints.reach("completed")
        await self.sagas.begin(upload)

    async def result(self, upload: Upload) -> Mapping[str, str]:
        outcome = await self.sagas.wait(upload.id, self.wait_seconds)
        if outcome is None:
            return {STATUS_HEADER: "finalizing"}
        return answer(outcome)

    async def describe(self, upload: Upload) -> Mapping[str, str]:
        outcome = await self.sagas.outcome(upload.id)
        if outcome is None:
            # Owed but not begun yet (its node died right after the last byte): it will be.
            return {STATUS_HEADER: "finalizing"} if upload.completion_pending else {}
        return headers_for(outcome)

    async def settled(self, upload: Upload) -> bool:
        outcome = await self.sagas.outcome(upload.id)
        if upload.completion_pending:
            return False
        return outcome is None or outcome.status != "finalizing"

    async def refusal(self, upload: Upload) -> TusError:
        outcome = await self.sagas.outcome(upload.id)
        if outcome is None or outcome.refusal is None:
            return UploadRefused(422, "the upload failed")
        return refused(outcome.refusal, headers_for(outcome))

    async def stored(self, upload: Upload) -> StoredUpload | None:
        record = await self.sagas.sagas.file_for_upload(upload.id)
        return None if record is None else PlacedFile(record, self.sagas.pool)

    async def check_creation(self, metadata: Mapping[str, bytes | None]) -> None:
        """Refuse (400) at creation what the saga could not store, so it never fails for it later.

        - A value is text when it is valid UTF-8; any other value (this includes encoded lone
          surrogates, which UTF-8 cannot carry) is binary and stays out of the text metadata,
          the file's row and attr.json (``finalise.upload.upload_metadata``): kept, never refused.
        - A text value containing NUL is refused: PostgreSQL cannot keep ``\\u0000`` in text or
          jsonb, and no name or description needs it.
        - ``username`` at most 64 and ``user_id`` at most 128 characters.
        - attr.json must fit 4 KiB with the server's fields at their largest
          (``naming.sidecar_worst_case_size``). Refusing is chosen over trimming: a client that
          sends metadata expects it in the file's attr.json whole, or to be told at once which
          value is too large, not to find it silently cut after the upload.
        """
        text: dict[str, str] = {}
        for key, value in metadata.items():
            if value is None:
                text[key] = ""
                continue
            try:
                decoded = value.decode()
            except UnicodeDecodeError:
                continue  # binary: left out of the text metadata
            if "\0" in decoded:
                raise _invalid(f"the Upload-Metadata value of {key!r} contains a NUL character")
            text[key] = decoded
        username = text.get("username") or self.sagas.settings.default_username
        user_id = text.get("user_id")
        if len(username) > MAX_USERNAME:
            raise _invalid(f"username has {len(username)} characters; at most {MAX_USERNAME} are allowed")
        if user_id is not None and len(user_id) > MAX_USER_ID:
            raise _invalid(f"user_id has {len(user_id)} characters; at most {MAX_USER_ID} are allowed")
        filename = text.get("filename") or text.get("name") or _UNNAMED
        size = sidecar_worst_case_size(original_filename=filename, username=username, user_id=user_id, metadata=text)
        if size > MAX_SIDECAR_BYTES:
            largest = max(text, key=lambda key: len(text[key].encode()) + len(key))
            raise _invalid(
                f"the metadata would make attr.json {size} bytes long; it may have at most {MAX_SIDECAR_BYTES}"
                f" (the largest value is {largest!r}, {len(text[largest].encode())} bytes)"
            )


@dataclass(frozen=True, slots=True)
class PlacedFile:
    """A registered file as the tus layer's StoredUpload: its bytes from its Storage Element."""

    record: FileRecord
    pool: ElementPool

    @property
    def size(self) -> int:
        return self.record.size_bytes

    @property
    def content_type(self) -> str | None:
        return self.record.content_type or None

    @property
    def filename(self) -> str | None:
        return self.record.original_filename or None

    async def read(self, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        try:
            async for block in read_file(self.pool, self.record, start, stop):
                yield block
        except ObjectNotFound:
            log.warning(
                "file %s is registered but not on element %s", self.record.file_id, self.record.storage_element_id
            )
            raise UploadGone("the file is no longer on its Storage Element") from None
        except (BackendError, ElementUnavailable) as exc:
            log.warning(
                "cannot read file %s from element %s: %s", self.record.file_id, self.record.storage_element_id, exc
            )
            raise ServiceUnavailable(
                "the file's Storage Element cannot be read now; retry shortly", {"Retry-After": "5"}
            ) from None


def _invalid(message: str) -> UploadRefused:
    return refused(Refused(message, code=INVALID_METADATA, status=400))


def refused(refusal: Refused, headers: Mapping[str, str] | None = None) -> UploadRefused:
    """The finaliser's refusal as the tus layer's error: its code as an attribute (for the REST
    facade) and in ``ArtStore-Error`` (for tus clients), the one place that header is set from."""
    return UploadRefused(
        refusal.status, refusal.message, {**(headers or {}), ERROR_HEADER: refusal.code}, code=refusal.code
    )


def headers_for(outcome: UploadOutcome) -> dict[str, str]:
    headers: dict[str, str] = {STATUS_HEADER: outcome.status}
    if outcome.file is not None:
        headers |= {
            FILE_ID_HEADER: outcome.file.file_id,
            ELEMENT_HEADER: outcome.file.storage_element_id,
            SHA256_HEADER: outcome.file.sha256,
        }
    if outcome.refusal is not None:
        headers[ERROR_HEADER] = outcome.refusal.code
    return headers


def answer(outcome: UploadOutcome) -> dict[str, str]:
    """Headers for a finished saga, or the refusal to raise for a failed one."""
    if outcome.refusal is not None:
        raise refused(outcome.refusal, headers_for(outcome))
    return headers_for(outcome)
