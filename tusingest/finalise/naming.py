"""Where a file is stored and what its sidecar says (ArtStore's layout, DESIGN.md).

Stored name: ``{stem}_{username}_{YYYYMMDDTHHMMSS}_{file_id}{.ext}``, at most 200 characters,
under ``YYYY/MM/DD/HH/``; the sidecar ``<stored name>.attr.json`` (at most 4 KiB) describes it.
Filenames are sanitised: no path separators, no control characters, Unicode kept.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

MAX_STORED_NAME = 200
MAX_SIDECAR_BYTES = 4096
SIDECAR_SUFFIX = ".attr.json"
SCHEMA_VERSION = 1

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")
_SPACES = re.compile(r"\s+")


def sanitise_filename(name: str, *, fallback: str = "file") -> str:
    """The name's last path segment without separators, control or reserved characters.

    Unicode letters are kept (NFC-normalised); runs of whitespace become one space; leading dots
    go so that no hidden or relative names appear. An empty result becomes ``fallback``.
    """
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    name = _UNSAFE.sub("_", name)
    name = _SPACES.sub(" ", name).strip().lstrip(".").strip()
    return name or fallback


def _split_extension(name: str) -> tuple[str, str]:
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > 16 or " " in extension:
        return name, ""
    return stem, "." + extension


def stored_name(original_filename: str, username: str, created_at: datetime, file_id: str) -> str:
    """``{stem}_{username}_{YYYYMMDDTHHMMSS}_{file_id}{.ext}``, trimmed to 200 characters by
    shortening the stem (then the username), never the id, timestamp or extension."""
    stem, extension = _split_extension(sanitise_filename(original_filename))
    user = sanitise_filename(username, fallback="anonymous").replace(" ", "_")
    stem = stem.replace(" ", "_")
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    fixed = len(stamp) + len(file_id) + len(extension) + 3  # three underscores
    room = MAX_STORED_NAME - fixed
    if len(user) > room // 2:
        user = user[: max(1, room // 2)]
    stem = stem[: max(1, room - len(user))]
    return f"{stem}_{user}_{stamp}_{file_id}{extension}"


def storage_key(name: str, created_at: datetime) -> str:
    """The object key: ``YYYY/MM/DD/HH/<stored name>``."""
    return f"{created_at.astimezone(UTC).strftime('%Y/%m/%d/%H')}/{name}"


def sidecar_key(key: str) -> str:
    return key + SIDECAR_SUFFIX


def sidecar_document(
    *,
    file_id: str,
    original_filename: str,
    storage_filename: str,
    storage_path: str,
    file_size: int,
    content_type: str,
    created_at: datetime,
    created_by_id: str | None,
    created_by_username: str,
    md5: str,
    sha256: str,
    compression: Mapping[str, Any] | None,
    metadata: Mapping[str, str],
) -> bytes:
    """attr.json as bytes, at most 4 KiB: user metadata is trimmed (longest values first) when
    the document would be larger; the fixed fields always fit."""
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "file_id": file_id,
        "original_filename": original_filename,
        "storage_filename": storage_filename,
        "storage_path": storage_path,
        "file_size": file_size,
        "content_type": content_type,
        "created_at": created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "created_by": {"id": created_by_id, "username": created_by_username},
        "md5": md5,
        "sha256": sha256,
        "compression": dict(compression) if compression else None,
        "metadata": dict(metadata),
    }
    encoded = _encode(document)
    if len(encoded) <= MAX_SIDECAR_BYTES:
        return encoded
    remaining = dict(metadata)
    for name in sorted(remaining, key=lambda key: len(remaining[key]) + len(key), reverse=True):
        del remaining[name]
        document["metadata"] = remaining | {"_truncated": "true"}
        encoded = _encode(document)
        if len(encoded) <= MAX_SIDECAR_BYTES:
            return encoded
    document["original_filename"] = original_filename[:255]
    encoded = _encode(document)
    if len(encoded) > MAX_SIDECAR_BYTES:
        raise ValueError("attr.json exceeds 4 KiB even without metadata")
    return encoded


def _encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
