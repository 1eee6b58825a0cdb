"""Parsing and formatting of tus header values, strict as the protocol says."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime

from tusingest.sessions.metadata import MetadataError, decode_metadata
from tusingest.tus.errors import BadRequest

TUS_VERSION = "1.0.0"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"

MAX_INTEGER = (1 << 63) - 1  # what a signed 64-bit column (offsets, lengths) can hold
_MAX_DIGITS = len(str(MAX_INTEGER))  # 19
_MAX_METADATA_BYTES = 16 * 1024


def non_negative_integer(text: str, *, max_digits: int = _MAX_DIGITS) -> int | None:
    """``text`` as a non-negative integer, or None when it is anything else.

    The one number parser of every header and form field: ASCII digits only (``str.isdigit``
    and ``int`` take superscripts and other scripts' digits), at most ``max_digits`` of them
    and at most MAX_INTEGER, so ``int`` never meets its digit limit and a database never an
    overflow. Callers strip what whitespace their syntax allows and raise their own 4xx.
    """
    if not 1 <= len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= MAX_INTEGER else None


def parse_non_negative(name: str, value: str | None, *, required: bool = True) -> int | None:
    if value is None:
        if required:
            raise BadRequest(f"missing {name} header")
        return None
    number = non_negative_integer(value)
    if number is None:
        raise BadRequest(f"invalid {name} header: must be a non-negative integer of at most {_MAX_DIGITS} digits")
    return number


def parse_metadata(value: str | None) -> dict[str, bytes | None]:
    """Upload-Metadata: comma-separated ``key base64value`` pairs; the value may be absent.

    Keys are non-empty, unique, without spaces or commas; values are strict base64.
    """
    if value is not None and len(value) > _MAX_METADATA_BYTES:
        raise BadRequest(f"Upload-Metadata is longer than {_MAX_METADATA_BYTES} bytes")
    try:
        return decode_metadata(value)
    except MetadataError as exc:
        raise BadRequest(str(exc)) from None


def http_date(value: datetime) -> str:
    return format_datetime(value, usegmt=True)
