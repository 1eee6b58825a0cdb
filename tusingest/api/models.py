"""The bodies of /api: every JSON answer a handler sends and every JSON request it validates is
one of these models, and the OpenAPI document (api/openapi.py) is generated from the same ones.

Handlers build answers with ``Model(...).model_dump(mode="json", exclude_unset=True)``: a field left
unset is absent (optional parts), a field set to None is null (a total not known yet)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

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
        description="offset_mismatch, session_busy, truncated_body: where the session stands, to resume from",
        json_schema_extra=_optional_part,
    )
    upload_session_id: str | SkipJsonSchema[None] = Field(
        None,
        description="truncated_body only: the session that keeps the bytes",
        json_schema_extra=_optional_part,
    )


def dump(model: BaseModel) -> dict[str, Any]:
    """A model as the JSON a handler sends: the fields that were set, nulls included."""
    return model.model_dump(mode="json", exclude_unset=True)


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


class ProgressData(_Body):
    """The data of a ``progress`` event on the session's event stream: a committed offset."""

    session_id: str
    bytes_uploaded: ByteCount
    bytes_total: ByteCount | None = Field(description="null while the length is deferred")


class StatusData(_Body):
    """The data of a ``status`` event: the session status route's status, when it changes."""

    session_id: str
    status: Literal["in_progress", "finalizing", "completed", "failed"]


class StageData(_Body):
    """The data of a ``stage`` event: the finalisation step the upload reached."""

    session_id: str
    stage: Literal["inspecting", "scanning", "placing", "registered", "failed"]


class TransferRequest(BaseModel):
    """The JSON body of POST /api/files/{file_id}/transfer, as the handler validates it (fields it
    does not know are ignored)."""

    model_config = ConfigDict(extra="ignore")

    destination_storage_element_id: StrictStr
    delete_source: StrictBool = False
    verify_checksum: StrictBool | None = Field(None, description="null or absent: TRANSFER_VERIFY_CHECKSUM_DEFAULT")


class TransferAccepted(_Body):
    """202: the transfer is queued; poll GET /api/files/transfer/{transfer_id}."""

    transfer_id: str
    status: Literal["queued"]
    estimated_time_seconds: int = Field(ge=0)


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
