"""Storage Elements as the Admin Module describes them, and the one JSON format of their list.

The same document travels through the Redis snapshot, the fallback file and the local cache:
``{"version": 7, "timestamp": "...", "storage_elements": [{...}, ...]}``. Unknown fields are
ignored (the Admin Module sends more than we use); an element that does not validate is left out
of the list with a warning instead of discarding the whole snapshot.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

ELEMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Mode(StrEnum):
    """What an element allows: edit (upload, delete), rw (upload), ro and ar (neither)."""

    EDIT = "edit"
    RW = "rw"
    RO = "ro"
    AR = "ar"

    @property
    def accepts_uploads(self) -> bool:
        return self in (Mode.EDIT, Mode.RW)

    @property
    def allows_delete(self) -> bool:
        return self is Mode.EDIT


class BackendKind(StrEnum):
    S3 = "s3"
    DIRECTORY = "directory"


# Statuses the Admin Module reports; only these two let an element take new files.
SELECTABLE_STATUSES = frozenset({"online", "degraded"})


class StorageElement(BaseModel):
    """One Storage Element: where it is, what it allows and how full it is."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    element_id: str = Field(pattern=ELEMENT_ID_PATTERN)
    name: str = ""
    mode: Mode
    backend: BackendKind
    # s3
    endpoint: str | None = None  # None: the AWS endpoint for the region
    bucket: str | None = None
    prefix: str = ""
    region: str = "us-east-1"
    # directory
    path: str | None = None

    capacity_bytes: int | None = Field(None, ge=0)  # None: unknown, treated as unbounded
    used_bytes: int = Field(0, ge=0)
    priority: int = 100  # lower is preferred
    datacenter: str | None = None
    status: str = "online"

    @model_validator(mode="before")
    @classmethod
    def _infer_backend(cls, data: Any) -> Any:
        # Older Admin Module snapshots carry no "backend": a path means a directory, else S3.
        if isinstance(data, Mapping) and "backend" not in data:
            data = {**data, "backend": "directory" if data.get("path") else "s3"}
        return data

    @model_validator(mode="after")
    def _where(self) -> Self:
        if self.backend is BackendKind.S3 and not self.bucket:
            raise ValueError("an s3 element needs a bucket")
        if self.backend is BackendKind.DIRECTORY and not self.path:
            raise ValueError("a directory element needs a path")
        if self.prefix.startswith("/") or ".." in self.prefix.split("/"):
            raise ValueError("prefix must be a relative key prefix")
        return self

    @property
    def free_bytes(self) -> int | None:
        if self.capacity_bytes is None:
            return None
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def selectable_status(self) -> bool:
        return self.status.lower() in SELECTABLE_STATUSES

    @property
    def env_name(self) -> str:
        """The element id as it appears in ELEMENT_<ID>_... environment variable names."""
        return re.sub(r"[^A-Za-z0-9]", "_", self.element_id).upper()


class ElementListError(ValueError):
    """The element list document is not JSON of the expected shape."""


class ElementList(BaseModel):
    """A versioned snapshot of every Storage Element."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = 0
    timestamp: datetime | None = None
    storage_elements: tuple[StorageElement, ...] = ()

    def by_id(self) -> dict[str, StorageElement]:
        return {element.element_id: element for element in self.storage_elements}

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True, indent=2)

    @classmethod
    def parse(cls, raw: str | bytes) -> ElementList:
        """Parse the shared JSON format; bad elements are skipped, a bad document raises."""
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ElementListError(f"element list is not valid JSON: {exc}") from None
        # A document without the array is refused rather than read as "no elements": a stray value
        # under the Redis key must not wipe the list.
        if not isinstance(document, dict) or not isinstance(document.get("storage_elements"), list):
            raise ElementListError('element list must be an object with a "storage_elements" array')
        elements: list[StorageElement] = []
        seen: set[str] = set()
        for index, entry in enumerate(document["storage_elements"]):
            try:
                element = StorageElement.model_validate(entry)
            except ValidationError as exc:
                where = entry.get("element_id", f"#{index}") if isinstance(entry, dict) else f"#{index}"
                log.warning("storage element %s left out: %s", where, _short(exc))
                continue
            if element.element_id in seen:
                log.warning("storage element %s listed twice; the first entry is kept", element.element_id)
                continue
            seen.add(element.element_id)
            elements.append(element)
        try:
            return cls(
                version=document.get("version", 0),
                timestamp=document.get("timestamp"),
                storage_elements=tuple(elements),
            )
        except ValidationError as exc:
            raise ElementListError(f"element list header is invalid: {_short(exc)}") from None


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
