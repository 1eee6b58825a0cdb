"""DELETE /api/files/{file_id}, POST /api/files/{file_id}/transfer and GET /api/files/transfer/{transfer_id}:
files are deleted and moved between Storage Elements through durable sagas that survive a restart.

Only HTTP lives here: parsing, answers; refusals are raised (api/errors.py answers them). The sagas (and
their recovery) are built and run by app.py and handed in.
"""

from __future__ import annotations

import logging
import re

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tusingest.api import models
from tusingest.api.errors import ApiError
from tusingest.api.jsonbody import JsonRefused, loads_bounded
from tusingest.api.models import TransferRequest
from tusingest.api.openapi import ApiRoute, Operation, path_parameter
from tusingest.auth import identity_in
from tusingest.finalise.delete import DeleteSagas
from tusingest.finalise.refusals import FileNotFound
from tusingest.finalise.transfer import TransferSagaData, TransferSagas, estimated_seconds, transfer_json
from tusingest.sessions.model import is_upload_id

log = logging.getLogger(__name__)

DELETE_WAIT_SECONDS = 10.0  # how long DELETE waits for its saga before answering 503 (it goes on regardless)
MAX_BODY_BYTES = 64 << 10  # a transfer request is a few fields
MAX_BODY_DEPTH = 4  # ... at the top level of one object; a little room for fields it ignores
# File ids are made by str(uuid.uuid4()); anything else names no file, so no store is asked.
_FILE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

FILE_ID = path_parameter("file_id", {"type": "string", "format": "uuid"}, "the file's id")

TRANSFER_STATUS = Operation(
    "getTransfer",
    "transfers",
    "Where a transfer stands",
    parameters=[
        path_parameter(
            "transfer_id", {"type": "string", "pattern": models.SESSION_ID_PATTERN}, "from the 202 of the transfer"
        )
    ],
    responses={200: ("the transfer", models.TransferStatus)},
    errors={404: "transfer_not_found"},
)
TRANSFER = Operation(
    "transferFile",
    "transfers",
    "Move or copy a file to another Storage Element",
    parameters=[FILE_ID],
    request=TransferRequest,
    responses={202: ("queued", models.TransferAccepted)},
    errors={
        400: (
            "invalid_request, unknown_storage_element, same_storage_element, destination_not_writable, "
            "insufficient_space or source_not_deletable"
        ),
        404: "file_not_found",
        409: "transfer_in_progress, delete_in_progress or storage_element_unknown",
    },
)
DELETE = Operation(
    "deleteFile",
    "files",
    "Delete a file from its Storage Element and the registry",
    parameters=[FILE_ID],
    responses={204: ("deleted", None)},
    errors={
        400: "file_in_readonly_storage",
        404: "file_not_found",
        409: "storage_element_unknown or transfer_in_progress",
        503: "storage_element_unavailable",
    },
)


class FilesApi:
    def __init__(self, deletes: DeleteSagas, transfers: TransferSagas, *, verify_checksum_default: bool) -> None:
        self.deletes = deletes
        self.transfers = transfers
        self.verify_checksum_default = verify_checksum_default  # TRANSFER_VERIFY_CHECKSUM_DEFAULT
        self.delete_wait_seconds = DELETE_WAIT_SECONDS

    def routes(self) -> list[Route]:
        return [
            ApiRoute("/api/files/transfer/{transfer_id}", self.transfer_status, "GET", TRANSFER_STATUS),
            ApiRoute("/api/files/{file_id}/transfer", self.transfer, "POST", TRANSFER),
            ApiRoute("/api/files/{file_id}", self.delete, "DELETE", DELETE),
        ]

    # -- routes ------------------------------------------------------------------------------

    async def delete(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not is_file_id(file_id):
            raise FileNotFound(file_id)
        # The token says who deletes (app.py's authentication put it in the state), never a header.
        actor = identity_in(request.scope.get("state", {}))
        wait, address = self.delete_wait_seconds, _client_address(request)
        outcome = await self.deletes.delete(file_id, actor=actor, wait=wait, address=address)  # may be Refused
        if outcome.status == "deleted":
            return Response(status_code=204)
        code = outcome.error_code or "storage_element_unavailable"
        raise ApiError(503, code, outcome.error or "", headers={"Retry-After": "5"})

    async def transfer(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not is_file_id(file_id):
            raise FileNotFound(file_id)
        body = parse_transfer_body(await _small_body(request))
        verify = self.verify_checksum_default if body.verify_checksum is None else body.verify_checksum
        saga = await self.transfers.start(  # may be Refused
            file_id,
            actor=identity_in(request.scope.get("state", {})),
            address=_client_address(request),
            destination_id=body.destination_storage_element_id,
            delete_source=body.delete_source,
            verify_checksum=verify,
        )
        accepted = models.TransferAccepted(
            transfer_id=saga.saga_id,
            status="queued",
            estimated_time_seconds=estimated_seconds(TransferSagaData.from_data(saga.data).bytes_total),
        )
        return JSONResponse(models.dump(accepted), status_code=202)

    async def transfer_status(self, request: Request) -> Response:
        transfer_id = request.path_params["transfer_id"]
        # Transfer ids are saga ids, made like upload ids (saga.records.new_saga_id).
        actor = identity_in(request.scope.get("state", {}))
        saga = await self.transfers.get(transfer_id, actor) if is_upload_id(transfer_id) else None
        if saga is None:
            raise ApiError(404, "transfer_not_found", f"no transfer {transfer_id}")
        return JSONResponse(models.dump(models.TransferStatus.model_validate(transfer_json(saga))))


def is_file_id(value: str) -> bool:
    return _FILE_ID.fullmatch(value) is not None


def parse_transfer_body(raw: bytes) -> TransferRequest:
    """The body of POST /api/files/{file_id}/transfer; ApiError 400 for anything else."""
    try:
        return TransferRequest.model_validate(loads_bounded(raw, max_bytes=MAX_BODY_BYTES, max_depth=MAX_BODY_DEPTH))
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


def _client_address(request: Request) -> str | None:
    """The client's address, for the audit rows of its delete or transfer."""
    return request.client.host if request.client else None
