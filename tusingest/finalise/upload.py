"""The upload saga: a complete upload becomes a verified, registered file on a Storage Element,
or nothing at all.

Steps: ``inspected`` (one pass: hashes, MIME, virus scan, compression) → ``placing`` (element
chosen, object key known) → ``placed`` (object put) → ``sidecar_written`` (attr.json put) →
``registered`` (files row + outbox messages in one transaction: the commit point), then the
saga is completed. Each step can be repeated. A transient failure retries with backoff; a
failing element is given up for another; a permanent failure undoes in reverse order (sidecar,
object). A saga left by a dead node is taken over by ``recover`` and carried on from its last
recorded step.

A large file records each step in the saga log before the next begins (inspecting it again
costs a read of all its bytes). A small one (below SMALL_FILE) has two commits: the saga's
begin, which already names the file id, the key and the element, and the registration. Its
steps in between are held in memory only: a saga found at its begin by recovery inspects the
file again and puts it again onto the recorded element, over whatever a killed run left at
that key (after discarding its unfinished put), or, failing, removes object and sidecar from
that element. So the log always names every element a put may have reached; choosing another
element after a failure is recorded before anything is put there.

The steps run on ``saga.runner.SagaRunner`` (lease, retries, time limit, recovery, fencing). This module
lives in finalise/, above saga/, because its steps are the finaliser's: hashing, MIME, virus scan,
compression and naming. saga/ knows nothing of them, so every import points down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel

from tusingest.auth import ANONYMOUS_SUBJECT
from tusingest.elements.backend import (
    Backend,
    BackendError,
    FilePlacer,
    InvalidKey,
    ObjectInfo,
    ObjectPlacer,
    ObjectRefused,
)
from tusingest.elements.pool import ElementPool, ElementUnavailable, NoElementAvailable
from tusingest.finalise.clamd import ClamdScanner, ScannerUnavailable
from tusingest.finalise.follow import Followers
from tusingest.finalise.mime import HEAD_BYTES, detect_mime
from tusingest.finalise.naming import sidecar_document, sidecar_key, storage_key, stored_name
from tusingest.finalise.pipeline import (
    FileRejected,
    FinalisePolicy,
    Inspection,
    check_mime,
    declared_checksums,
    inspect,
    kept_compression,
    wants_compression,
)
from tusingest.finalise.refusals import Refused
from tusingest.observability import tracing
from tusingest.observability.metrics import Metrics
from tusingest.saga.failpoints import Failpoints
from tusingest.saga.outbox import OutboxRelay
from tusingest.saga.records import FileRecord, NewOutboxMessage, Saga, SagaData, SagaState
from tusingest.saga.runner import Failure, SagaRunner, SagaSettings
from tusingest.saga.store import DuplicateSaga, SagaStore
from tusingest.saga.webhooks import (
    FILE_CREATED,
    UPLOAD_COMPLETED,
    UPLOAD_FAILED,
    file_event_message,
    webhook_event,
    webhook_messages,
)
from tusingest.sessions import SessionStore, Upload, UploadKind, UploadState
from tusingest.sessions.audit import Action, AuditEvent, Outcome
from tusingest.sessions.content import read_upload, whole_digests
from tusingest.sessions.metadata import metadata_text
from tusingest.sessions.model import utcnow
from tusingest.sessions.progress import ProgressBus, ProgressEvent
from tusingest.sessions.store import StoreError
from tusingest.staging import Staging, StagingError

log = logging.getLogger(__name__)

KIND: Final = "upload"
SPOOL_NAME = "finalise.spool"
READ_BLOCK = 1 << 20
SMALL_FILE = 8 << 20  # below this a saga does not take one of the FINALISE_CONCURRENCY slots

Status = Literal["finalizing", "completed", "failed"]


class Compression(BaseModel):
    algorithm: str  # the Content-Encoding token: br or gzip
    stored_size: int
    spool: str  # the spool file in staging that holds the compressed copy


class UploadSagaData(SagaData):
    """The upload saga's working memory, filled in step by step."""

    # begun: who sent what, and the name and key it gets
    upload_id: str = ""
    file_id: str | None = None  # None for a refusal on the first bytes: no file was ever named
    length: int | None = None
    filename: str = ""
    username: str = ""
    user_id: str | None = None
    retention_policy: str | None = None
    description: str | None = None
    metadata: dict[str, str] = {}
    created_at: str = ""  # ISO 8601
    storage_filename: str = ""
    key: str = ""
    http_status: int = 422  # what a failed upload answers
    # inspected: what the bytes are (hashes only after the put in single-pass mode)
    size: int = 0
    md5: str = ""
    sha256: str = ""
    content_type: str = ""
    scanned: bool = False
    scan_note: str | None = None
    compression: Compression | None = None
    single_pass: bool = False
    # placing, placed
    element_id: str | None = None
    tried: list[str] = []  # elements that failed this file, not to be chosen again
    stored_size: int | None = None
    hashed_size: int = 0  # single pass: the bytes hashed on the way to the element
    cleanup: list[str] = []  # elements holding a stray copy (written by earlier versions)

    def placed_size(self) -> int:
        return self.compression.stored_size if self.compression else self.size

    def inspected(self, inspection: Inspection) -> None:
        compression = inspection.compression
        self.size, self.md5, self.sha256 = inspection.size, inspection.md5, inspection.sha256
        self.content_type, self.scanned, self.scan_note = (
            inspection.content_type,
            inspection.scanned,
            inspection.scan_note,
        )
        self.compression = (
            None
            if compression is None
            else Compression(
                algorithm=compression.algorithm, stored_size=compression.stored_size, spool=compression.path
            )
        )


