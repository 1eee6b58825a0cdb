"""A 300 MiB file through POST /api/files/upload on a real `tusingest serve`: streamed from the
socket to staging to the element, so the server's memory stays flat (invariant 6)."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil

from tests.e2e.test_serve_cli import clean_env, free_port, running

MiB = 1 << 20
SIZE = 300 * MiB
# A materialised file would add 300 MiB; staging, hashing and the put each hold a few MiB at most.
GROWTH_BOUND = 80 * MiB


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


async def test_a_300_mib_facade_upload_keeps_the_server_memory_flat(tmp_path: Path) -> None:
    port = free_port()
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    boundary = "----tusingest" + secrets.token_hex(8)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        for index in range(SIZE // MiB):
            piece = index.to_bytes(8, "big") + block[8:]  # every MiB differs, cheaply
            digest.update(piece)
            yield piece
        yield tail

    async with running(tmp_path, clean_env(), port) as process:
        rss = PeakRss(process.pid)
        async with httpx.AsyncClient(timeout=600) as client:
            response = await client.post(
                f"http://127.0.0.1:{port}/api/files/upload",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
        growth = rss.stop()
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == SIZE
    assert response.json()["sha256_hash"] == digest.hexdigest()
    assert growth < GROWTH_BOUND, f"server RSS grew by {growth / MiB:.0f} MiB"
    stored = [p for p in (tmp_path / "data" / "elements").rglob("*.bin")]
    assert len(stored) == 1 and stored[0].stat().st_size == SIZE
