"""Parsing and formatting of tus header values, strict as the protocol says."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from email.utils import format_datetime

from tusingest.tus.errors import BadRequest

TUS_VERSION = "1.0.0"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"

_DIGITS = re.compile(r"^[0-9]{1,19}$")  # fits a signed 64-bit integer
_MAX_METADATA_BYTES = 16 * 1024


def parse_non_negative(name: str, value: str | None, *, required: bool = True) -> int | None:
    if value is None:
        if required:
            raise BadRequest(f"missing {name} header")
        return None
    if not _DIGITS.match(value):
        raise BadRequest(f"invalid {name} header: must be a non-negative integer")
    return int(value)


def parse_metadata(value: str | None) -> dict[str, bytes | None]:
    """Upload-Metadata: comma-separated ``key base64value`` pairs; the value may be absent.

    Keys are non-empty, unique, without spaces or commas; values are strict base64.
    """
    if value is None or value.strip() == "":
        return {}
    if len(value) > _MAX_METADATA_BYTES:
        raise BadRequest(f"Upload-Metadata is longer than {_MAX_METADATA_BYTES} bytes")
    pairs: dict[str, bytes | None] = {}
    for raw in value.split(","):
        item = raw.strip(" \t")
        parts = item.split(" ")
        key = parts[0]
        if not key:
            raise BadRequest("invalid Upload-Metadata: empty key")
        if len(parts) > 2:
            raise BadRequest(f"invalid Upload-Metadata: key {key!r} has more than one value")
        if key in pairs:
            raise BadRequest(f"invalid Upload-Metadata: duplicate key {key!r}")
        if len(parts) == 1 or parts[1] == "":
            pairs[key] = None
            continue
        try:
            pairs[key] = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"invalid Upload-Metadata: value of {key!r} is not base64") from None
    return pairs


def http_date(value: datetime) -> str:
    return format_datetime(value, usegmt=True)
