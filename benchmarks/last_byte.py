"""Time from an upload's last byte to its final response (p50, p99), plain, with brotli on text and with clamd.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/last_byte.py                       # 1 MiB x 50, 64 MiB x 10, 1 GiB x 3; 3 modes
    .venv/bin/python benchmarks/last_byte.py --mode plain --sizes 512MiB=5
    .venv/bin/python benchmarks/last_byte.py --quick               # check the harness in a few seconds

Each mode gets a fresh ``tusingest serve`` on SQLite, started and stopped by ``benchmarks/load.py`` (its temporary
STAGING_DIR, directory element and RSS sampler), with:

``plain``
    random bytes, no scan, no compression (``COMPRESSION_ENABLED=false``).
``brotli``
    a log-like text file (libmagic: text/plain) with ``COMPRESSION_ENABLED=true``, ``COMPRESSION_ALGORITHM=brotli``
    and ``COMPRESSION_MIN_SIZE_MB=0``, so that 1 MiB is compressed too (the card's default minimum is 10 MiB).
``clamd``
    random bytes, ``VIRUS_SCAN_ENABLED=true`` against a private clamd with the EICAR-only database, started by
    ``tests/fixtures/clamd.py`` (StreamMaxLength above the largest size), no compression.

An upload is a POST, then PATCHes of ``--patch-size`` (16 MiB; one PATCH for 1 MiB). Every PATCH goes on a
connection of its own through ``tests/fixtures/rawhttp.py``, so the client can tell when its body left: the
transport's write-buffer limit is 0, so ``drain()`` returns once the last byte of the body is handed to the
kernel (``send`` returned for it). **What is timed: from that moment to the arrival of the response head**
(status line and headers). On loopback the kernel may still hold up to a socket buffer of the body (a few MiB)
that the server has not read yet, so the figure includes reading that tail. The same figure for the PATCHes that
do not complete an upload (``mid`` below) shows that fixed part: the tail of the body, the fsync and the commit;
what the last PATCH adds beyond it is finalisation (inspection pass, scan, compression, placing, registering).

Every upload's first 32 bytes are unique, so no cache (clamd keeps one of clean files, by MD5) sees the same file
twice; the bytes of clamd's own scans are tagged anew too.
The last response must be 204 with ``ArtStore-Upload-Status: completed`` and the SHA-256 the client computed.

Also clamd's own time for the same bytes: a direct INSTREAM (``tusingest.finalise.clamd.ClamdScanner``, as the
finaliser uses it) of the whole file and of its last PATCH's bytes alone, from the first byte sent to the verdict,
so the target "within clamd's own scan time of the last chunk" can be judged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urljoin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load
from benchmarks.finalise import text_block
from tests.fixtures.clamd import Clamd, start_clamd
from tests.fixtures.rawhttp import open_request, read_response
from tusingest.finalise.clamd import ClamdScanner

MiB = load.MiB
MODES = ("plain", "brotli", "clamd")
DEFAULT_SIZES = "1MiB=50,64MiB=10,1GiB=3"
QUICK_SIZES = "1MiB=3,32MiB=2"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``1MiB=50,64MiB=10``: (size in bytes, repetitions) pairs."""
    pairs = []
    for item in text.split(","):
        size, _, reps = item.partition("=")
        pairs.append((load.parse_size(size), int(reps or "1")))
    return pairs


def mode_settings(mode: str, clamd: Clamd | None) -> dict[str, str]:
    settings = {
        "FINALISE_WAIT_SECONDS": "3600",  # the last PATCH answers with the result, however long it takes
        "COMPRESSION_ENABLED": "true" if mode == "brotli" else "false",
        "VIRUS_SCAN_ENABLED": "true" if mode == "clamd" else "false",
    }
    if mode == "brotli":
        settings |= {"COMPRESSION_ALGORITHM": "brotli", "COMPRESSION_MIN_SIZE_MB": "0"}
    if mode == "clamd":
        assert clamd is not None
        settings |= {"CLAMD_URL": clamd.unix_url, "VIRUS_SCAN_TIMEOUT_SECONDS": "3600"}
    return settings


class Payload:
    """One upload's PATCH bodies: a block of the PATCH size (random or text), made once per run, whose first 32
    bytes are replaced per upload so every upload is a different file."""

    def __init__(self, mode: str, patch_size: int) -> None:
        self.block = text_block(patch_size) if mode == "brotli" else os.urandom(patch_size)
        self.text = mode == "brotli"

    def bodies(self, size: int, serial: int) -> list[bytes]:
        bodies = [self.tagged(self.block[: min(size, len(self.block))], serial)]
        while sum(map(len, bodies)) < size:
            bodies.append(self.block[: min(len(self.block), size - sum(map(len, bodies)))])
        return bodies

    @staticmethod
    def tagged(body: bytes, serial: int) -> bytes:
        """``body`` with its first 32 bytes made unique (a serial number and the time)."""
        return f"upload {serial:08d} {time.time_ns():016x}\n".encode()[:32].ljust(32, b".") + body[32:]


async def patch(
    location: str, offset: int, body: bytes, rate: float | None = None
) -> tuple[float, float, dict[str, str]]:
    """One PATCH on a connection of its own: (ms for the whole request, ms from its last byte sent to the
    response head, the response's headers). ``rate``: bytes per second the client sends at (a network
    slower than loopback), in 1 MiB writes; None: as fast as the socket takes them."""
    headers = {
        **load.TUS_HEADERS,
        "Upload-Offset": str(offset),
        "Content-Type": load.OCTET,
        "Content-Length": str(len(body)),
    }
    started = time.perf_counter()
    reader, writer = await open_request(location, "PATCH", headers)
    try:
        # No buffering above the kernel: drain() returns once send() took the body's last byte.
        writer.transport.set_write_buffer_limits(high=0)
        if rate is None:
            writer.write(body)
            await writer.drain()
        else:
            for start in range(0, len(body), MiB):
                writer.write(body[start : start + MiB])
                await writer.drain()
                due = started + (start + MiB) / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))  # the pace of the simulated link
        sent = time.perf_counter()
        status, answer = await read_response(reader)
        answered = time.perf_counter()
    finally:
        writer.close()
    if status != 204:
        raise load.BenchError(f"PATCH at offset {offset}: HTTP {status} {answer}")
    expected = offset + len(body)
    if answer.get("upload-offset") != str(expected):
        raise load.BenchError(f"PATCH answered Upload-Offset {answer.get('upload-offset')}, expected {expected}")
    return (answered - started) * 1000, (answered - sent) * 1000, answer


@dataclass
class Sample:
    last_byte_ms: list[float] = field(default_factory=list)  # the last PATCH: its last byte to the final response
    last_patch_ms: list[float] = field(default_factory=list)  # the whole last PATCH
    mid_ms: list[float] = field(default_factory=list)  # the other PATCHes: last byte to response (no finalisation)
    clamd_whole_ms: list[float] = field(default_factory=list)
    clamd_last_patch_ms: list[float] = field(default_factory=list)


async def upload(base_url: str, bodies: list[bytes], sample: Sample, rate: float | None = None) -> None:
    size = sum(map(len, bodies))
    sha256 = hashlib.sha256()
    for body in bodies:
        sha256.update(body)
    reader, writer = await open_request(
        base_url + "/files/", "POST", {**load.TUS_HEADERS, "Upload-Length": str(size), "Content-Length": "0"}
    )
    try:
        status, answer = await read_response(reader)
    finally:
        writer.close()
    if status != 201 or "location" not in answer:
        raise load.BenchError(f"POST /files/: HTTP {status} {answer}")
    location = urljoin(base_url + "/files/", answer["location"])
    offset = 0
    for index, body in enumerate(bodies):
        whole_ms, after_last_byte_ms, answer = await patch(location, offset, body, rate)
        offset += len(body)
        if index < len(bodies) - 1:
            sample.mid_ms.append(after_last_byte_ms)
    if answer.get("artstore-upload-status") != "completed" or answer.get("artstore-sha256") != sha256.hexdigest():
        raise load.BenchError(f"the last PATCH did not answer with the registered file and its SHA-256: {answer}")
    sample.last_byte_ms.append(after_last_byte_ms)
    sample.last_patch_ms.append(whole_ms)


async def clamd_own_time(scanner: ClamdScanner, bodies: list[bytes], serial: int, sample: Sample) -> None:
    """clamd's time from the first byte of a direct INSTREAM to its verdict: the whole file, then its last PATCH
    alone. Each is tagged anew: clamd caches the verdicts of clean files by MD5, and has seen these bytes."""
    whole = [Payload.tagged(bodies[0], -serial), *bodies[1:]]
    last = [Payload.tagged(bodies[-1], -serial)]
    for parts, into in ((whole, sample.clamd_whole_ms), (last, sample.clamd_last_patch_ms)):
        started = time.perf_counter()
        async with scanner.session() as session:
            for part in parts:
                await session.feed(part)
            result = await session.finish()
        into.append((time.perf_counter() - started) * 1000)
        if not result.clean:
            raise load.BenchError(f"clamd found {result.signature} in random bytes")


