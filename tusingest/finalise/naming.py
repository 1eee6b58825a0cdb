"""Where a file is stored and what its sidecar says (ArtStore's layout, DESIGN.md).

Stored name: ``{stem}_{username}_{YYYYMMDDTHHMMSS}_{file_id}{.ext}`` under ``YYYY/MM/DD/HH/``; the
sidecar ``<stored name>.attr.json`` (at most 4 KiB) describes it. Limits, all enforced here:

- a stored name has at most 200 characters (ArtStore) and at most 245 UTF-8 bytes, so that its
  sidecar's name fits the 255 bytes a file system allows per name component (ext4, XFS, btrfs,
  ZFS, NTFS in UTF-16 units which are never more); the stem, then the username are cut, on a
  character boundary, never the timestamp, the id or the extension;
- so a key (``YYYY/MM/DD/HH/`` + name + ``.attr.json``) has at most 14 + 255 = 269 bytes, well
  within S3's 1,024;
- attr.json at most 4 KiB: the identity fields that go into it are bounded (username 64, user id
  128 characters) and :func:`sidecar_worst_case_size` tells at creation whether the client's
  metadata can fit, so that the saga never meets a sidecar it cannot write.

``original_filename`` is kept as the client sent it (JSON-escaped in attr.json); only the stored
name is sanitised (:func:`sanitise_filename` says how).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tusingest.sessions.model import utc_iso

MAX_STORED_NAME = 200  # characters
MAX_NAME_COMPONENT_BYTES = 255  # NAME_MAX of the file systems a directory element runs on
SIDECAR_SUFFIX = ".attr.json"
MAX_STORED_NAME_BYTES = MAX_NAME_COMPONENT_BYTES - len(SIDECAR_SUFFIX)  # 245: the sidecar's name fits too
MAX_SIDECAR_BYTES = 4096
MAX_EXTENSION = 16  # characters after the dot; a longer "extension" is part of the stem
MAX_USERNAME = 64  # characters; bounded at creation (FinaliserHooks.check_creation)
MAX_USER_ID = 128  # characters; an id (UUID, e-mail, LDAP DN) fits comfortably
SCHEMA_VERSION = 1

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")
_SPACES = re.compile(r"\s+")
# Windows device names, reserved with any extension and in any case (``nul.txt`` is NUL too).
_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9\u00b9\u00b2\u00b3]|LPT[0-9\u00b9\u00b2\u00b3])\s*(\..*)?$", re.I)
_PLACEHOLDER_ID = "00000000-0000-0000-0000-000000000000"  # a file id's length (a UUID)
_PLACEHOLDER_TIME = datetime(2000, 1, 1, tzinfo=UTC)
_MAX_DIGITS = "9" * 19  # any size in bytes (a signed 64-bit integer)
_MAX_CONTENT_TYPE = "x" * 255  # RFC 6838: type and subtype of at most 127 characters each


def sanitise_filename(name: str, *, fallback: str = "file") -> str:
    """A name that is safe as one path component on every element, keeping Unicode letters.

    - NFC-normalised; only the last path segment is kept (``../x`` and ``C:\\dir\\x`` become
      ``x``), so separators ``/`` and ``\\`` never remain;
    - removed: control characters (C0 including NUL, CR and LF, DEL, C1), format characters
      (bidi overrides, zero-width marks), surrogates, private-use and unassigned code points;
    - replaced by ``_``: the characters Windows refuses (``: * ? " < > |``);
    - runs of whitespace become one space; leading dots are removed (no hidden names, no ``.``
      or ``..``), and so are trailing dots and spaces (Windows drops them, which would alias);
    - a Windows reserved device name (CON, PRN, AUX, NUL, COM0-9, LPT0-9, with any extension,
      any case) gets a leading ``_``: ``nul.txt`` becomes ``_nul.txt``;
    - an empty result becomes ``fallback``.
    """
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    name = _UNSAFE.sub("_", name)
    name = _SPACES.sub(" ", name).strip().lstrip(".").strip().rstrip(". ")
    if _RESERVED.match(name):
        name = "_" + name
    return name or fallback


def _split_extension(name: str) -> tuple[str, str]:
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > MAX_EXTENSION or " " in extension:
        return name, ""
    return stem, "." + extension


def utf8_size(text: str) -> int:
    return len(text.encode())


def cut(text: str, max_chars: int, max_bytes: int) -> str:
    """The longest prefix of text with at most max_chars characters and max_bytes UTF-8 bytes,
    ending on a character boundary (a multi-byte character is never split)."""
    text = text[: max(0, max_chars)]
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    # The prefix is valid UTF-8 up to the cut; "ignore" drops only the split last character.
    return encoded[: max(0, max_bytes)].decode("utf-8", errors="ignore")


def stored_name(original_filename: str, username: str, created_at: datetime, file_id: str) -> str:
    """``{stem}_{username}_{YYYYMMDDTHHMMSS}_{file_id}{.ext}``: at most 200 characters and at most
    245 UTF-8 bytes (so ``<name>.attr.json`` fits 255 bytes). The username keeps at least half of
    the room left by the fixed parts when the stem needs it; the stem gets the rest. The id,
    timestamp and extension are never cut; both cuts end on a character boundary."""
    stem, extension = _split_extension(sanitise_filename(original_filename))
    user = sanitise_filename(username, fallback="anonymous").replace(" ", "_")
    stem = stem.replace(" ", "_")
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    fixed = f"___{stamp}{file_id}{extension}"  # three underscores join the four parts
    room_chars = MAX_STORED_NAME - len(fixed)
    room_bytes = MAX_STORED_NAME_BYTES - utf8_size(fixed)
    user = cut(user, max(room_chars // 2, room_chars - len(stem)), max(room_bytes // 2, room_bytes - utf8_size(stem)))
    stem = cut(stem, room_chars - len(user), room_bytes - utf8_size(user))
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
    """attr.json as bytes, at most 4 KiB. Creation refuses metadata that could not fit
    (:func:`sidecar_worst_case_size`), so the trimming here (user metadata dropped, longest
    values first, then the original filename cut) is only a safety net for older uploads."""
    document = _document(
        file_id=file_id,
        original_filename=original_filename,
        storage_filename=storage_filename,
        storage_path=storage_path,
        file_size=file_size,
        content_type=content_type,
        created_at=created_at,
        created_by_id=created_by_id,
        created_by_username=created_by_username,
        md5=md5,
        sha256=sha256,
        compression=compression,
        metadata=metadata,
    )
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


def sidecar_worst_case_size(
    *, original_filename: str, username: str, user_id: str | None, metadata: Mapping[str, str]
) -> int:
    """The size in bytes of the largest attr.json an upload with these client values can get.

    Everything the client chose is taken as it is (the filename, the identity fields, every
    metadata value, JSON-escaped); everything the server chooses later at its largest: a UUID
    file id, the stored name this filename and username give (its length does not depend on the
    time or the id), a 19-digit size for the file and its compressed copy, a 255-character
    content type, a timestamp with microseconds. At most 4096 means the sidecar always fits.
    """
    name = stored_name(original_filename, username, _PLACEHOLDER_TIME, _PLACEHOLDER_ID)
    document = _document(
        file_id=_PLACEHOLDER_ID,
        original_filename=original_filename,
        storage_filename=name,
        storage_path=storage_key(name, _PLACEHOLDER_TIME),
        file_size=int(_MAX_DIGITS),
        content_type=_MAX_CONTENT_TYPE,
        created_at=_PLACEHOLDER_TIME.replace(microsecond=999_999),
        created_by_id=user_id,
        created_by_username=username,
        md5="0" * 32,
        sha256="0" * 64,
        compression={"algorithm": "brotli", "original_size": int(_MAX_DIGITS), "stored_size": int(_MAX_DIGITS)},
        metadata=metadata,
    )
    return len(_encode(document))


def _document(
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
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "file_id": file_id,
        "original_filename": original_filename,
        "storage_filename": storage_filename,
        "storage_path": storage_path,
        "file_size": file_size,
        "content_type": content_type,
        "created_at": utc_iso(created_at),
        "created_by": {"id": created_by_id, "username": created_by_username},
        "md5": md5,
        "sha256": sha256,
        "compression": dict(compression) if compression else None,
        "metadata": dict(metadata),
    }


def _encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
