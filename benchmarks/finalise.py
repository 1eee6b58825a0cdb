"""Finalisation throughput and memory: a real `tusingest serve` takes a large upload, and the PATCH
that sends its last byte is timed, since it waits for the saga (read, hash, scan, compress,
place on a directory element, attr.json, register). Peak RSS of the server is sampled throughout.

    .venv/bin/python benchmarks/finalise.py --size-mib 1024 --mode plain --mode scan --mode brotli

Modes: plain (no scan, no compression, random bytes), scan (clamd INSTREAM, random bytes),
brotli (text that compresses, quality 4). `scan` starts a private clamd as the tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.clamd import start_clamd

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
MiB = 1 << 20
REQUEST = 64 * MiB


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def text_block(size: int) -> bytes:
    line = b"2026-11-28T12:00:00Z INFO upload id=%08d path=/files/%08d bytes=%d ok\n"
    out = bytearray()
    n = 0
    while len(out) < size:
        out += line % (n, n * 7919 % 99991, n * 31)
        n += 1
    return bytes(out[:size])


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def run_mode(mode: str, size: int, workdir: Path, clamd_url: str | None) -> dict[str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "STAGING_", "REDIS_"))}
    env |= {
        "MAX_FILE_SIZE_MB": str(size // MiB + 16),
        "FINALISE_WAIT_SECONDS": "3600",
        "COMPRESSION_ENABLED": "true" if mode == "brotli" else "false",
        "VIRUS_SCAN_ENABLED": "true" if mode == "scan" else "false",
        "LOG_LEVEL": "warning",
    }
    if clamd_url:
        env["CLAMD_URL"] = clamd_url
    directory = workdir / mode
    directory.mkdir()
    server = subprocess.Popen([sys.executable, "-m", "tusingest", "serve", "--port", str(port)], cwd=directory, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=3600) as client:
            for _ in range(200):
                try:
                    if (await client.get(base + "/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            block = text_block(REQUEST) if mode == "brotli" else os.urandom(REQUEST)
            created = await client.post(base + "/files/", headers=TUS | {"Upload-Length": str(size)})
            url = created.headers["Location"]
            with PeakRss(server.pid) as rss:
                offset = 0
                while offset < size - 1:
                    body = block[: min(REQUEST, size - 1 - offset)]
                    response = await client.patch(
                        url, headers=TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS}, content=body
                    )
                    assert response.status_code == 204, response.text
                    offset += len(body)
                started = time.perf_counter()
                last = await client.patch(
                    url, headers=TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS}, content=b"\n"
                )
                elapsed = time.perf_counter() - started
            assert last.status_code == 204 and last.headers.get("ArtStore-Upload-Status") == "completed", last.headers
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(directory, ignore_errors=True)
    return {"seconds": elapsed, "mib_per_s": size / MiB / elapsed, "peak_rss_mib": rss.peak / MiB}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--mode", action="append", choices=["plain", "scan", "brotli"])
    args = parser.parse_args()
    modes = args.mode or ["plain", "scan", "brotli"]
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="tusingest-finalise-") as tmp:
        workdir = Path(tmp)
        (workdir / "clamd").mkdir()
        clamd = start_clamd(workdir / "clamd", stream_max_length=size + 64 * MiB) if "scan" in modes else None
        try:
            print(f"{args.size_mib} MiB per upload; finalisation = the PATCH of the last byte")
            print(f"{'mode':<8} {'seconds':>8} {'MiB/s':>8} {'peak RSS MiB':>13}")
            for mode in modes:
                result = await run_mode(mode, size, workdir, clamd.tcp_url if clamd and mode == "scan" else None)
                print(
                    f"{mode:<8} {result['seconds']:>8.1f} {result['mib_per_s']:>8.0f} {result['peak_rss_mib']:>13.0f}"
                )
        finally:
            if clamd is not None:
                clamd.stop()


if __name__ == "__main__":
    asyncio.run(main())
