"""The one rule for object keys on every backend: a relative, slash-separated name that cannot
leave its element, so a key that works on a directory element works on S3 and back."""

from __future__ import annotations

from tusingest.elements.backend import InvalidKey

# S3's limit; a directory element keeps it too so objects can move between kinds.
MAX_KEY_BYTES = 1024


def check_key(key: str) -> str:
    """Return key unchanged, or raise InvalidKey when it is empty, absolute, has an empty, ``.``
    or ``..`` segment, a NUL or a backslash, is not UTF-8 or is longer than 1024 bytes."""
    if not key or key.startswith("/") or "\0" in key or "\\" in key:
        raise InvalidKey(key)
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey(key) from None
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidKey(key)
    # An empty segment ("a//b", "a/") would alias another key on a filesystem.
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise InvalidKey(key)
    return key


def check_prefix(prefix: str) -> str:
    """Like check_key for a listing prefix: empty is allowed, and so is one trailing slash."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix
