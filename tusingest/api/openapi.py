"""The OpenAPI 3.1 document of the REST facade under /api, served at GET /openapi.json.

Every request and response body is a pydantic model below; handlers build their JSON from the same models
(``model.model_dump(mode="json")``) so the document and the wire cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
import functools
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, SkipJsonSchema, models_json_schema
from pydantic_core import CoreSchema
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tusingest

TITLE = "tusingest — ArtStore Ingester API"
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
CONTENT_RANGE_PATTERN = r"^bytes [0-9]+-[0-9]+/([0-9]+|\*)$"
METADATA_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
ByteCount = Annotated[int, Field(ge=0)]


def _optional_part(schema: JsonDict) -> None:
    """An optional form part is absent rather than null: ``default: null`` would contradict its type."""
    schema.pop("default", None)


def _metadata_part(schema: JsonDict) -> None:
    """The optional ``metadata`` part: a JSON object as text, its values stored as strings."""
    schema["contentMediaType"] = "application/json"
    schema["contentSchema"] = {"type": "object", "propertyNames": {"pattern": METADATA_KEY_PATTERN}}
    _optional_part(schema)


def _binary_parts(schema: JsonDict) -> None:
    """Repeated file parts: OpenAPI 3.1 spells ``format: binary`` as ``contentMediaType``."""
    items = schema["items"]
    assert isinstance(items, dict)
    items["contentMediaType"] = "application/octet-stream"


class _Body(BaseModel):
    # Undocumented fields are a contract change: refuse them when building a response, not on the client.
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Body):
    """Why one thing failed, inside a larger body (a batch item, a failed session or transfer)."""

    error: str = Field(description="machine-readable code, e.g. checksum_mismatch")
    message: str = Field(description="for people; wording may change")


class ErrorBody(ErrorDetail):
    """The whole body of every 4xx and 503 answer under /api."""

    bytes_uploaded: ByteCount | SkipJsonSchema[None] = Field(
        None,
        description="offset_mismatch only: where the session stands, so the client resumes from there",
        json_schema_extra=_optional_part,
    )


class Compression(_Body):
    """How the stored copy is compressed; clients always get the original bytes back."""

    algorithm: str = Field(examples=["brotli", "gzip"])


class UploadResult(_Body):
    """201: the file is on a Storage Element, verified."""

    file_id: UUID
    storage_element_id: str
    storage_filename: str
    size_bytes: ByteCount
    md5_hash: Md5
    sha256_hash: Sha256
    uploaded_at: datetime
    compression: Compression | None


class UploadProgress(_Body):
    """202: a resumable session that still expects bytes, or a file still being stored (``status``)."""

    upload_session_id: str = Field(pattern=SESSION_ID_PATTERN)
    bytes_uploaded: ByteCount
    bytes_total: ByteCount | None = Field(description="null while the total is not known yet")
    percent_complete: float = Field(ge=0, le=100)
    status: Literal["finalizing"] | SkipJsonSchema[None] = Field(
        None,
        description="all bytes arrived and the file is being stored: poll the session instead of sending more",
        json_schema_extra=_optional_part,
    )


class UploadForm(_Body):
    """The multipart/form-data body of POST /api/files/upload."""

    file: bytes = Field(
        description="the file's bytes (or the next chunk of a resumable session)",
        json_schema_extra={"contentMediaType": "application/octet-stream"},
    )
    metadata: str | SkipJsonSchema[None] = Field(
        None,
        description="a JSON object, as text, stored with the file",
        json_schema_extra=_metadata_part,
    )
    retention_policy: Literal["temporary", "permanent"] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=_optional_part
    )
    description: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_optional_part)
    offset: ByteCount | SkipJsonSchema[None] = Field(
        None, description="where this chunk starts in a resumable session", json_schema_extra=_optional_part
    )
    total_size: ByteCount | SkipJsonSchema[None] = Field(
        None, description="the whole file's size, for a resumable session", json_schema_extra=_optional_part
    )


class BatchUploadForm(_Body):
    """The multipart/form-data body of POST /api/files/batch/upload: up to MAX_BATCH_FILES parts named ``files``."""

    files: list[bytes] = Field(
        min_length=1,
        json_schema_extra=_binary_parts,
    )
    metadata: str | SkipJsonSchema[None] = Field(
        None,
        description="a JSON object, as text, stored with every file",
        json_schema_extra=_metadata_part,
    )


class BatchFileResult(_Body):
    """One file of a batch: the identifiers when it succeeded, ``error`` when it failed."""

    filename: str
    status: Literal["success", "failed"]
    file_id: UUID | None = None
    size_bytes: ByteCount | None = None
    storage_element_id: str | None = None
    sha256_hash: Sha256 | None = None
    error: ErrorDetail | None = None


class BatchSummary(_Body):
    total: ByteCount
    succeeded: ByteCount
    failed: ByteCount


class BatchResult(_Body):
    """207: each file succeeds or fails on its own."""

    results: list[BatchFileResult]
    summary: BatchSummary


class FileInfo(_Body):
    """A stored file as clients see it (tusingest.finalise.upload.file_json)."""

    file_id: UUID
    storage_element_id: str
    storage_filename: str
    original_filename: str
    size_bytes: ByteCount
    stored_size_bytes: ByteCount = Field(description="after compression")
    content_type: str
    md5_hash: Md5
    sha256_hash: Sha256
    uploaded_at: datetime
    compression: Compression | None
    created_by: str
    upload_id: str | None = Field(description="the tus upload it came from; null when it did not arrive over tus")


class SessionStatus(_Body):
    """Where an upload session stands, for tus and facade uploads alike."""

    session_id: str
    status: Literal["in_progress", "finalizing", "completed", "failed"]
    bytes_uploaded: ByteCount
    bytes_total: ByteCount | None = Field(description="null while the length is deferred")
    created_at: datetime
    last_activity_at: datetime
    expires_at: datetime | None
    file: FileInfo | None = Field(description="set once the status is completed")
    error: ErrorDetail | None = Field(description="set when the status is failed")


class TransferRequest(_Body):
    """The JSON body of POST /api/files/{file_id}/transfer."""

    destination_storage_element_id: str = Field(min_length=1)
    delete_source: bool = False
    verify_checksum: bool = True


class TransferAccepted(_Body):
    """202: the transfer is queued; poll GET /api/files/transfer/{transfer_id}."""

    transfer_id: str
    status: Literal["queued"]
    estimated_time_seconds: float = Field(ge=0)


class TransferStatus(_Body):
    transfer_id: str
    file_id: UUID
    status: Literal["queued", "in_progress", "verifying", "completed", "failed"]
    bytes_transferred: ByteCount
    bytes_total: ByteCount
    transfer_rate_mbps: float | None = Field(ge=0)
    started_at: datetime | None
    completed_at: datetime | None
    error: ErrorDetail | None
    source_storage_element_id: str
    destination_storage_element_id: str


REQUEST_MODELS: tuple[type[BaseModel], ...] = (UploadForm, BatchUploadForm, TransferRequest)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    ErrorBody,
    UploadResult,
    UploadProgress,
    BatchResult,
    SessionStatus,
    TransferAccepted,
    TransferStatus,
)


class _ComponentSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema without a ``title`` on every property: the property name says it already."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


def _components() -> dict[str, Any]:
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "validation") for model in REQUEST_MODELS),
        *((model, "serialization") for model in RESPONSE_MODELS),
    ]
    _, definitions = models_json_schema(
        modes, ref_template="#/components/schemas/{model}", schema_generator=_ComponentSchema
    )
    schemas: dict[str, Any] = definitions["$defs"]
    return schemas


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(description: str, model: type[BaseModel]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(**codes: str) -> dict[str, Any]:
    """Error responses by status (``e400="..."``), each with the error body."""
    return {name.removeprefix("e"): _json(description, ErrorBody) for name, description in codes.items()}


def _path_parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


FILE_ID = _path_parameter("file_id", {"type": "string", "format": "uuid"}, "the file's id")


def _paths() -> dict[str, Any]:
    upload = {
        "post": {
            "operationId": "uploadFile",
            "tags": ["uploads"],
            "summary": "Upload one file in one request, or one chunk of a resumable session",
            "parameters": [
                {
                    "name": "X-Upload-Session-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": SESSION_ID_PATTERN},
                    "description": "names a resumable session, or continues it",
                },
                {
                    "name": "Content-Range",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": CONTENT_RANGE_PATTERN},
                    "description": "bytes <start>-<end>/<total> (total * when not known yet): where this chunk sits",
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": _ref(UploadForm),
                        "encoding": {"file": {"contentType": "application/octet-stream"}},
                    }
                },
            },
            "responses": {
                "201": _json("stored and verified", UploadResult),
                "202": _json(
                    "a resumable session that still expects bytes, or a file still being stored", UploadProgress
                ),
                **_errors(
                    e400="invalid_request, invalid_metadata, invalid_session_id or invalid_content_range",
                    e409=(
                        "offset_mismatch (the chunk does not start where the session stands; see bytes_uploaded), "
                        "length_mismatch, session_not_active or session_busy"
                    ),
                    e413="file_too_large",
                    e415="mime_type_not_allowed",
                    e422="refused after receipt: virus_detected, checksum_mismatch, ...",
                    e503="no Storage Element can take the file now",
                ),
            },
        }
    }
    batch = {
        "post": {
            "operationId": "uploadBatch",
            "tags": ["uploads"],
            "summary": "Upload several files in one request; each succeeds or fails on its own",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": _ref(BatchUploadForm),
                        "encoding": {"files": {"contentType": "application/octet-stream"}},
                    }
                },
            },
            "responses": {
                "207": _json("one result per file", BatchResult),
                **_errors(
                    e400="invalid request",
                    e413="too_many_files or batch_too_large",
                    e503="no Storage Element can take files now",
                ),
            },
        }
    }
    session = {
        "get": {
            "operationId": "getUploadSession",
            "tags": ["uploads"],
            "summary": "Where an upload session (tus or facade) stands",
            "parameters": [
                _path_parameter(
                    "session_id",
                    {"type": "string", "pattern": SESSION_ID_PATTERN},
                    "the upload's id: the last path segment of its tus URL, or X-Upload-Session-ID",
                )
            ],
            "responses": {
                "200": _json("the session", SessionStatus),
                **_errors(e404="session_not_found"),
            },
        }
    }
    file = {
        "delete": {
            "operationId": "deleteFile",
            "tags": ["files"],
            "summary": "Delete a file from its Storage Element and the registry",
            "parameters": [FILE_ID],
            "responses": {
                "204": {"description": "deleted"},
                **_errors(
                    e400="file_in_readonly_storage",
                    e404="file_not_found",
                    e409="storage_element_unknown",
                    e503="storage_element_unavailable",
                ),
            },
        }
    }
    transfer = {
        "post": {
            "operationId": "transferFile",
            "tags": ["transfers"],
            "summary": "Move or copy a file to another Storage Element",
            "parameters": [FILE_ID],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(TransferRequest)}}},
            "responses": {
                "202": _json("queued", TransferAccepted),
                **_errors(
                    e400=(
                        "invalid_request, unknown_storage_element, same_storage_element, destination_not_writable, "
                        "insufficient_space or source_not_deletable"
                    ),
                    e404="file_not_found",
                    e409="transfer_in_progress",
                ),
            },
        }
    }
    transfer_status = {
        "get": {
            "operationId": "getTransfer",
            "tags": ["transfers"],
            "summary": "Where a transfer stands",
            "parameters": [
                _path_parameter(
                    "transfer_id", {"type": "string", "pattern": SESSION_ID_PATTERN}, "from the 202 of the transfer"
                )
            ],
            "responses": {
                "200": _json("the transfer", TransferStatus),
                **_errors(e404="transfer_not_found"),
            },
        }
    }
    return {
        "/api/files/upload": upload,
        "/api/files/batch/upload": batch,
        "/api/files/upload/session/{session_id}": session,
        "/api/files/{file_id}": file,
        "/api/files/{file_id}/transfer": transfer,
        "/api/files/transfer/{transfer_id}": transfer_status,
    }


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": tusingest.__version__,
            "description": 'The REST facade of the ArtStore Ingester. Errors are {"error": code, "message": text}.',
        },
        "tags": [
            {"name": "uploads", "description": "files in, by form upload (tus lives under its own base path)"},
            {"name": "files", "description": "stored files"},
            {"name": "transfers", "description": "moving files between Storage Elements"},
        ],
        "paths": _paths(),
        "components": {"schemas": _components()},
    }


def openapi_document() -> dict[str, Any]:
    """The document, built once; each caller gets its own copy to read or change."""
    return copy.deepcopy(_document())


def openapi_routes() -> list[Route]:
    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(_document())

    return [Route("/openapi.json", openapi_json, methods=["GET"], include_in_schema=False)]
