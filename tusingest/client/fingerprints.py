"""Where an unfinished upload lives, kept across runs of the command: a small JSON file mapping a file's
fingerprint (absolute path, size, mtime_ns, endpoint) to its upload URL, as tus-js-client's
``findPreviousUploads`` does. An entry is removed once its upload is done (or refused)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_FILE = Path("~/.cache/tusingest/uploads.json")


@dataclass(frozen=True)
class Fingerprint:
    path: str  # absolute
    size: int
    mtime_ns: int
    endpoint: str

    @classmethod
    def of(cls, path: Path, endpoint: str) -> Fingerprint:
        stat = path.stat()
        return cls(str(path.resolve()), stat.st_size, stat.st_mtime_ns, endpoint)

    @property
    def key(self) -> str:
        return json.dumps([self.path, self.size, self.mtime_ns, self.endpoint])


class FingerprintStore:
    """Upload URLs by fingerprint. Every change is written at once (write, then rename), so that a
    command killed at any moment leaves a whole file behind."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._lock = asyncio.Lock()

    def _read(self) -> dict[str, str]:
        try:
            loaded = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: start afresh rather than refuse to upload
        if not isinstance(loaded, dict):
            return {}
        return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}

    def _write(self, entries: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(temporary, self.path)

    async def find(self, fingerprint: Fingerprint) -> str | None:
        async with self._lock:
            return self._read().get(fingerprint.key)

    async def remember(self, fingerprint: Fingerprint, url: str) -> None:
        async with self._lock:
            entries = self._read()
            entries[fingerprint.key] = url
            self._write(entries)

    async def forget(self, fingerprint: Fingerprint) -> None:
        async with self._lock:
            entries = self._read()
            if entries.pop(fingerprint.key, None) is not None:
                self._write(entries)