def _data(saga: Saga) -> UploadSagaData:
    return UploadSagaData.from_data(saga.data)


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    """Where an upload's finalisation stands, for the client."""

    status: Status
    file: FileRecord | None = None
    refusal: Refused | None = None  # why a failed upload failed: its code, its message, its status


def _refusal(code: str | None, message: str | None, status: int) -> Refused:
    return Refused(message or "the file was not stored", code=code or "failed", status=status)


class _GiveUp(Exception):
    """A permanent failure that is not the client's fault: undo and fail the upload."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def upload_metadata(upload: Upload) -> dict[str, str]:
    """The upload's metadata as text (values that are not UTF-8 are left out)."""
    return metadata_text(upload.metadata)


_RETENTIONS: Final[dict[str, Literal["temporary", "permanent"]]] = {"temporary": "temporary", "permanent": "permanent"}
_TRANSIENT = (ScannerUnavailable, StoreError, StagingError, NoElementAvailable, OSError)


class UploadSagas:
    kind: Final = KIND

    def __init__(
        self,
        *,
        sessions: SessionStore,
        staging: Staging,
        sagas: SagaStore,
        pool: ElementPool,
        relay: OutboxRelay | None,
        scanner: ClamdScanner | None,
        policy: FinalisePolicy,
        settings: SagaSettings,
        failpoints: Failpoints | None = None,
        metrics: Metrics | None = None,
        progress: ProgressBus | None = None,
        followers: Followers | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.progress = progress or ProgressBus()  # where each stage is told (the SSE progress stream)
        # What this node compresses and scans while the bytes arrive (the finaliser's hooks tell it each
        # commit). At most as many scans follow as sagas run at once: each holds one of clamd's threads.
        if followers is None:
            followers = Followers(staging, policy, self.progress, scanner=scanner, scan_capacity=settings.concurrency)
        self.followers = followers
        self.sessions = sessions
        self.staging = staging
        self.sagas = sagas
        self.pool = pool
        self.relay = relay
        self.scanner = scanner
        self.policy = policy
        self.settings = settings
        self.failpoints = failpoints or Failpoints()
        self.runner: SagaRunner[UploadOutcome] = SagaRunner(self, sagas, settings)
        # Each running saga holds a read block, hash and compressor state and a put's buffers (two
        # 16 MiB parts on S3): bounding how many run at once bounds the node's memory.
        self._slots = asyncio.Semaphore(settings.concurrency)
        # Sagas begun here whose first run has not started, with the upload as its completing commit left
        # it: nothing of theirs can be on an element yet, and that run need not read the upload again.
        self._first_runs: dict[str, Upload] = {}
        # What a running saga's steps found so far, by saga id: a small file's reach the log only at its
        # registration, and a failure is recorded (and compensated) with what its run knew.
        self._found: dict[str, UploadSagaData] = {}
        # The staged files of an upload whose MIME check listed them all, by upload id: its put places
        # the same files (a complete upload's staging no longer changes), so they are listed once.
        self._listed: dict[str, list[tuple[Path, int]]] = {}

    # -- starting, waiting, recovering ----------------------------------------------------------

    async def begin(self, upload: Upload) -> None:
        """Start the saga of a complete upload, once: never a second saga for one upload.

        Called again after a crash (the upload's completion was still owed), it finds the saga begun
        then and starts nothing; an unfinished one is resumed by ``recover`` once its lease lapses.
        """
        if self.runner.running(upload.id):
            return
        metadata = upload_metadata(upload)
        created_at = datetime.now(UTC)
        file_id = str(uuid.uuid4())
        filename = metadata.get("filename") or metadata.get("name") or f"{upload.id}.bin"
        user_id, username = self._creator(upload, metadata)
        name = stored_name(filename, username, created_at, file_id)
        data = UploadSagaData(
            upload_id=upload.id,
            file_id=file_id,
            length=upload.length,
            filename=filename,
            username=username,
            user_id=user_id,
            retention_policy=metadata.get("retention_policy") or None,
            description=metadata.get("description") or None,
            metadata=metadata,
            created_at=created_at.isoformat(),
            storage_filename=name,
            key=storage_key(name, created_at),
        )
        if not _steps_recorded(data):
            # The element goes into the begin's commit, so that recovery knows where a put may have gone.
            with contextlib.suppress(NoElementAvailable):  # none now: the saga chooses (and waits) later
                data.element_id = self._choose(data, upload.length or 0)
        # Begun before (a moment ago by another request or node, or before a crash): DuplicateSaga, nothing written.
        with contextlib.suppress(DuplicateSaga):
            saga, _ = await self.runner.start(upload.id, data, first=True)
            self._first_runs[saga.saga_id] = upload

    def _creator(self, upload: Upload, metadata: Mapping[str, str]) -> tuple[str | None, str]:
        """Who the file is registered as created by: the upload's owner (the token's subject and
        name), never what the metadata claims. With no authentication (the anonymous owner) nobody
        vouches for a name, so the metadata's username and user_id are kept as the client sent them."""
        if upload.owner_id is not None and upload.owner_id != ANONYMOUS_SUBJECT:
            return upload.owner_id, upload.owner_name or upload.owner_id
        return metadata.get("user_id"), metadata.get("username") or self.settings.default_username

    async def wait(self, upload_id: str, timeout: float, poll: float = 0.2) -> UploadOutcome | None:
        """The upload's settled outcome, waiting at most ``timeout`` seconds; None while it is still
        finalizing. A saga running on this node is awaited (shielded: a client that hangs up does not
        stop it); one running on another node is looked at every ``poll`` seconds."""
        task = self.runner.task_for(upload_id)
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

    async def recover(self) -> int:
        """Take over sagas whose node died (lease expired) and carry them on here."""
        return await self.runner.recover()

    async def close(self) -> None:
        """Stop running sagas; their leases lapse and recovery (here or elsewhere) resumes them."""
        await self.runner.close()
        await self.followers.close()

    async def outcome(self, upload_id: str) -> UploadOutcome | None:
        saga = await self.sagas.latest_saga(KIND, upload_id)
        if saga is None:
            return None
        return await self._outcome_of(saga)

    async def _outcome_of(self, saga: Saga) -> UploadOutcome:
        data = _data(saga)
        if saga.state is SagaState.COMPLETED:
            return UploadOutcome("completed", file=await self.sagas.get_file(data.file_id or ""))
        if saga.state in (SagaState.COMPENSATED, SagaState.FAILED):
            return UploadOutcome("failed", refusal=_refusal(saga.error_code, saga.error, data.http_status))
        return UploadOutcome("finalizing")

    async def refuse_early(self, upload: Upload, rejection: FileRejected) -> None:
        """Record a refusal decided on the first bytes: the upload fails, nothing was placed."""

        async def refuse(saga: Saga) -> UploadOutcome:
            return await self._fail(
                saga, rejection.code, rejection.message, http_status=rejection.status, compensate=False
            )

        try:
            _, task = await self.runner.start(
                upload.id, UploadSagaData(upload_id=upload.id, http_status=rejection.status), refuse
            )
        except DuplicateSaga:
            return
        await asyncio.shield(task)

    # -- the saga's steps (SagaSteps) ---------------------------------------------------------

    def admission(self, saga: Saga) -> contextlib.AbstractAsyncContextManager[object]:
        # Small files hold little memory and wait mostly on the database: they skip the queue.
        if (_data(saga).length or 0) < SMALL_FILE:
            return contextlib.nullcontext()
        return self._slots

    def failure(self, saga: Saga, exc: Exception) -> Failure | None:
        if isinstance(exc, FileRejected | _GiveUp):
            return Failure.PERMANENT
        return Failure.TRANSIENT if isinstance(exc, _TRANSIENT) else None

    async def failing(self, saga: Saga, exc: Exception) -> None:
        return None

    async def failed(self, saga: Saga, exc: Exception, attempts: int) -> UploadOutcome:
        if isinstance(exc, FileRejected):
            return await self._fail(saga, exc.code, exc.message, http_status=exc.status)
        if isinstance(exc, _GiveUp):
            # Not the file's fault: storage could not take it. 503 tells the client so.
            return await self._fail(saga, exc.code, exc.message, http_status=503)
        message = f"gave up after {attempts} attempts: {exc}"
        return await self._fail(saga, _failure_code(exc), message, http_status=503)

    async def timed_out(self, saga: Saga) -> UploadOutcome:
        if saga.step in ("registered", "cleaned"):
            return await self._finish(saga)
        return await self._fail(saga, "saga_timeout", f"finalisation took longer than {self.settings.timeout:g}s")

    async def current(self, saga: Saga) -> UploadOutcome:
        self._found.pop(saga.saga_id, None)
        return await self._outcome_of(saga)

    async def forward(self, saga: Saga) -> UploadOutcome:
        if saga.state is SagaState.COMPENSATING:
            return await self._fail(saga, saga.error_code or "failed", saga.error or "finalisation failed")
        return await self._forward(saga)

    async def _forward(self, saga: Saga) -> UploadOutcome:
        # A first run starts as soon as its begin is committed: the upload is as its completing commit
        # left it (complete, so no append changes it; a termination waits for the saga to settle).
        upload = self._first_runs.pop(saga.saga_id, None)
        first_run = upload is not None
        if upload is None:
            upload = await self.sessions.get(saga.subject_id)
        if upload is None:
            raise _GiveUp("upload_gone", "the upload disappeared before it was finalised")
        data = self._found[saga.saga_id] = _data(saga)
        step = saga.step
        recorded = _steps_recorded(data)
        # An earlier run (killed, or an attempt that failed) got as far as a put: what that put left
        # unfinished on the element is removed before the same key is put again. A small file's put
        # is not recorded, so any run of it but the first may follow one.
        repeated = step in ("placing", "placed") or (not recorded and not first_run and data.element_id is not None)

        if step in (None, "inspected") and not self._inspection_usable(saga.step, data):
            await self._stage(upload.id, "inspecting")
            if self.scanner is not None:  # the scan runs in the inspection's one pass over the bytes
                await self._stage(upload.id, "scanning")
            with (
                self.metrics.finalise_stage.labels("validation").time(),
                tracing.span(tracing.VALIDATION, {"upload.id": upload.id, "upload.size": upload.length}) as checked,
            ):
                if not await self._single_pass_head(upload, data):
                    data.inspected(await self._inspect(upload, data))
                checked.set_attributes({"content_type": data.content_type or "", "single_pass": data.single_pass})
            saga = await self._step(saga, "inspected", data, recorded=recorded)
            step = "inspected"
        await self.failpoints.reach("inspected")

        while step in ("inspected", "placing", "placed"):
            begun_on = None if recorded or data.element_id in data.tried else data.element_id
            if step == "inspected" and begun_on is not None:
                step = "placing"  # onto the element the begin recorded
                await self._stage(upload.id, "placing")
            elif step == "inspected" or data.element_id in data.tried:
                data.element_id = self._choose(data, data.placed_size())
                # Recorded also for a small file: the log must name the element before anything goes there.
                saga = await self._advance(saga, "placing", data)
                step = "placing"
                await self._stage(upload.id, "placing")
            element_id = data.element_id
            assert element_id is not None  # chosen just now or recorded with the step
            placing: tracing.Attributes = {"upload.id": upload.id, "element.id": element_id, "size.original": data.size}
            try:
                with (
                    self.metrics.finalise_stage.labels("transfer").time(),
                    tracing.span(tracing.TRANSFER, {**placing, "size.stored": data.placed_size()}),
                ):
                    if step == "placing":
                        info, hashed = await self._put_object(upload, data, element_id, repeated=repeated)
                        data.stored_size = info.size
                        saga = await self._step(saga, "placed", data, recorded=recorded)
                        step = "placed"
                        if hashed:
                            self._check_single_pass(data)
                        await self.failpoints.reach("placed", element_id)
                    await self._put_sidecar(data, element_id, repeated=repeated)
                    saga = await self._step(saga, "sidecar_written", data, recorded=recorded)
                    step = "sidecar_written"
            except (ObjectRefused, InvalidKey) as exc:
                # The file's own fault (its name, its sidecar): another element would refuse it
                # too, and this one is not failing. The upload fails; compensation removes the object.
                raise FileRejected("object_refused", f"the storage element refused the file: {exc}") from exc
            except (BackendError, ElementUnavailable) as exc:
                log.warning("upload saga %s: element %s failed (%s); trying another", saga.saga_id, element_id, exc)
                await self._remove_from(element_id, data.key)
                data.tried.append(element_id)
                data.element_id = None
                saga = await self._advance(saga, "inspected", data)
                step = "inspected"

        record = None
        if step == "sidecar_written":
            await self.failpoints.reach("sidecar_written", data.element_id)
            saga, record = await self._register(saga, data, upload)
            step = "registered"
        return await self._finish(saga, upload, record)

    def _inspection_usable(self, step: str | None, data: UploadSagaData) -> bool:
        if step is None:
            return False
        # The spool of a compressed copy lives in staging; if it is gone, inspect again.
        return data.compression is None or Path(data.compression.spool).exists()

    async def _inspect(self, upload: Upload, data: UploadSagaData) -> Inspection:
        length = upload.length or 0
        spool = self.staging.directory(upload.id) / SPOOL_NAME
        # Scanned while the bytes arrived (``finalise.follow``): clamd's verdict on exactly these
        # bytes is in, and the pass does not scan; should the follower's scan have failed, it does.
        verdict = await self.followers.verdict(upload) if self.scanner is not None else None
        if verdict is not None and not verdict.clean:
            raise FileRejected("virus_detected", f"the file contains {verdict.signature}")
        # Compressed while the bytes arrived: the pass only checks (and scans, when the follower did
        # not), meanwhile the follower finishes what it has left; should it have failed, a pass compresses.
        followed = self.followers.following(upload)
        for compress in (False, True) if followed else (True,):
            inspection = await inspect(
                read_upload(self.sessions, self.staging, upload, READ_BLOCK),
                expected_size=length,
                policy=self.policy,
                scanner=self.scanner if verdict is None else None,
                metadata=data.metadata,
                spool_path=spool,
                digests=whole_digests(self.staging, upload),  # hashed as committed: not hashed again
                compress=compress,
            )
            if verdict is not None:
                inspection = dataclasses.replace(inspection, scanned=True)
            if compress or not wants_compression(self.policy, inspection.content_type, length):
                return inspection
            compressed = await self.followers.take(upload)
            if compressed is not None:
                return dataclasses.replace(
                    inspection, compression=kept_compression(compressed, inspection.size, self.policy)
                )
        return inspection

    def _choose(self, data: UploadSagaData, size: int) -> str:
        """The element for the file (at the begin for a small file, in the saga for a large one or a
        failover), measured and traced as the storage selection stage wherever it happens."""
        with (
            self.metrics.finalise_stage.labels("storage_selection").time(),
            tracing.span(tracing.STORAGE_SELECTION, {"upload.id": data.upload_id}) as selecting,
        ):
            try:
                with self.metrics.storage_selection.time():
                    state = self.pool.select(
                        size, retention=_RETENTIONS.get(data.retention_policy or ""), exclude=data.tried
                    )
            except NoElementAvailable as exc:
                if data.tried:
                    raise _GiveUp("storage_unavailable", str(exc)) from exc
                raise
            selecting.set_attribute("element.id", state.element.element_id)
        return state.element.element_id

    async def _single_pass_head(self, upload: Upload, data: UploadSagaData) -> bool:
        """With no scanner and nothing to compress, the bytes need no pass of their own. When this
        node hashed them as they were committed (``whole_digests``), size and declared digests are
        checked now and the put only places them; otherwise the put is the one pass, hashing as
        the bytes go to the element (checked after it). Decided on the first 64 KiB; False when
        the file needs the full inspection first (a scan must finish before anything is placed)."""
        if self.scanner is not None:
            return False
        declared_checksums(upload_metadata(upload))  # a malformed declared digest is refused before any put
        length = upload.length or 0
        if length > self.policy.max_size:
            raise FileRejected("file_too_large", f"the file has {length} bytes; the limit is {self.policy.max_size}")
        digests = whole_digests(self.staging, upload)
        # Hashed as committed: the put places the staged files as they are, listed here once for both.
        content_type = await self._head_mime(upload, whole=digests is not None)
        check_mime(content_type, self.policy)
        if wants_compression(self.policy, content_type, length):
            return False
        data.size, data.content_type, data.compression, data.single_pass = length, content_type, None, True
        data.md5, data.sha256, data.hashed_size = "", "", 0
        if digests is not None:
            data.md5, data.sha256, data.hashed_size = digests.md5, digests.sha256, digests.size
            self._check_single_pass(data)  # refused before anything is placed
        return True

    async def _head_mime(self, upload: Upload, *, whole: bool = False) -> str:
        """libmagic's verdict on the upload's first HEAD_BYTES. A single upload's staged files are listed,
        read and judged in one thread call (not four: list, open, read, judge); a final one's come from
        its partials.
        ``whole``: list all the upload's staged files, and keep the listing for its put."""
        if upload.kind is not UploadKind.FINAL:
            listed = upload.offset if whole else min(upload.offset, HEAD_BYTES)
            found = await self.staging.use_chunk_files(
                upload.id, listed, lambda files: _detect_files(upload.id, _head_of(files))
            )
            if found is not None:
                files, content_type = found
                if whole and upload.kind is UploadKind.SINGLE:
                    self._listed[upload.id] = files
                return content_type
        head = bytearray()
        async for block in read_upload(self.sessions, self.staging, upload, HEAD_BYTES):
            head += block
            break
        return await asyncio.to_thread(detect_mime, bytes(head))

    def _check_single_pass(self, data: UploadSagaData) -> None:
        """Single pass: the size hashed and any client-declared digest must hold (after the put
        that hashed the bytes, or before placing bytes hashed as they were committed)."""
        if data.hashed_size != data.size:
            raise FileRejected("size_mismatch", f"read {data.hashed_size} bytes, the upload declares {data.size}")
        found = {"md5": data.md5, "sha256": data.sha256}
        for algorithm, value in declared_checksums(data.metadata).items():
            if found[algorithm] != value:
                raise FileRejected(
                    "checksum_mismatch", f"the file's {algorithm} is {found[algorithm]}, the client declared {value}"
                )

    async def _put_object(
        self, upload: Upload, data: UploadSagaData, element_id: str, *, repeated: bool
    ) -> tuple[ObjectInfo, bool]:
        """Put the object; in single-pass mode without digests yet, also take its hashes on the way
        (True then). Staged bytes that need no hashing go to an element that takes files
        (``FilePlacer``: a directory links or kernel-copies them) without passing through here."""
        compression = data.compression
        size = data.placed_size()
        single_pass = data.single_pass and not data.sha256  # known digests: nothing to hash on the way

        async def hashed(blocks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            md5, sha256, total = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0

            def update(block: bytes) -> None:
                md5.update(block)
                sha256.update(block)

            async for block in blocks:
                await asyncio.to_thread(update, block)
                total += len(block)
                yield block
            data.md5, data.sha256, data.hashed_size = md5.hexdigest(), sha256.hexdigest(), total

        def stream() -> AsyncIterator[bytes]:
            if compression:
                return _read_file(Path(compression.spool))
            if single_pass:
                return hashed(self._staged(upload.id))
            return self._staged(upload.id)

        metadata = {"file-id": data.file_id or ""} | ({"sha256": data.sha256} if data.sha256 else {})
        files, staged = None, None
        listed = self._listed.pop(upload.id, None)
        if not compression and upload.kind is UploadKind.SINGLE:
            if not single_pass:
                files = listed if listed is not None else await self.staging.chunk_files(upload.id, size)
            if files is None:
                staged = await self.staging.staged_object(upload.id, size)

        async def put(backend: Backend) -> ObjectInfo:
            if staged is not None and isinstance(backend, ObjectPlacer) and backend.can_place_from(staged):
                # Staged as one S3 object where the element is: copied on the S3 side. Bytes still to
                # hash are read for that alone; nothing goes up from here.
                placed_metadata = metadata
                if single_pass:
                    async for _ in hashed(self._staged(upload.id)):
                        pass
                    placed_metadata = metadata | {"sha256": data.sha256}
                midway = self.failpoints.hook("put_midway", element_id)
                if midway is not None:
                    await midway()
                return await backend.place_object(
                    data.key, staged, content_type=data.content_type, metadata=placed_metadata
                )
            if files is not None and isinstance(backend, FilePlacer):
                return await backend.place_file(
                    data.key,
                    files,
                    length=size,
                    content_type=data.content_type,
                    metadata=metadata,
                    before_commit=self.failpoints.hook("put_midway", element_id),
                    # As the put's below: a small file's object is synced with its sidecar.
                    durable=_steps_recorded(data),
                )
            return await backend.put(
                data.key,
                self.failpoints.midway("put_midway", stream(), size, element_id),
                length=size,
                content_type=data.content_type,
                content_encoding=compression.algorithm if compression else None,
                metadata=metadata,
                # A small file's object is synced with its sidecar (same folder), which comes before its
                # registration; a large file records `placed` after this put, so its object must last alone.
                durable=_steps_recorded(data),
            )

        if repeated:
            # A put of this key cut off by a kill (before a takeover or restart) left its temp file
            # or multipart upload: remove it before putting again.
            await self.pool.discard_incomplete(element_id, data.key)
        with self.pool.reserve(element_id, size):
            info = await self.pool.call(element_id, put)
        if info.size != size:
            raise BackendError(f"element {element_id} stored {info.size} bytes of {size}", transient=False)
        self.pool.state(element_id).placed_bytes += info.size
        return info, single_pass and not compression

    async def _staged(self, upload_id: str) -> AsyncIterator[bytes]:
        upload = await self.sessions.get(upload_id)
        if upload is None:
            raise StagingError(f"upload {upload_id} disappeared")
        async for block in read_upload(self.sessions, self.staging, upload, READ_BLOCK):
            yield block

    async def _put_sidecar(self, data: UploadSagaData, element_id: str, *, repeated: bool) -> None:
        document = sidecar_document(
            file_id=data.file_id or "",
            original_filename=data.filename,
            storage_filename=data.storage_filename,
            storage_path=data.key,
            file_size=data.size,
            content_type=data.content_type,
            created_at=datetime.fromisoformat(data.created_at),
            created_by_id=data.user_id,
            created_by_username=data.username,
            md5=data.md5,
            sha256=data.sha256,
            compression=_compression_record(data),
            metadata=data.metadata,
        )

        async def put(backend: Backend) -> ObjectInfo:
            await self.failpoints.reach("sidecar", element_id)
            return await backend.put(
                sidecar_key(data.key), _once(document), length=len(document), content_type="application/json"
            )

        if repeated:
            await self.pool.discard_incomplete(element_id, sidecar_key(data.key))
        await self.pool.call(element_id, put)

    async def _register(self, saga: Saga, data: UploadSagaData, upload: Upload) -> tuple[Saga, FileRecord]:
        """The commit point: the files row, its outbox messages and the audit row in one transaction.
        Also returns the row as written, so that the answer to the client need not read it back."""
        record = self._file_record(saga.subject_id, data)
        messages = self._completion_messages(record)
        saga = await self.sagas.register_file(
            saga.saga_id,
            owner=self.settings.owner,
            record=record,
            messages=messages,
            step="registered",
            # Everything the steps found: a small file's steps reach the log only here.
            data_update=data.to_data(),
            lease_seconds=self.settings.lease_seconds,
            audit=self._audit_of(upload, Action.UPLOAD_COMPLETED, data),
        )
        if self.relay is not None and messages:  # nothing queued (no webhooks, no Redis): no round to run
            self.relay.notify()
        return saga, record

    def _file_record(self, upload_id: str, data: UploadSagaData) -> FileRecord:
        compression = data.compression
        return FileRecord(
            file_id=data.file_id or "",
            upload_id=upload_id,
            original_filename=data.filename,
            storage_filename=data.storage_filename,
            storage_element_id=data.element_id or "",
            storage_key=data.key,
            size_bytes=data.size,
            stored_size_bytes=data.stored_size or data.size,
            content_type=data.content_type,
            content_encoding=compression.algorithm if compression else None,
            md5=data.md5,
            sha256=data.sha256,
            created_by_id=data.user_id,
            created_by_username=data.username,
            retention_policy=data.retention_policy,
            description=data.description,
            metadata=dict(data.metadata),
            uploaded_at=datetime.fromisoformat(data.created_at),
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

    async def _finish(
        self, saga: Saga, upload: Upload | None = None, record: FileRecord | None = None
    ) -> UploadOutcome:
        """After registration nothing is undone: clean staging up, mark the upload, done.

        Every part repeats harmlessly, so the saga's completion need not be durable: lost to a
        crash, recovery finds the saga registered and finishes it again. ``record``: the files row
        this run registered (None: read it from the registry)."""
        self._found.pop(saga.saga_id, None)
        self._listed.pop(saga.subject_id, None)
        data = _data(saga)
        for element_id in data.cleanup:
            await self._remove_from(element_id, data.key)
        if upload is None or upload.state is not UploadState.COMPLETE:  # its last byte's commit made it so
            await self.sessions.set_state(saga.subject_id, UploadState.COMPLETE)
        await self._remove_staging(saga.subject_id)
        await self.sagas.set_state(saga.saga_id, owner=self.settings.owner, state=SagaState.COMPLETED, durable=False)
        self._settled(saga, "success", data.size, data.compression)
        await self._stage(saga.subject_id, "registered")
        return UploadOutcome("completed", file=record or await self.sagas.get_file(data.file_id or ""))

    def _settled(
        self, saga: Saga, status: str, size: int | None = None, compression: Compression | None = None
    ) -> None:
        """Count a settled upload saga (artstore_ingester_uploads_total and the saga series)."""
        self.metrics.uploads.labels(status).inc()
        self.metrics.saga_transactions.labels(KIND, "completed" if status == "success" else "compensated").inc()
        if compression is not None and size:
            self.metrics.compression_ratio.observe(compression.stored_size / size)
        if size is not None:
            self.metrics.upload_size.observe(size)
            self.metrics.upload_duration.observe((utcnow() - saga.created_at).total_seconds())

    async def _fail(
        self, saga: Saga, code: str, message: str, *, http_status: int = 422, compensate: bool = True
    ) -> UploadOutcome:
        """Undo in reverse order, tell the webhooks, mark the upload failed, free its bytes."""
        owner = self.settings.owner
        data = self._found.pop(saga.saga_id, None) or _data(saga)
        self._listed.pop(saga.subject_id, None)
        self.followers.drop(saga.subject_id)  # its copy or verdict is of no use now; it would hold a slot
        if saga.state is not SagaState.COMPENSATING:
            data.http_status = http_status
            saga = await self._advance(saga, saga.step or "created", data)
            saga = await self.sagas.set_state(
                saga.saga_id, owner=owner, state=SagaState.COMPENSATING, error_code=code, error=message
            )
        if compensate:
            if data.element_id and data.key:
                self.metrics.saga_compensations.labels(KIND, "remove_object").inc()
                if not await self._remove_from(data.element_id, data.key):
                    # The element cannot be reached: the saga stays compensating, its lease lapses and
                    # recovery tries again later. For the client the upload has failed.
                    log.warning("upload saga %s: cannot remove the object from %s yet", saga.saga_id, data.element_id)
                    refusal = _refusal(saga.error_code, saga.error, 503)
                    await self._stage(saga.subject_id, "failed", refusal)
                    return UploadOutcome("failed", refusal=refusal)
            for other in data.cleanup:
                await self._remove_from(other, data.key)
        messages = webhook_messages(
            webhook_event(UPLOAD_FAILED, {"upload_id": saga.subject_id, "error": {"error": code, "message": message}}),
            self.settings.webhook_urls,
        )
        await self.sagas.enqueue(messages)
        if self.relay is not None and messages:
            self.relay.notify()
        failed = await self._audit(saga.subject_id, Action.UPLOAD_FAILED, data, outcome=Outcome.FAILED, reason=code)
        await self.sessions.set_state(saga.subject_id, UploadState.FAILED, audit=failed)
        await self._remove_staging(saga.subject_id)
        await self.sagas.set_state(
            saga.saga_id, owner=owner, state=SagaState.COMPENSATED, error_code=code, error=message
        )
        log.info("upload %s failed: %s (%s)", saga.subject_id, message, code)
        self._settled(saga, "failure")
        if code == "virus_detected":
            self.metrics.virus_detections.inc()
        refusal = Refused(message, code=code, status=http_status)
        await self._stage(saga.subject_id, "failed", refusal)
        return UploadOutcome("failed", refusal=refusal)

    async def _audit(
        self, upload_id: str, action: str, data: UploadSagaData, *, outcome: str = Outcome.OK, reason: str | None = None
    ) -> AuditEvent:
        """The audit event of the upload's completion or failure, under the upload's owner."""
        upload = await self.sessions.get(upload_id) or Upload(id=upload_id, length=None)
        return self._audit_of(upload, action, data, outcome=outcome, reason=reason)

    def _audit_of(
        self, upload: Upload, action: str, data: UploadSagaData, *, outcome: str = Outcome.OK, reason: str | None = None
    ) -> AuditEvent:
        elements = (data.element_id,) if data.element_id else ()
        return AuditEvent.for_owner(
            action, upload, outcome=outcome, file_id=data.file_id, element_ids=elements, reason=reason
        )

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

    async def _advance(self, saga: Saga, step: str, data: UploadSagaData) -> Saga:
        return await self.runner.advance(saga, step, data)

    async def _step(self, saga: Saga, step: str, data: UploadSagaData, *, recorded: bool) -> Saga:
        """A step done: into the saga log (a large file), or only into the debug log (a small one)."""
        if recorded:
            return await self._advance(saga, step, data)
        log.debug(
            "upload saga %s: step %s done (in memory)",
            saga.saga_id,
            step,
            extra={"saga": KIND, "saga_id": saga.saga_id, "step": step},
        )
        return saga

    async def _stage(self, upload_id: str, stage: str, refusal: Refused | None = None) -> None:
        """Tell the upload's watchers the stage it reached (registered and failed once they are durable)."""
        error, message = (refusal.code, refusal.message) if refusal is not None else (None, None)
        await self.progress.publish(ProgressEvent(upload_id, stage=stage, error=error, message=message))


def _steps_recorded(data: UploadSagaData) -> bool:
    """Whether each step goes into the saga log (a large file), or only begin and registration (a small one)."""
    return (data.length or 0) >= SMALL_FILE


def _failure_code(exc: BaseException) -> str:
    if isinstance(exc, ScannerUnavailable):
        return "scanner_unavailable"
    if isinstance(exc, NoElementAvailable):
        return "storage_unavailable"
    return "finalisation_failed"


def _compression_record(data: UploadSagaData) -> dict[str, Any] | None:
    compression = data.compression
    if not compression:
        return None
    return {
        "algorithm": "brotli" if compression.algorithm == "br" else compression.algorithm,
        "original_size": data.size,
        "stored_size": compression.stored_size,
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


def _head_of(files: Sequence[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """The first of the staged ``(path, size)`` that hold the first HEAD_BYTES, the last cut to fit."""
    head, left = [], HEAD_BYTES
    for path, size in files:
        if left <= 0:
            break
        head.append((path, min(size, left)))
        left -= size
    return head


def _detect_files(upload_id: str, files: Sequence[tuple[Path, int]]) -> str:
    """``detect_mime`` of the first ``size`` bytes of each staged ``(path, size)``, in order."""
    head = bytearray()
    try:
        for path, size in files:
            with open(path, "rb") as staged:
                head += staged.read(size)
    except OSError as exc:  # a chunk discarded since the listing
        raise StagingError(f"cannot read staging for upload {upload_id}: {exc}") from exc
    if len(head) != sum(size for _, size in files):
        raise StagingError(f"staging for upload {upload_id} ended early")
    return detect_mime(bytes(head))


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _read_file(path: Path, block: int = READ_BLOCK) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, block):
            yield chunk
    finally:
        handle.close()
