"""DELETE /api/files/{file_id}, POST /api/files/{file_id}/transfer and GET /api/files/transfer/{transfer_id}:
files are deleted and moved between Storage Elements through durable sagas that survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Final

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tusingest.api.jsonbody import JsonRefused, loads_bounded
from tusingest.api.sessions import error
from tusingest.api.uploads import ApiError
from tusingest.config import Settings
from tusingest.elements.pool import ElementPool
from tusingest.finalise.delete import AUDIT_STREAM, DeleteSagas
from tusingest.saga.failpoints import Failpoints
from tusingest.saga.outbox import OutboxRelay
from tusingest.saga.records import UNFINISHED_STATES, Saga, SagaKind
from tusingest.finalise.refusals import FileNotFound, Refused, SagaTasks
from tusingest.saga.store import SagaStore
from tusingest.finalise.transfer import TransferSagas, estimated_seconds, transfer_json
from tusingest.finalise.upload import SagaSettings
from tusingest.sessions.model import is_upload_id

log = logging.getLogger(__name__)

KINDS: Final[tuple[SagaKind, ...]] = ("delete", "transfer")
USER_HEADER: Final = "X-ArtStore-User"
DELETE_WAIT_SECONDS = 10.0  # how long DELETE waits for its saga before answering 503 (it goes on regardless)
RECOVERY_BATCH = 20
MAX_BODY_BYTES = 64 << 10  # a transfer request is a few fields
MAX_BODY_DEPTH = 4  # ... at the top level of one object; a little room for fields it ignores
# File ids are made by str(uuid.uuid4()); anything else names no file, so no store is asked.
_FILE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class TransferBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    destination_storage_element_id: StrictStr
    delete_source: StrictBool = False
    verify_checksum: StrictBool | None = None  # None: TRANSFER_VERIFY_CHECKSUM_DEFAULT


class FilesApi:
    def __init__(self, settings: Settings, sagas: SagaStore, pool: ElementPool, relay: OutboxRelay, owner: str) -> None:
        self.settings = settings
        self.sagas = sagas
        self.pool = pool
        self.relay = relay
        self.owner = owner
        self.delete_wait_seconds = DELETE_WAIT_SECONDS
        saga_settings = SagaSettings(
            owner=owner,
            lease_seconds=settings.saga_lease_seconds,
            retry_attempts=settings.saga_retry_max_attempts,
            retry_base_delay=settings.saga_retry_base_delay_seconds,
            timeout=settings.saga_timeout_seconds,
            webhook_urls=settings.webhook_urls,
            events_stream=settings.file_events_stream if settings.redis_url else None,
        )
        failpoints = Failpoints(settings.saga_failpoints)
        self.tasks = SagaTasks(sagas, owner=owner, lease_seconds=settings.saga_lease_seconds)
        self.deletes = DeleteSagas(
            store=sagas,
            pool=pool,
            relay=relay,
            tasks=self.tasks,
            settings=saga_settings,
            audit_stream=AUDIT_STREAM if settings.redis_url else None,
            failpoints=failpoints,
        )
        self.transfers = TransferSagas(
            store=sagas, pool=pool, tasks=self.tasks, settings=saga_settings, failpoints=failpoints
        )
        self._recovery: asyncio.Task[None] | None = None

    def routes(self) -> list[Route]:
        return [
            Route("/api/files/transfer/{transfer_id}", self.transfer_status, methods=["GET"]),
            Route("/api/files/{file_id}/transfer", self.transfer, methods=["POST"]),
            Route("/api/files/{file_id}", self.delete, methods=["DELETE"]),
        ]

    async def open(self) -> None:
        """Start recovery of unfinished delete and transfer sagas."""
        try:
            await self.recover()
        except Exception:  # the periodic round retries; a failed first round must not stop the node
            log.exception("recovery of delete and transfer sagas failed")
        self._recovery = asyncio.create_task(self._recover_periodically(), name="file-saga-recovery")

    async def close(self) -> None:
        """Stop running sagas; their leases lapse and recovery resumes them."""
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        await self.tasks.close()

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self) -> int:
        """Take over delete and transfer sagas whose node died, and run every one this node owns but no task
        runs (an earlier run here gave up for a while, or another saga runner claimed it for this node)."""
        await self.sagas.claim_stale(
            self.owner, lease_seconds=self.settings.saga_lease_seconds, limit=RECOVERY_BATCH, kinds=KINDS
        )
        resumed = 0
        for saga in await self.sagas.list_sagas(list(UNFINISHED_STATES)):
            if saga.kind in KINDS and saga.owner == self.owner and self.tasks.get(saga.saga_id) is None:
                log.info(
                    "carrying on %s saga %s of file %s at step %s", saga.kind, saga.saga_id, saga.subject_id, saga.step
                )
                self._resume(saga)
                resumed += 1
        return resumed

    def _resume(self, saga: Saga) -> None:
        if saga.kind == "delete":
            self.deletes.resume(saga)
        else:
            self.transfers.resume(saga)

    async def _recover_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.saga_recovery_interval_seconds)
            try:
                await self.recover()
            except Exception:  # one failed round must not end recovery
                log.exception("recovery of delete and transfer sagas failed")

    # -- routes ------------------------------------------------------------------------------

    async def delete(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not is_file_id(file_id):
            return _no_file(file_id)
        actor = request.headers.get(USER_HEADER) or "anonymous"
        try:
            outcome = await self.deletes.delete(file_id, actor=actor, wait=self.delete_wait_seconds)
        except Refused as refused:
            return error(refused.status, refused.code, refused.message)
        if outcome.status == "deleted":
            return Response(status_code=204)
        response = error(503, outcome.error_code or "storage_element_unavailable", outcome.error or "")
        response.headers["Retry-After"] = "5"
        return response

    async def transfer(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not is_file_id(file_id):
            return _no_file(file_id)
        try:
            body = parse_transfer_body(await _small_body(request))
        except ApiError as refused:
            return refused.response()
        verify = (
            self.settings.transfer_verify_checksum_default if body.verify_checksum is None else body.verify_checksum
        )
        try:
            saga = await self.transfers.start(
                file_id,
                destination_id=body.destination_storage_element_id,
                delete_source=body.delete_source,
                verify_checksum=verify,
            )
        except Refused as refused:
            return error(refused.status, refused.code, refused.message)
        return JSONResponse(
            {
                "transfer_id": saga.saga_id,
                "status": "queued",
                "estimated_time_seconds": estimated_seconds(int(saga.data["bytes_total"])),
            },
            status_code=202,
        )

    async def transfer_status(self, request: Request) -> Response:
        transfer_id = request.path_params["transfer_id"]
        # Transfer ids are saga ids, made like upload ids (saga.records.new_saga_id).
        saga = await self.transfers.get(transfer_id) if is_upload_id(transfer_id) else None
        if saga is None:
            return error(404, "transfer_not_found", f"no transfer {transfer_id}")
        return JSONResponse(transfer_json(saga))


def is_file_id(value: str) -> bool:
    return _FILE_ID.fullmatch(value) is not None


def _no_file(file_id: str) -> JSONResponse:
    unknown = FileNotFound(file_id)
    return error(unknown.status, unknown.code, unknown.message)


def parse_transfer_body(raw: bytes) -> TransferBody:
    """The body of POST /api/files/{file_id}/transfer; ApiError 400 for anything else."""
    try:
        return TransferBody.model_validate(loads_bounded(raw, max_bytes=MAX_BODY_BYTES, max_depth=MAX_BODY_DEPTH))
    except JsonRefused as refused:
        raise ApiError(400, "invalid_request", f"the body is not a transfer request: {refused}") from None
    except ValidationError as invalid:
        raise ApiError(400, "invalid_request", _describe(invalid)) from None


async def _small_body(request: Request) -> bytes:
    """The body, but never more than one byte past MAX_BODY_BYTES (loads_bounded refuses that)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            break
    return bytes(body)


def _describe(exc: ValidationError) -> str:
    problems = []
    for problem in exc.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        problems.append(f"{where}: {problem['msg']}")
    return "; ".join(problems)
