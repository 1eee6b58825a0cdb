"""Upload-Metadata as the store keeps it: comma-separated ``key base64value`` pairs.

One decoder for the protocol layer (which answers a malformed header with 400) and for what runs
after it (the finaliser reads the stored, already validated header back).
"""

from __future__ import annotations

import base64
import binascii


class MetadataError(ValueError):
    """The header is malformed; the message says how, and is fit for the client."""


def decode_metadata(value: str | None) -> dict[str, bytes | None]:
    """Keys are non-empty, unique, without spaces or commas; values are strict base64 or absent."""
    if value is None or value.strip() == "":
        return {}
    pairs: dict[str, bytes | None] = {}
    for raw in value.split(","):
        item = raw.strip(" \t")
        parts = item.split(" ")
        key = parts[0]
        if not key:
            raise MetadataError("invalid Upload-Metadata: empty key")
        if len(parts) > 2:
            raise MetadataError(f"invalid Upload-Metadata: key {key!r} has more than one value")
        if key in pairs:
            raise MetadataError(f"invalid Upload-Metadata: duplicate key {key!r}")
        if len(parts) == 1 or parts[1] == "":
            pairs[key] = None
            continue
        try:
            pairs[key] = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raise MetadataError(f"invalid Upload-Metadata: value of {key!r} is not base64") from None
    return pairs


def metadata_text(value: str | None) -> dict[str, str]:
    """The values that are UTF-8 text (an absent value is ""); binary values are left out."""
    decoded = {}
    for key, raw in decode_metadata(value).items():
        if raw is None:
            decoded[key] = ""
            continue
        try:
            decoded[key] = raw.decode()
        except UnicodeDecodeError:
            continue
    return decoded
