"""The upload saga: a complete upload becomes a verified, registered file on a Storage Element,
or nothing at all.

Steps, each recorded in the saga log before the next begins:
``inspected`` (one pass: hashes, MIME, virus scan, compression) → ``placing`` (element chosen,
object key known) → ``placed`` (object put) → ``sidecar_written`` (attr.json put) →
``registered`` (files row + outbox messages in one transaction: the commit point) → ``cleaned``.
Each step can be repeated. A transient failure retries with backoff; a failing element is
given up for another; a permanent failure undoes in reverse order (sidecar, object). A saga
left by a dead node is taken over by ``recover`` and carried on from its last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from tusingest.elements.backend import Backend, BackendError, InvalidKey, ObjectInfo, ObjectRefused
from tusingest.elements.pool import ElementPool, ElementUnavailable, NoElementAvailable
from tusingest.finalise.clamd import ClamdScanner, ScannerUnavailable
from tusingest.finalise.compression import should_compress
from tusingest.finalise.mime import HEAD_BYTES, detect_mime
from tusingest.finalise.naming import sidecar_document, sidecar_key, storage_key, stored_name
from tusingest.finalise.pipeline import (
    FileRejected,
    FinalisePolicy,
    Inspection,
    check_mime,
    declared_checksums,
    inspect,
)
from tusingest.saga.failpoints import Failpoints
from tusingest.saga.outbox import OutboxRelay
from tusingest.saga.records import FileRecord, NewOutboxMessage, Saga, SagaState
from tusingest.saga.store import DuplicateSaga, SagaOwnershipLost, SagaStore
from tusingest.sessions import SessionStore, Upload, UploadState
from tusingest.sessions.content import read_upload
from tusingest.sessions.store import StoreError
from tusingest.staging import DirectoryStaging, StagingError
from tusingest.saga.webhooks import (
    FILE_CREATED,
    UPLOAD_COMPLETED,
    UPLOAD_FAILED,
    file_event_message,
    webhook_event,
    webhook_messages,
)

log = logging.getLogger(__name__)

KIND: Final = "upload"
SPOOL_NAME = "finalise.spool"
READ_BLOCK = 1 << 20
SMALL_FILE = 8 << 20  # below this a saga does not take one of the FINALISE_CONCURRENCY slots

Status = Literal["finalizing", "completed", "failed"]


@dataclass(frozen=True, slots=True)
class SagaSettings:
    owner: str  # this node's id in the saga log
    lease_seconds: float = 60.0
    retry_attempts: int = 5
    retry_base_delay: float = 0.5
    timeout: float = 3600.0
    webhook_urls: tuple[str, ...] = ()
    events_stream: str | None = None  # None: no Redis, no file events
    default_username: str = "anonymous"
    concurrency: int = 4  # sagas reading, scanning, compressing and putting at once; the others queue


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    """Where an upload's finalisation stands, for the client."""

    status: Status
    file: FileRecord | None = None
    error_code: str | None = None
    error: str | None = None
    http_status: int = 422


class _Retry(Exception):
    """A transient failure: run the saga again from its last step after a backoff."""


class _GiveUp(Exception):
    """A permanent failure that is not the client's fault: undo and fail the upload."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def upload_metadata(upload: Upload) -> dict[str, str]:
    """The upload's metadata as text (values that are not UTF-8 are left out)."""
    from tusingest.tus.headers import parse_metadata

    decoded = {}
    for key, value in parse_metadata(upload.metadata).items():
        if value is None:
            decoded[key] = ""
            continue
        with contextlib.suppress(UnicodeDecodeError):
            decoded[key] = value.decode()
    return decoded