@dataclass
class Row:
    mode: str
    size: int
    uploads: int
    last_byte_p50_ms: float
    last_byte_p99_ms: float
    last_patch_p50_ms: float
    mid_p50_ms: float | None
    mid_p99_ms: float | None
    clamd_whole_p50_ms: float | None
    clamd_last_patch_p50_ms: float | None
    peak_rss_mib: float
    started_at: str

    def line(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}"

        return (
            f"{self.mode:<7} {load.human(self.size):>7} x{self.uploads:<3} last byte -> response p50 "
            f"{self.last_byte_p50_ms:7.0f} ms p99 {self.last_byte_p99_ms:7.0f} ms  (whole last PATCH p50 "
            f"{self.last_patch_p50_ms:.0f}; mid PATCHes p50 {ms(self.mid_p50_ms)} p99 {ms(self.mid_p99_ms)})  "
            f"clamd alone: whole {ms(self.clamd_whole_p50_ms)} ms, last PATCH {ms(self.clamd_last_patch_p50_ms)} ms  "
            f"peak RSS {self.peak_rss_mib:.0f} MiB"
        )


def _p(values: list[float], q: float) -> float | None:
    return round(load.percentile(values, q), 1) if values else None


async def run_mode(
    mode: str,
    server: load.Server,
    sizes: list[tuple[int, int]],
    patch_size: int,
    clamd: Clamd | None,
    rate: float | None = None,
) -> list[Row]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await load.wait_ready(session, server)
    scanner = ClamdScanner(clamd.unix_url, timeout=3600) if clamd is not None else None
    payload = Payload(mode, patch_size)
    rows, serial = [], 0
    for size, reps in sizes:
        sample = Sample()
        sampler = load.RssSampler(server.process.pid)
        sampler.start()
        try:
            for _ in range(reps):
                serial += 1
                bodies = payload.bodies(size, serial)
                await upload(server.base_url, bodies, sample, rate)
                if scanner is not None:
                    await clamd_own_time(scanner, bodies, serial, sample)
        finally:
            sampler.stop()
        row = Row(
            mode=mode,
            size=size,
            uploads=reps,
            last_byte_p50_ms=round(load.percentile(sample.last_byte_ms, 50), 1),
            last_byte_p99_ms=round(load.percentile(sample.last_byte_ms, 99), 1),
            last_patch_p50_ms=round(load.percentile(sample.last_patch_ms, 50), 1),
            mid_p50_ms=_p(sample.mid_ms, 50),
            mid_p99_ms=_p(sample.mid_ms, 99),
            clamd_whole_p50_ms=_p(sample.clamd_whole_ms, 50),
            clamd_last_patch_p50_ms=_p(sample.clamd_last_patch_ms, 50),
            peak_rss_mib=round(sampler.peak / MiB, 1),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        print(row.line(), flush=True)
        rows.append(row)
    return rows


@contextlib.contextmanager
def private_clamd(workdir: Path, largest: int) -> Iterator[Clamd]:
    directory = workdir / "clamd"
    directory.mkdir()
    # MaxScanSize counts what clamd extracts too: random bytes now and then hold what parses as an
    # embedded file, and a limit at the stream's own size then refuses an upload at random.
    clamd = start_clamd(directory, stream_max_length=largest + 64 * MiB, max_file_size=4 * largest)
    try:
        yield clamd
    finally:
        clamd.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", action="append", choices=MODES, help="repeatable; default: all three")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="size=repetitions, comma-separated")
    parser.add_argument("--patch-size", type=load.parse_size, default=16 * MiB)
    parser.add_argument("--quick", action="store_true", help=f"--sizes {QUICK_SIZES}: check the harness")
    parser.add_argument("--results", type=Path, help="append each row to this file as a JSON line")
    parser.add_argument("--tusingest", default=str(Path(sys.executable).parent / "tusingest"), help="the CLI")
    parser.add_argument(
        "--client-mib-s", type=float, help="the client sends at this many MiB/s (a link slower than loopback)"
    )
    args = parser.parse_args(argv)
    rate = args.client_mib_s * MiB if args.client_mib_s else None
    sizes = parse_sizes(QUICK_SIZES if args.quick else args.sizes)
    largest = max(size for size, _ in sizes)
    # load.py's own defaults for everything about the server but the settings of each mode.
    server_args = load.parse_args(["--tusingest", args.tusingest])
    runner = load.uvloop_runner()
    os.sync()
    try:
        for mode in args.mode or MODES:
            workdir = Path(tempfile.mkdtemp(prefix=f"tuslastbyte-{mode}-"))
            try:
                with contextlib.ExitStack() as stack:
                    clamd = stack.enter_context(private_clamd(workdir, largest)) if mode == "clamd" else None
                    database_url = stack.enter_context(load.session_store("sqlite", workdir, "", args.tusingest))
                    max_file_mb = -(-largest // MiB) + 16
                    server = stack.enter_context(
                        load.run_server(server_args, database_url, workdir, max_file_mb, mode_settings(mode, clamd))
                    )
                    rows = runner(run_mode(mode, server, sizes, args.patch_size, clamd, rate))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            if args.results is not None:
                with open(args.results, "a") as out:
                    out.writelines(json.dumps(asdict(row)) + "\n" for row in rows)
    except load.BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
