"""The checksum extension: ``Upload-Checksum: <algorithm> <base64 digest>`` names the digest of
one request's body, and the bytes are kept only if they hash to it.

The digest is computed as the body passes (``BodyChecksum.update`` per received message), so
the body is never held in memory and a request without the header pays nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Callable
from typing import Protocol

from starlette.requests import Request

from tusingest.tus.base import TusOptions
from tusingest.tus.errors import BadRequest


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    """zlib's CRC-32 with hashlib's shape; the digest is the 4-byte big-endian value."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


# In the order advertised in Tus-Checksum-Algorithm.
_ALGORITHMS: dict[str, tuple[Callable[[], _Digest], int]] = {
    "md5": (hashlib.md5, 16),
    "sha1": (hashlib.sha1, 20),
    "sha256": (hashlib.sha256, 32),
    "sha512": (hashlib.sha512, 64),
    "crc32": (_Crc32, 4),
}
ALGORITHMS = tuple(_ALGORITHMS)


class BodyChecksum:
    """The digest a request's body must have, and the running hash of what arrived so far."""

    def __init__(self, algorithm: str, expected: bytes) -> None:
        factory, _ = _ALGORITHMS[algorithm]
        self.algorithm = algorithm
        self.expected = expected
        self._digest = factory()

    def update(self, data: bytes) -> None:
        self._digest.update(data)

    def matches(self, found: bytes | None = None) -> bool:
        """Whether the body hashed to the expected digest: ``found`` when the body was hashed
        elsewhere (staging's running digest), else what ``update`` saw."""
        return (found if found is not None else self._digest.digest()) == self.expected


def parse_checksum(value: str) -> BodyChecksum:
    """``<algorithm> <base64 digest>``, one space between; strict base64 of the right length.

    An algorithm we do not know is 400 as the protocol says, as is any malformed value.
    """
    parts = value.strip().split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise BadRequest("invalid Upload-Checksum header: must be '<algorithm> <base64 digest>'")
    algorithm, encoded = parts
    if algorithm not in _ALGORITHMS:
        supported = ",".join(ALGORITHMS)
        raise BadRequest(f"unsupported Upload-Checksum algorithm {algorithm!r}; supported: {supported}")
    try:
        expected = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("invalid Upload-Checksum header: the digest is not base64") from None
    _, size = _ALGORITHMS[algorithm]
    if len(expected) != size:
        raise BadRequest(f"invalid Upload-Checksum header: a {algorithm} digest is {size} bytes, not {len(expected)}")
    return BodyChecksum(algorithm, expected)


def request_checksum(request: Request, options: TusOptions) -> BodyChecksum | None:
    """The checksum the request's body must match, or None when it sends none.

    With the extension disabled the header is refused rather than ignored: a client that sends
    it expects its bytes verified, and silently storing them unverified would break that promise.
    """
    value = request.headers.get("upload-checksum")
    if value is None:
        return None
    if not options.has("checksum"):
        raise BadRequest("the checksum extension is not enabled; send no Upload-Checksum")
    return parse_checksum(value)