class UploadSagas:
    def __init__(
        self,
        *,
        sessions: SessionStore,
        staging: DirectoryStaging,
        sagas: SagaStore,
        pool: ElementPool,
        relay: OutboxRelay | None,
        scanner: ClamdScanner | None,
        policy: FinalisePolicy,
        settings: SagaSettings,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.sessions = sessions
        self.staging = staging
        self.sagas = sagas
        self.pool = pool
        self.relay = relay
        self.scanner = scanner
        self.policy = policy
        self.settings = settings
        self.failpoints = failpoints or Failpoints()
        self._running: dict[str, asyncio.Task[UploadOutcome]] = {}
        # Each running saga holds a read block, hash and compressor state and a put's buffers (two
        # 16 MiB parts on S3): bounding how many run at once bounds the node's memory.
        self._slots = asyncio.Semaphore(settings.concurrency)

    # -- starting, waiting, recovering ----------------------------------------------------------

    async def begin(self, upload: Upload) -> None:
        """Start the saga of a complete upload, once: never a second saga for one upload.

        Called again after a crash (the upload's completion was still owed), it finds the saga begun
        then and starts nothing; an unfinished one is resumed by ``recover`` once its lease lapses.
        """
        if upload.id in self._running:
            return
        if await self.sagas.latest_saga(KIND, upload.id) is not None:
            return
        metadata = upload_metadata(upload)
        created_at = datetime.now(UTC)
        file_id = str(uuid.uuid4())
        filename = metadata.get("filename") or metadata.get("name") or f"{upload.id}.bin"
        username = metadata.get("username") or self.settings.default_username
        name = stored_name(filename, username, created_at, file_id)
        data = {
            "upload_id": upload.id,
            "file_id": file_id,
            "length": upload.length,
            "filename": filename,
            "username": username,
            "user_id": metadata.get("user_id"),
            "retention_policy": metadata.get("retention_policy") or None,
            "description": metadata.get("description") or None,
            "metadata": metadata,
            "created_at": created_at.isoformat(),
            "storage_filename": name,
            "key": storage_key(name, created_at),
        }
        try:
            saga = await self.sagas.create_saga(
                KIND, upload.id, data, owner=self.settings.owner, lease_seconds=self.settings.lease_seconds
            )
        except DuplicateSaga:
            return  # another request or node began it a moment ago
        self._launch(saga)

    def _launch(self, saga: Saga) -> asyncio.Task[UploadOutcome]:
        task = asyncio.create_task(self._run(saga), name=f"upload-saga-{saga.subject_id}")
        self._running[saga.subject_id] = task
        task.add_done_callback(lambda _: self._running.pop(saga.subject_id, None))
        return task

    async def wait(self, upload_id: str, timeout: float, poll: float = 0.2) -> UploadOutcome | None:
        """The upload's settled outcome, waiting at most ``timeout`` seconds; None while it is still
        finalizing. A saga running on this node is awaited (shielded: a client that hangs up does not
        stop it); one running on another node is looked at every ``poll`` seconds."""
        task = self._running.get(upload_id)
        if task is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                return None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            outcome = await self.outcome(upload_id)
            if outcome is not None and outcome.status != "finalizing":
                return outcome
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            await asyncio.sleep(min(poll, left))

    async def recover(self, limit: int = 20) -> int:
        """Take over sagas whose node died (lease expired) and carry them on here."""
        claimed = await self.sagas.claim_stale(
            self.settings.owner, lease_seconds=self.settings.lease_seconds, limit=limit, kinds=(KIND,)
        )
        for saga in claimed:
            if saga.kind != KIND or saga.subject_id in self._running:
                continue
            log.info("taking over upload saga %s of upload %s at step %s", saga.saga_id, saga.subject_id, saga.step)
            self._launch(saga)
        return len(claimed)

    async def close(self) -> None:
        """Stop running sagas; their leases lapse and recovery (here or elsewhere) resumes them."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def outcome(self, upload_id: str) -> UploadOutcome | None:
        saga = await self.sagas.latest_saga(KIND, upload_id)
        if saga is None:
            return None
        return await self._outcome_of(saga)

    async def _outcome_of(self, saga: Saga) -> UploadOutcome:
        if saga.state is SagaState.COMPLETED:
            return UploadOutcome("completed", file=await self.sagas.get_file(saga.data["file_id"]))
        if saga.state in (SagaState.COMPENSATED, SagaState.FAILED):
            return UploadOutcome(
                "failed",
                error_code=saga.error_code,
                error=saga.error,
                http_status=int(saga.data.get("http_status", 422)),
            )
        return UploadOutcome("finalizing")

    async def refuse_early(self, upload: Upload, rejection: FileRejected) -> None:
        """Record a refusal decided on the first bytes: the upload fails, nothing was placed."""
        try:
            saga = await self.sagas.create_saga(
                KIND,
                upload.id,
                {"upload_id": upload.id, "file_id": None, "http_status": rejection.status},
                owner=self.settings.owner,
                lease_seconds=self.settings.lease_seconds,
            )
        except DuplicateSaga:
            return
        await self._fail(saga, rejection.code, rejection.message, http_status=rejection.status, compensate=False)

    # -- the saga ----------------------------------------------------------------------------

    async def _run(self, saga: Saga) -> UploadOutcome:
        lease = asyncio.create_task(self._keep_lease(saga.saga_id))
        try:
            # Small files hold little memory and wait mostly on the database: they skip the queue.
            small = int(saga.data.get("length") or 0) < SMALL_FILE
            slot: contextlib.AbstractAsyncContextManager[object] = contextlib.nullcontext() if small else self._slots
            async with asyncio.timeout(self.settings.timeout), slot:
                return await self._attempts(saga)
        except TimeoutError:
            current = await self.sagas.get_saga(saga.saga_id) or saga
            if current.step in ("registered", "cleaned"):
                return await self._finish(current)
            return await self._fail(
                current, "saga_timeout", f"finalisation took longer than {self.settings.timeout:g}s"
            )
        except _GiveUp as pending:
            # Compensation could not reach an element: the saga stays compensating, its lease
            # lapses, and recovery tries again later. For the client the upload has failed.
            log.warning("upload saga %s: %s", saga.saga_id, pending.message)
            current = await self._latest(saga)
            return UploadOutcome("failed", error_code=current.error_code, error=current.error, http_status=503)
        except SagaOwnershipLost:
            log.warning("upload saga %s was taken over by another node; stopping here", saga.saga_id)
            latest = await self.sagas.get_saga(saga.saga_id)
            return await self._outcome_of(latest or saga)
        finally:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease

    async def _keep_lease(self, saga_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            with contextlib.suppress(Exception):
                await self.sagas.renew_lease(
                    saga_id, owner=self.settings.owner, lease_seconds=self.settings.lease_seconds
                )

    async def _attempts(self, saga: Saga) -> UploadOutcome:
        while True:
            if saga.state is SagaState.COMPENSATING:
                return await self._fail(saga, saga.error_code or "failed", saga.error or "finalisation failed")
            try:
                return await self._forward(saga)
            except FileRejected as rejection:
                saga = await self._latest(saga)
                return await self._fail(saga, rejection.code, rejection.message, http_status=rejection.status)
            except _GiveUp as give_up:
                # Not the file's fault: storage could not take it. 503 tells the client so.
                return await self._fail(await self._latest(saga), give_up.code, give_up.message, http_status=503)
            except (_Retry, ScannerUnavailable, StoreError, StagingError, NoElementAvailable, OSError) as exc:
                saga = await self.sagas.bump_attempts(saga.saga_id, owner=self.settings.owner)
                if saga.attempts >= self.settings.retry_attempts:
                    code = _failure_code(exc)
                    message = f"gave up after {saga.attempts} attempts: {exc}"
                    return await self._fail(saga, code, message, http_status=503)
                delay = random.uniform(0, self.settings.retry_base_delay * 2 ** (saga.attempts - 1))
                log.warning("upload saga %s: %s; retrying in %.1fs", saga.saga_id, exc, delay)
                await asyncio.sleep(delay)

    async def _latest(self, saga: Saga) -> Saga:
        return await self.sagas.get_saga(saga.saga_id) or saga

    async def _forward(self, saga: Saga) -> UploadOutcome:
        upload = await self.sessions.get(saga.subject_id)
        if upload is None:
            raise _GiveUp("upload_gone", "the upload disappeared before it was finalised")
        step = saga.step
        # An earlier run (killed, or an attempt that failed) got as far as a put: what that put left
        # unfinished on the element is removed before the same key is put again.
        repeated = step in ("placing", "placed")

        if step in (None, "inspected") and not self._inspection_usable(saga):
            single_pass = await self._single_pass_head(upload)
            if single_pass is not None:
                saga = await self._advance(saga, "inspected", single_pass)
            else:
                inspection = await self._inspect(upload, saga)
                saga = await self._advance(saga, "inspected", _inspection_data(inspection))
            step = "inspected"
        await self.failpoints.reach("inspected")

        tried: list[str] = list(saga.data.get("tried", []))
        while step in ("inspected", "placing", "placed"):
            if step == "inspected" or saga.data.get("element_id") in tried:
                element_id = self._choose(saga, tried)
                saga = await self._advance(saga, "placing", {"element_id": element_id, "tried": tried})
                step = "placing"
            element_id = saga.data["element_id"]
            try:
                if step == "placing":
                    info, hashes = await self._put_object(saga, element_id, repeated=repeated)
                    saga = await self._advance(saga, "placed", {"stored_size": info.size, **hashes})
                    step = "placed"
                    if hashes:
                        self._check_single_pass(saga)
                    await self.failpoints.reach("placed", element_id)
                await self._put_sidecar(saga, element_id, repeated=repeated)
                saga = await self._advance(saga, "sidecar_written", {})
                step = "sidecar_written"
            except (ObjectRefused, InvalidKey) as exc:
                # The file's own fault (its name, its sidecar): another element would refuse it
                # too, and this one is not failing. The upload fails; compensation removes the object.
                raise FileRejected("object_refused", f"the storage element refused the file: {exc}") from exc
            except (BackendError, ElementUnavailable) as exc:
                log.warning("upload saga %s: element %s failed (%s); trying another", saga.saga_id, element_id, exc)
                await self._remove_from(element_id, saga.data["key"])
                tried.append(element_id)
                saga = await self._advance(saga, "inspected", {"tried": tried, "element_id": None})
                step = "inspected"

        if step == "sidecar_written":
            await self.failpoints.reach("sidecar_written", saga.data["element_id"])
            saga = await self._register(saga)
            step = "registered"
        return await self._finish(saga)

    def _inspection_usable(self, saga: Saga) -> bool:
        if saga.step is None:
            return False
        compression = saga.data.get("compression")
        # The spool of a compressed copy lives in staging; if it is gone, inspect again.
        return compression is None or Path(compression["spool"]).exists()

    async def _inspect(self, upload: Upload, saga: Saga) -> Inspection:
        length = upload.length or 0
        spool = self.staging.directory(upload.id) / SPOOL_NAME
        return await inspect(
            read_upload(self.sessions, self.staging, upload, READ_BLOCK),
            expected_size=length,
            policy=self.policy,
            scanner=self.scanner,
            metadata=saga.data.get("metadata", {}),
            spool_path=spool,
        )

    def _choose(self, saga: Saga, tried: list[str]) -> str:
        compression = saga.data.get("compression")
        size = int(compression["stored_size"]) if compression else int(saga.data["size"])
        retention = saga.data.get("retention_policy")
        try:
            state = self.pool.select(
                size, retention=retention if retention in ("temporary", "permanent") else None, exclude=tried
            )
        except NoElementAvailable as exc:
            if tried:
                raise _GiveUp("storage_unavailable", str(exc)) from exc
            raise
        return state.element.element_id

    async def _single_pass_head(self, upload: Upload) -> dict[str, Any] | None:
        """With no scanner and nothing to compress, the put itself is the one pass: hashes are taken
        as the bytes go to the element (checked after it). Decided on the first 64 KiB; None when
        the file needs the full inspection first (a scan must finish before anything is placed)."""
        if self.scanner is not None:
            return None
        declared_checksums(upload_metadata(upload))  # a malformed declared digest is refused before any put
        length = upload.length or 0
        if length > self.policy.max_size:
            raise FileRejected("file_too_large", f"the file has {length} bytes; the limit is {self.policy.max_size}")
        head = bytearray()
        async for block in read_upload(self.sessions, self.staging, upload, HEAD_BYTES):
            head += block
            break
        content_type = await asyncio.to_thread(detect_mime, bytes(head))
        check_mime(content_type, self.policy)
        if self.policy.compression_enabled and should_compress(
            content_type, length, min_size=self.policy.compression_min_size
        ):
            return None
        return {"size": length, "content_type": content_type, "compression": None, "single_pass": True}

    def _check_single_pass(self, saga: Saga) -> None:
        """After a single-pass put: the size read and any client-declared digest must hold."""
        data = saga.data
        if int(data["hashed_size"]) != int(data["size"]):
            raise FileRejected("size_mismatch", f"read {data['hashed_size']} bytes, the upload declares {data['size']}")
        for algorithm, value in declared_checksums(data.get("metadata", {})).items():
            if data[algorithm] != value:
                raise FileRejected(
                    "checksum_mismatch", f"the file's {algorithm} is {data[algorithm]}, the client declared {value}"
                )

    async def _put_object(self, saga: Saga, element_id: str, *, repeated: bool) -> tuple[ObjectInfo, dict[str, Any]]:
        """Put the object; in single-pass mode also return the hashes taken on the way."""
        data = saga.data
        compression = data.get("compression")
        size = int(compression["stored_size"]) if compression else int(data["size"])
        single_pass = bool(data.get("single_pass"))
        hashes: dict[str, Any] = {}

        async def hashed(blocks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            md5, sha256, total = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0

            def update(block: bytes) -> None:
                md5.update(block)
                sha256.update(block)

            async for block in blocks:
                await asyncio.to_thread(update, block)
                total += len(block)
                yield block
            hashes.update(md5=md5.hexdigest(), sha256=sha256.hexdigest(), hashed_size=total)

        def stream() -> AsyncIterator[bytes]:
            if compression:
                return _read_file(Path(compression["spool"]))
            if single_pass:
                hashes.clear()
                return hashed(self._staged(saga.subject_id))
            return self._staged(saga.subject_id)

        metadata = {"file-id": data["file_id"]} | ({} if single_pass else {"sha256": data["sha256"]})

        async def put(backend: Backend) -> ObjectInfo:
            return await backend.put(
                data["key"],
                self.failpoints.midway("put_midway", stream(), size, element_id),
                length=size,
                content_type=data["content_type"],
                content_encoding=compression["algorithm"] if compression else None,
                metadata=metadata,
            )

        if repeated:
            # A put of this key cut off by a kill (before a takeover or restart) left its temp file
            # or multipart upload: remove it before putting again.
            await self.pool.discard_incomplete(element_id, data["key"])
        with self.pool.reserve(element_id, size):
            info = await self.pool.call(element_id, put)
        if info.size != size:
            raise BackendError(f"element {element_id} stored {info.size} bytes of {size}", transient=False)
        self.pool.state(element_id).placed_bytes += info.size
        return info, hashes

    async def _staged(self, upload_id: str) -> AsyncIterator[bytes]:
        upload = await self.sessions.get(upload_id)
        if upload is None:
            raise StagingError(f"upload {upload_id} disappeared")
        async for block in read_upload(self.sessions, self.staging, upload, READ_BLOCK):
            yield block

    async def _put_sidecar(self, saga: Saga, element_id: str, *, repeated: bool) -> None:
        data = saga.data
        document = sidecar_document(
            file_id=data["file_id"],
            original_filename=data["filename"],
            storage_filename=data["storage_filename"],
            storage_path=data["key"],
            file_size=int(data["size"]),
            content_type=data["content_type"],
            created_at=datetime.fromisoformat(data["created_at"]),
            created_by_id=data.get("user_id"),
            created_by_username=data["username"],
            md5=data["md5"],
            sha256=data["sha256"],
            compression=_compression_record(data),
            metadata=data.get("metadata", {}),
        )

        async def put(backend: Backend) -> ObjectInfo:
            await self.failpoints.reach("sidecar", element_id)
            return await backend.put(
                sidecar_key(data["key"]), _once(document), length=len(document), content_type="application/json"
            )

        if repeated:
            await self.pool.discard_incomplete(element_id, sidecar_key(data["key"]))
        await self.pool.call(element_id, put)

    async def _register(self, saga: Saga) -> Saga:
        record = self._file_record(saga)
        messages = self._completion_messages(record)
        saga = await self.sagas.register_file(
            saga.saga_id,
            owner=self.settings.owner,
            record=record,
            messages=messages,
            step="registered",
            data_update={},
            lease_seconds=self.settings.lease_seconds,
        )
        if self.relay is not None:
            self.relay.notify()
        return saga

    def _file_record(self, saga: Saga) -> FileRecord:
        data = saga.data
        compression = data.get("compression")
        return FileRecord(
            file_id=data["file_id"],
            upload_id=saga.subject_id,
            original_filename=data["filename"],
            storage_filename=data["storage_filename"],
            storage_element_id=data["element_id"],
            storage_key=data["key"],
            size_bytes=int(data["size"]),
            stored_size_bytes=int(data.get("stored_size") or data["size"]),
            content_type=data["content_type"],
            content_encoding=compression["algorithm"] if compression else None,
            md5=data["md5"],
            sha256=data["sha256"],
            created_by_id=data.get("user_id"),
            created_by_username=data["username"],
            retention_policy=data.get("retention_policy"),
            description=data.get("description"),
            metadata=dict(data.get("metadata", {})),
            uploaded_at=datetime.fromisoformat(data["created_at"]),
        )

    def _completion_messages(self, record: FileRecord) -> list[NewOutboxMessage]:
        messages = webhook_messages(webhook_event(UPLOAD_COMPLETED, file_json(record)), self.settings.webhook_urls)
        if self.settings.events_stream:
            fields = {
                "file_id": record.file_id,
                "storage_element_id": record.storage_element_id,
                "storage_filename": record.storage_filename,
                "original_filename": record.original_filename,
                "size_bytes": record.size_bytes,
                "content_type": record.content_type,
                "sha256": record.sha256,
                "created_by": record.created_by_username,
            }
            messages.append(file_event_message(FILE_CREATED, fields, self.settings.events_stream))
        return messages

    async def _finish(self, saga: Saga) -> UploadOutcome:
        """After registration nothing is undone: clean staging up, mark the upload, done."""
        for element_id in saga.data.get("cleanup", []):
            await self._remove_from(element_id, saga.data["key"])
        await self.sessions.set_state(saga.subject_id, UploadState.COMPLETE)
        await self._remove_staging(saga.subject_id)
        if saga.step != "cleaned":
            saga = await self._advance(saga, "cleaned", {})
        await self.sagas.set_state(saga.saga_id, owner=self.settings.owner, state=SagaState.COMPLETED)
        return UploadOutcome("completed", file=await self.sagas.get_file(saga.data["file_id"]))

    async def _fail(
        self, saga: Saga, code: str, message: str, *, http_status: int = 422, compensate: bool = True
    ) -> UploadOutcome:
        """Undo in reverse order, tell the webhooks, mark the upload failed, free its bytes."""
        owner = self.settings.owner
        if saga.state is not SagaState.COMPENSATING:
            saga = await self.sagas.advance(
                saga.saga_id,
                owner=owner,
                step=saga.step or "created",
                data_update={"http_status": http_status},
                lease_seconds=self.settings.lease_seconds,
            )
            saga = await self.sagas.set_state(
                saga.saga_id, owner=owner, state=SagaState.COMPENSATING, error_code=code, error=message
            )
        if compensate:
            element_id = saga.data.get("element_id")
            if element_id and saga.data.get("key"):
                if not await self._remove_from(element_id, saga.data["key"]):
                    # The element cannot be reached: the saga stays compensating and recovery retries.
                    raise _GiveUp("compensation_pending", f"cannot remove the object from {element_id} yet")
            for other in saga.data.get("cleanup", []):
                await self._remove_from(other, saga.data["key"])
        await self.sagas.enqueue(
            webhook_messages(
                webhook_event(
                    UPLOAD_FAILED,
                    {"upload_id": saga.subject_id, "error": {"error": code, "message": message}},
                ),
                self.settings.webhook_urls,
            )
        )
        if self.relay is not None:
            self.relay.notify()
        await self.sessions.set_state(saga.subject_id, UploadState.FAILED)
        await self._remove_staging(saga.subject_id)
        await self.sagas.set_state(
            saga.saga_id, owner=owner, state=SagaState.COMPENSATED, error_code=code, error=message
        )
        log.info("upload %s failed: %s (%s)", saga.subject_id, message, code)
        return UploadOutcome("failed", error_code=code, error=message, http_status=http_status)

    async def _remove_from(self, element_id: str, key: str) -> bool:
        """Delete the object and its sidecar from an element; False when the element cannot be reached."""
        try:
            await self.pool.call(element_id, lambda backend: backend.delete(sidecar_key(key)))
            await self.pool.call(element_id, lambda backend: backend.delete(key))
        except (BackendError, ElementUnavailable) as exc:
            log.warning("cannot remove %s from element %s: %s", key, element_id, exc)
            return False
        return True

    async def _remove_staging(self, upload_id: str) -> None:
        with contextlib.suppress(StagingError, OSError):
            await self.staging.remove(upload_id)

    async def _advance(self, saga: Saga, step: str, update: Mapping[str, Any]) -> Saga:
        return await self.sagas.advance(
            saga.saga_id,
            owner=self.settings.owner,
            step=step,
            data_update=dict(update),
            lease_seconds=self.settings.lease_seconds,
        )


def _failure_code(exc: BaseException) -> str:
    if isinstance(exc, ScannerUnavailable):
        return "scanner_unavailable"
    if isinstance(exc, NoElementAvailable):
        return "storage_unavailable"
    return "finalisation_failed"


def _inspection_data(inspection: Inspection) -> dict[str, Any]:
    compression = inspection.compression
    return {
        "size": inspection.size,
        "md5": inspection.md5,
        "sha256": inspection.sha256,
        "content_type": inspection.content_type,
        "scanned": inspection.scanned,
        "scan_note": inspection.scan_note,
        "compression": None
        if compression is None
        else {"algorithm": compression.algorithm, "stored_size": compression.stored_size, "spool": compression.path},
    }


def _compression_record(data: Mapping[str, Any]) -> dict[str, Any] | None:
    compression = data.get("compression")
    if not compression:
        return None
    return {
        "algorithm": "brotli" if compression["algorithm"] == "br" else compression["algorithm"],
        "original_size": int(data["size"]),
        "stored_size": int(compression["stored_size"]),
    }


def file_json(record: FileRecord) -> dict[str, Any]:
    """The file as clients see it (final PATCH headers, session status, webhooks)."""
    return {
        "file_id": record.file_id,
        "storage_element_id": record.storage_element_id,
        "storage_filename": record.storage_filename,
        "original_filename": record.original_filename,
        "size_bytes": record.size_bytes,
        "stored_size_bytes": record.stored_size_bytes,
        "content_type": record.content_type,
        "md5_hash": record.md5,
        "sha256_hash": record.sha256,
        "uploaded_at": record.uploaded_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "compression": None
        if record.content_encoding is None
        else {"algorithm": "brotli" if record.content_encoding == "br" else record.content_encoding},
        "created_by": record.created_by_username,
        "upload_id": record.upload_id,
    }


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _read_file(path: Path, block: int = READ_BLOCK) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, block):
            yield chunk
    finally:
        handle.close()
