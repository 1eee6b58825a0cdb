"""What a file is, judged from its first bytes by libmagic, and whether an allow-list of MIME patterns admits it.

Patterns are MIME types with shell wildcards, compared case-insensitively and without parameters:
``image/png``, ``image/*``, ``application/*+json``, ``application/vnd.oasis.opendocument.*``, ``*/*``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from fnmatch import fnmatchcase

import magic

# libmagic decides from the start of a file. 64 KiB holds what its rules look at for the formats we
# meet, including the third and fourth ZIP entries it inspects to tell DOCX/XLSX/PPTX from a plain ZIP.
HEAD_BYTES = 64 * 1024

# One libmagic handle for the process, made on first use (loading the database takes milliseconds
# and must not happen at import). A handle is not thread-safe, so every use holds the lock.
_lock = threading.Lock()
_handle: magic.Magic | None = None


def detect_mime(head: bytes) -> str:
    """The MIME type of a file whose first bytes are ``head`` (pass at least HEAD_BYTES when there are)."""
    global _handle
    with _lock:
        if _handle is None:
            _handle = magic.Magic(mime=True)
        mime: str = _handle.from_buffer(head)
    return mime


def essence(mime: str) -> str:
    """``type/subtype`` in lower case, without parameters: ``Text/Plain; charset=UTF-8`` -> ``text/plain``."""
    return mime.split(";", 1)[0].strip().lower()


def mime_matches(mime: str, pattern: str) -> bool:
    """Whether ``mime`` fits ``pattern`` (exact type or wildcards), ignoring case and parameters."""
    return fnmatchcase(essence(mime), essence(pattern))


def mime_allowed(mime: str, allowed: Sequence[str]) -> bool:
    """Whether ``allowed`` admits ``mime``. An empty list (blank entries do not count), like ``*/*``,
    admits everything."""
    patterns = [pattern for pattern in allowed if pattern.strip()]
    return not patterns or any(mime_matches(mime, pattern) for pattern in patterns)
