"""The transfer saga: a registered file moves (or is copied) from its Storage Element to another one, and the
registry follows it only once the copy is complete and verified. Its steps run on ``saga.runner.SagaRunner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final, Literal

import brotli
from pydantic import Field

from tusingest.auth import Identity, is_owner_or_admin
from tusingest.elements.backend import Backend, BackendError, ObjectInfo, ObjectNotFound, close_stream
from tusingest.elements.pool import ElementPool, ElementUnavailable
from tusingest.finalise.compression import decompress_stream
from tusingest.finalise.naming import sidecar_document, sidecar_key
from tusingest.finalise.refusals import (
    AuditRecorder,
    DeleteInProgress,
    FileNotFound,
    Refused,
    StorageElementUnknown,
    TransferInProgress,
    not_owner,
)
from tusingest.observability import tracing
from tusingest.observability.metrics import Metrics
from tusingest.saga.failpoints import Failpoints
from tusingest.saga.records import FileRecord, Saga, SagaData, SagaState
from tusingest.saga.runner import Failure, SagaRunner, SagaSettings
from tusingest.saga.store import DuplicateSaga, SagaStore
from tusingest.sessions.audit import Action, AuditEvent
from tusingest.sessions.store import StoreError

log = logging.getLogger(__name__)

KIND: Final = "transfer"
STEPS: Final = ("copying", "copied", "sidecar_copied", "verified", "switched", "source_deleted")
COMMIT_STEP: Final = "switched"
ASSUMED_RATE = 50 << 20  # bytes per second, for the estimate given to the client
PROGRESS_INTERVAL = 1.0  # seconds between progress records in the saga log
MAX_CONCURRENT = 4  # transfers copying at once on one node; the others wait as "queued"

TransferStatus = Literal["queued", "in_progress", "verifying", "completed", "failed"]


class UnknownStorageElement(Refused):
    code = "unknown_storage_element"

    def __init__(self, element_id: str) -> None:
        super().__init__(f"storage element {element_id} is not in the element list")


class SameStorageElement(Refused):
    code = "same_storage_element"

    def __init__(self, element_id: str) -> None:
        super().__init__(f"the file is on storage element {element_id} already")


class DestinationNotWritable(Refused):
    code = "destination_not_writable"

    def __init__(self, element_id: str, mode: str, status: str) -> None:
        super().__init__(
            f"storage element {element_id} (mode {mode}, status {status}) does not take files; "
            "a destination must be in mode edit or rw and online or degraded"
        )


class InsufficientSpace(Refused):
    code = "insufficient_space"

    def __init__(self, element_id: str, size: int) -> None:
        super().__init__(f"storage element {element_id} has no room for {size} bytes")


class SourceNotDeletable(Refused):
    code = "source_not_deletable"

    def __init__(self, element_id: str, mode: str) -> None:
        super().__init__(f"delete_source needs the source element in mode edit; {element_id} is in mode {mode}")


class _Failed(Exception):
    """The transfer cannot succeed (the copy is wrong, the source is gone): undo it, do not retry."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _SourceFailed(Exception):
    """Reading the source failed while the destination was being written. Kept apart from BackendError so that
    the destination's retries and circuit breaker do not take it for the destination's failure."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error))
        self.error = error


_TRANSIENT = (BackendError, ElementUnavailable, _SourceFailed, StoreError, OSError)


class TransferSagaData(SagaData):
    """The transfer saga's working memory: what moves where, what the copy must match, and its progress."""

    file_id: str = ""
    source_element_id: str = ""
    destination_element_id: str = ""
    key: str = ""
    delete_source: bool = False
    verify_checksum: bool = False
    bytes_total: int = 0  # stored size: what is copied
    bytes_transferred: int = 0
    size: int = 0  # original size: what the verified copy decompresses to
    sha256: str = ""
    content_encoding: str | None = None
    started_at: str | None = None  # ISO 8601, UTC
    completed_at: str | None = None
    # "server_side" or "streamed", once copied; kept under "copy", which is a BaseModel method's name
    copied_by: str | None = Field(default=None, alias="copy")
    actor: str = (
        "anonymous"  # the token subject that asked for the transfer: the audit row's, and who may see its status
    )
    actor_name: str | None = None
    actor_address: str | None = None


def estimated_seconds(size: int) -> int:
    return max(1, math.ceil(size / ASSUMED_RATE))


class TransferSagas:
    """Steps, each recorded in the saga log before the next begins: ``copying`` (with bytes_transferred) →
    ``copied`` (server-side when the source can copy to the destination, else streamed get → put) →
    ``sidecar_copied`` (attr.json beside the copy, so the registry never names an object without its sidecar) →
    ``verified`` (the copy read back, decompressed, its SHA-256 compared with the registry's) → ``switched`` (the
    registry row points at the destination: the commit point) → ``source_deleted`` (only with delete_source).
    Before the commit a failure deletes the copy and leaves the source alone; after it the saga only goes forward.
    """

    kind: Final = KIND

    def __init__(
        self,
        *,
        store: SagaStore,
        pool: ElementPool,
        settings: SagaSettings,
        failpoints: Failpoints | None = None,
        max_concurrent: int = MAX_CONCURRENT,
        record_audit: AuditRecorder | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.record_audit = record_audit  # where a refusal goes (the file is somebody else's)
        self.metrics = metrics or Metrics()
        self.store = store
        self.pool = pool
        self.settings = settings
        self.failpoints = failpoints or Failpoints()
        self._slots = asyncio.Semaphore(max_concurrent)
        self.runner: SagaRunner[None] = SagaRunner(self, store, settings)

    async def start(
        self,
        file_id: str,
        *,
        actor: Identity,
        destination_id: str,
        delete_source: bool,
        verify_checksum: bool,
        address: str | None = None,
    ) -> Saga:
        """Check the request, record the saga and start it here; the saga id is the transfer id.

        Raises a ``Refused`` when the transfer cannot be made. Only the file's creator or an admin
        may move it (invariant 7): anyone else is told it does not exist.
        """
        record = await self.store.get_file(file_id)
        if record is None:
            raise FileNotFound(file_id)
        if not is_owner_or_admin(actor, record.created_by_id):
            raise await not_owner(self.record_audit, actor.subject, actor.name, address, file_id)
        deleting = await self.store.latest_saga("delete", file_id)
        if deleting is not None and not deleting.state.is_finished:
            raise DeleteInProgress(file_id)
        source_id = record.storage_element_id
        try:
            destination = self.pool.state(destination_id)
        except ElementUnavailable:
            raise UnknownStorageElement(destination_id) from None
        if destination_id == source_id:
            raise SameStorageElement(source_id)
        if not destination.takes_uploads:
            element = destination.element
            raise DestinationNotWritable(destination_id, element.mode.value, element.status)
        if not destination.room_for(record.stored_size_bytes):
            raise InsufficientSpace(destination_id, record.stored_size_bytes)
        try:
            source = self.pool.state(source_id).element
        except ElementUnavailable:
            raise StorageElementUnknown(file_id, source_id) from None
        if delete_source and not source.mode.allows_delete:
            raise SourceNotDeletable(source_id, source.mode.value)
        data = TransferSagaData(
            file_id=file_id,
            source_element_id=source_id,
            destination_element_id=destination_id,
            key=record.storage_key,
            delete_source=delete_source,
            verify_checksum=verify_checksum,
            bytes_total=record.stored_size_bytes,
            size=record.size_bytes,
            sha256=record.sha256,
            content_encoding=record.content_encoding,
            actor=actor.subject,
            actor_name=actor.name or None,
            actor_address=address,
        )
        try:
            saga, _ = await self.runner.start(file_id, data)
        except DuplicateSaga:
            running = await self.store.latest_saga(KIND, file_id)
            raise TransferInProgress(file_id, running.saga_id if running else "?") from None
        return saga

    async def recover(self) -> int:
        return await self.runner.recover()

    async def close(self) -> None:
        await self.runner.close()

    async def get(self, transfer_id: str, actor: Identity) -> Saga | None:
        """The transfer, if ``actor`` asked for it or is an admin (invariant 7): None for anyone else,
        so transfer ids cannot be probed."""
        saga = await self.store.get_saga(transfer_id)
        if saga is None or saga.kind != KIND:
            return None
        return saga if is_owner_or_admin(actor, TransferSagaData.from_data(saga.data).actor) else None

    # -- the saga ----------------------------------------------------------------------------

    def admission(self, saga: Saga) -> contextlib.AbstractAsyncContextManager[object]:
        return self._slots  # a queued transfer waits here; its time limit starts once it copies

    def failure(self, saga: Saga, exc: Exception) -> Failure | None:
        if not isinstance(exc, (_Failed, *_TRANSIENT)):
            return None
        # Past the commit nothing is undone: every failure is tried again, then left to recovery.
        return Failure.TRANSIENT if _committed(saga) or _transient(exc) else Failure.PERMANENT

    async def failing(self, saga: Saga, exc: Exception) -> None:
        return None

    async def failed(self, saga: Saga, exc: Exception, attempts: int) -> None:
        if _committed(saga):
            log.warning("transfer %s: %s; leaving the rest to recovery", saga.saga_id, exc)
            return
        code, message = _failure(exc, attempts)
        await self._fail(saga, code, message)

    async def timed_out(self, saga: Saga) -> None:
        if _committed(saga) or saga.state is not SagaState.RUNNING:
            log.warning("transfer %s ran out of time at step %s; recovery carries it on", saga.saga_id, saga.step)
            return
        await self._fail(saga, "transfer_timeout", f"the transfer took longer than {self.settings.timeout:g}s")

    async def current(self, saga: Saga) -> None:
        return None

    async def forward(self, saga: Saga) -> None:
        data = TransferSagaData.from_data(saga.data)
        attributes = {
            "transfer.id": saga.saga_id,
            "file.id": saga.subject_id,
            "element.id": data.destination_element_id,
            "source_element.id": data.source_element_id,
        }
        with tracing.span(tracing.TRANSFER, attributes):
            if saga.state is SagaState.COMPENSATING:
                await self._compensate(saga)
            else:
                await self._forward(saga)

    async def _forward(self, saga: Saga) -> None:
        data = TransferSagaData.from_data(saga.data)
        source_id, destination_id, key = data.source_element_id, data.destination_element_id, data.key
        reached = STEPS.index(saga.step) if saga.step in STEPS else -1

        if reached < STEPS.index("copied"):
            saga = await self._copy(saga, data)
            await self.failpoints.reach("transfer_copied", destination_id)
        if reached < STEPS.index("sidecar_copied"):
            await self._copy_sidecar(data)
            saga = await self._advance(saga, "sidecar_copied", data)
            await self.failpoints.reach("transfer_sidecar_copied", destination_id)
        if reached < STEPS.index("verified"):
            if data.verify_checksum:
                await self._verify(data)
            saga = await self._advance(saga, "verified", data)
            await self.failpoints.reach("transfer_verified", destination_id)
        if reached < STEPS.index("switched"):
            await self.runner.fence(saga)  # a renewed lease keeps any other node off the saga while the row moves
            moved = await self.store.update_file_location(
                data.file_id, storage_element_id=destination_id, storage_key=key
            )
            if moved is None:
                raise _Failed("file_not_found", f"file {data.file_id} was deleted during the transfer")
            saga = await self._advance(saga, "switched", data)
            await self.failpoints.reach("transfer_switched", destination_id)
        if reached < STEPS.index("source_deleted") and data.delete_source:
            await self.pool.call(source_id, lambda backend: backend.delete(key))
            await self.pool.call(source_id, lambda backend: backend.delete(sidecar_key(key)))
            saga = await self._advance(saga, "source_deleted", data)
        data.completed_at = _now()
        saga = await self._advance(saga, saga.step or COMMIT_STEP, data)
        transferred = AuditEvent(
            Action.FILE_TRANSFERRED,
            subject=data.actor,
            subject_name=data.actor_name,
            client_address=data.actor_address,
            file_id=data.file_id,
            element_ids=(source_id, destination_id),
        )
        await self.store.set_state(
            saga.saga_id, owner=self.settings.owner, state=SagaState.COMPLETED, audit=transferred
        )
        self.metrics.saga_transactions.labels(KIND, "completed").inc()
        log.info("transfer %s: file %s is on %s now", saga.saga_id, data.file_id, destination_id)

    async def _copy(self, saga: Saga, data: TransferSagaData) -> Saga:
        source_id, destination_id, key = data.source_element_id, data.destination_element_id, data.key
        size = data.bytes_total
        data.started_at = data.started_at or _now()
        data.bytes_transferred = 0
        saga = await self._advance(saga, "copying", data)
        source = self.pool.backend(source_id)
        await self.pool.discard_incomplete(destination_id, key)  # what a copy cut off by a kill left
        with self.pool.reserve(destination_id, size):
            if source.can_copy_to(self.pool.backend(destination_id)):
                how = "server_side"
                try:
                    await self.pool.call(destination_id, lambda target: source.copy_to(key, target, key))
                except ObjectNotFound:
                    raise _Failed("source_object_missing", f"{key} is not on element {source_id}") from None
            else:
                how = "streamed"
                await self._stream_copy(saga, data, source)
            copied = await self.pool.call(destination_id, lambda target: target.head(key))
        if copied is None or copied.size != size:
            found = "nothing" if copied is None else f"{copied.size} bytes"
            raise _Failed("size_mismatch", f"element {destination_id} holds {found} of {size} after the copy")
        self.pool.state(destination_id).placed_bytes += size
        data.bytes_transferred, data.copied_by = size, how
        return await self._advance(saga, "copied", data)

    async def _stream_copy(self, saga: Saga, data: TransferSagaData, source: Backend) -> None:
        source_id, destination_id, key = data.source_element_id, data.destination_element_id, data.key
        info = await self.pool.call(source_id, lambda backend: backend.head(key))
        if info is None:
            raise _Failed("source_object_missing", f"{key} is not on element {source_id}")

        async def put(target: Backend) -> ObjectInfo:
            # Opened afresh on every attempt: a stream consumed by a failed attempt cannot be replayed.
            stream = self._from_source(saga, data, source, info.size)
            try:
                return await target.put(
                    key,
                    stream,
                    length=info.size,
                    content_type=info.content_type or "application/octet-stream",
                    content_encoding=info.content_encoding,
                    metadata=info.metadata,
                )
            finally:
                await stream.aclose()

        await self.pool.call(destination_id, put)

    async def _from_source(
        self, saga: Saga, data: TransferSagaData, source: Backend, size: int
    ) -> AsyncGenerator[bytes, None]:
        destination_id = data.destination_element_id
        chunks = aiter(source.get(data.key))
        sent = 0
        halfway = False
        recorded = time.monotonic()
        try:
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except ObjectNotFound as exc:
                    raise _Failed("source_object_missing", str(exc)) from exc
                except BackendError as exc:
                    raise _SourceFailed(exc) from exc
                yield chunk
                sent += len(chunk)
                if not halfway and sent * 2 >= size:
                    halfway = True
                    # Tests break the destination here, with part of the object already sent to it.
                    await self.failpoints.reach("transfer_midstream", destination_id)
                if time.monotonic() - recorded >= PROGRESS_INTERVAL:
                    data.bytes_transferred = sent
                    saga = await self._advance(saga, "copying", data)
                    recorded = time.monotonic()
        finally:
            await close_stream(chunks)

    async def _copy_sidecar(self, data: TransferSagaData) -> None:
        name = sidecar_key(data.key)

        async def read(backend: Backend) -> bytes:
            return b"".join([chunk async for chunk in backend.get(name)])

        try:
            document = await self.pool.call(data.source_element_id, read)
        except ObjectNotFound:
            # The source lost its sidecar: write the registry's account of the file instead.
            record = await self.store.get_file(data.file_id)
            if record is None:
                raise _Failed("file_not_found", f"file {data.file_id} was deleted during the transfer") from None
            document = _sidecar_of(record)

        async def put(backend: Backend) -> ObjectInfo:
            return await backend.put(name, _once(document), length=len(document), content_type="application/json")

        await self.pool.call(data.destination_element_id, put)

    async def _verify(self, data: TransferSagaData) -> None:
        destination_id, key, encoding = data.destination_element_id, data.key, data.content_encoding

        async def digest(backend: Backend) -> tuple[str, int]:
            # The registry's sha256 is of the original bytes: a compressed object is hashed as it decompresses.
            hasher = hashlib.sha256()
            size = 0
            chunks = backend.get(key)
            async for chunk in decompress_stream(chunks, encoding) if encoding else chunks:
                await asyncio.to_thread(hasher.update, chunk)
                size += len(chunk)
            return hasher.hexdigest(), size

        try:
            sha256, size = await self.pool.call(destination_id, digest)
        except ObjectNotFound:
            raise _Failed("size_mismatch", f"the copy of {key} disappeared from element {destination_id}") from None
        except (ValueError, zlib.error, brotli.error) as exc:
            raise _Failed("checksum_mismatch", f"the copy on {destination_id} does not decompress: {exc}") from exc
        if sha256 != data.sha256 or size != data.size:
            raise _Failed(
                "checksum_mismatch",
                f"the copy on {destination_id} has SHA-256 {sha256} ({size} bytes); "
                f"the registry has {data.sha256} ({data.size} bytes)",
            )

    async def _fail(self, saga: Saga, code: str, message: str) -> None:
        """Before the commit: record the failure, then delete the copy and leave the source as it was."""
        log.warning("transfer %s failed: %s (%s)", saga.saga_id, message, code)
        saga = await self.store.set_state(
            saga.saga_id, owner=self.settings.owner, state=SagaState.COMPENSATING, error_code=code, error=message
        )
        await self._compensate(saga)

    async def _compensate(self, saga: Saga) -> None:
        data = TransferSagaData.from_data(saga.data)
        destination_id, key = data.destination_element_id, data.key
        record = await self.store.get_file(data.file_id)
        if record is not None and (record.storage_element_id, record.storage_key) == (destination_id, key):
            # The row moved before the node recording it died: the transfer is committed after all.
            saga = await self.store.set_state(saga.saga_id, owner=self.settings.owner, state=SagaState.RUNNING)
            await self._forward(await self._advance(saga, COMMIT_STEP, data))
            return
        await self.runner.fence(saga)
        try:
            await self.pool.call(destination_id, lambda backend: backend.delete(sidecar_key(key)))
            await self.pool.call(destination_id, lambda backend: backend.delete(key))
            self.metrics.saga_compensations.labels(KIND, "remove_copy").inc()
        except (BackendError, ElementUnavailable) as exc:
            # Stays compensating: recovery tries again once the element answers.
            log.warning("transfer %s: cannot remove the copy from %s yet: %s", saga.saga_id, destination_id, exc)
            return
        data.completed_at = _now()
        saga = await self._advance(saga, saga.step or "created", data)
        await self.store.set_state(
            saga.saga_id,
            owner=self.settings.owner,
            state=SagaState.COMPENSATED,
            error_code=saga.error_code,
            error=saga.error,
        )
        self.metrics.saga_transactions.labels(KIND, "compensated").inc()

    async def _advance(self, saga: Saga, step: str, data: TransferSagaData) -> Saga:
        return await self.runner.advance(saga, step, data)


def transfer_json(saga: Saga, now: datetime | None = None) -> dict[str, Any]:
    """The transfer as GET /api/files/transfer/{id} shows it."""
    data = TransferSagaData.from_data(saga.data)
    status = _status(saga, data)
    finished_at = data.completed_at or (_iso(saga.updated_at) if saga.state.is_finished else None)
    transferred = data.bytes_transferred
    return {
        "transfer_id": saga.saga_id,
        "file_id": saga.subject_id,
        "status": status,
        "bytes_transferred": transferred,
        "bytes_total": data.bytes_total,
        "transfer_rate_mbps": _rate_mbps(transferred, data.started_at, finished_at, now),
        "started_at": data.started_at,
        "completed_at": finished_at,
        "error": {"error": saga.error_code, "message": saga.error} if status == "failed" else None,
        "source_storage_element_id": data.source_element_id,
        "destination_storage_element_id": data.destination_element_id,
    }


def _status(saga: Saga, data: TransferSagaData) -> TransferStatus:
    if saga.state is SagaState.COMPLETED:
        return "completed"
    if saga.state is not SagaState.RUNNING:
        return "failed"  # compensating counts: the copy is being removed, the transfer will not happen
    if saga.step is None:
        return "queued"
    if saga.step in ("copied", "sidecar_copied") and data.verify_checksum:
        return "verifying"
    return "in_progress"


def _rate_mbps(transferred: int, started_at: str | None, finished_at: str | None, now: datetime | None) -> float:
    """Megabits per second, averaged from the start to the end (or now)."""
    if started_at is None or transferred == 0:
        return 0.0
    end = datetime.fromisoformat(finished_at) if finished_at else (now or datetime.now(UTC))
    seconds = (end - datetime.fromisoformat(started_at)).total_seconds()
    return round(transferred * 8 / 1e6 / max(seconds, 1e-3), 2)


def _committed(saga: Saga) -> bool:
    return saga.step in STEPS[STEPS.index(COMMIT_STEP) :]


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _Failed):
        return False
    if isinstance(exc, _SourceFailed):
        return exc.error.transient
    if isinstance(exc, BackendError):
        return exc.transient
    return True


def _failure(exc: BaseException, attempts: int) -> tuple[str, str]:
    if isinstance(exc, _Failed):
        return exc.code, exc.message
    message = f"gave up after {attempts} attempts: {exc}" if _transient(exc) else str(exc)
    if isinstance(exc, BackendError | ElementUnavailable | _SourceFailed):
        return "storage_element_unavailable", message
    return "transfer_failed", message


def _sidecar_of(record: FileRecord) -> bytes:
    compression = None
    if record.content_encoding is not None:
        compression = {
            "algorithm": "brotli" if record.content_encoding == "br" else record.content_encoding,
            "original_size": record.size_bytes,
            "stored_size": record.stored_size_bytes,
        }
    return sidecar_document(
        file_id=record.file_id,
        original_filename=record.original_filename,
        storage_filename=record.storage_filename,
        storage_path=record.storage_key,
        file_size=record.size_bytes,
        content_type=record.content_type,
        created_at=record.uploaded_at,
        created_by_id=record.created_by_id,
        created_by_username=record.created_by_username,
        md5=record.md5,
        sha256=record.sha256,
        compression=compression,
        metadata=record.metadata,
    )


def _now() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
