"""Load generator for tusingest: starts a server, runs one upload scenario against it, reports figures.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/load.py --scenario single --store sqlite
    .venv/bin/python benchmarks/load.py --scenario single --store sqlite --size 2048
    .venv/bin/python benchmarks/load.py --scenario concurrent --store postgres --uploads 8
    .venv/bin/python benchmarks/load.py --scenario small --store sqlite --results /tmp/results.jsonl
    .venv/bin/python benchmarks/load.py --scenario single --profile /tmp/single.txt   # py-spy, collapsed stacks

Each run starts ``tusingest serve`` as a subprocess on a free port of 127.0.0.1, with a fresh temporary
STAGING_DIR and a fresh session store: a SQLite file in the temporary directory, or (``--store postgres``) a
PostgreSQL database created on ``--pg-admin-url``'s server, migrated with ``tusingest migrate`` and dropped
afterwards. It waits for ``/health/ready``, samples the server's resident memory (psutil, the process and its
children) every 50 ms in a background thread, runs the scenario, stops the server with SIGTERM and prints one
result line; ``--results FILE`` also appends the result to FILE as one JSON object per line.

Scenarios (sizes take a unit, ``64KiB``, ``512MiB``, ``2GiB``; a bare number is MiB):

``single``
    One upload of ``--size`` (512 MiB) in PATCHes of ``--patch-size`` (16 MiB). Afterwards the staged chunk
    files (``STAGING_DIR/<id>/*.chunk``) must add up to the upload's length.
``concurrent``
    ``--uploads`` (8) uploads of ``--size`` (64 MiB) in parallel, each in PATCHes of ``--patch-size`` (8 MiB).
``small``
    ``--uploads`` (200) uploads of ``--size`` (64 KiB), ``--in-flight`` (16) at a time, each one POST carrying
    its body (creation-with-upload).

Comparisons: ``--server bare`` runs ``benchmarks/bare_app.py`` (Starlette + Hypercorn appending bodies to a file, no
store, no fsync) instead of tusingest; ``--server node`` runs the Node reference, @tus/server with @tus/file-store
(``benchmarks/node_reference/server.mjs``; ``npm ci`` in that folder first); ``--patches recv1m,sfr,...`` runs
tusingest through ``benchmarks/serve_patched.py``, whose monkeypatches stand in for proposed optimisations;
``--tmp-dir /dev/shm`` puts staging and SQLite on tmpfs to take the disk out of the figures; ``--asgi granian``
serves tusingest on Granian instead of Hypercorn (``serve_patched.py``'s ``granian`` patch, ``pip install granian``
first), for the comparison in docs/benchmarks.md.

Figures: MiB/s (all bytes / wall time of the scenario, creations included), uploads/s, p50 and p99 latency of
the PATCH requests (of the POSTs for ``small``), the p50 and maximum of each upload's last PATCH (it answers once
the file is verified, placed and registered, so it shows what finalisation adds after the last byte), the
server's peak RSS (and its RSS when idle before the load), and the CPU seconds the server and this client used,
so that a client-bound run can be told apart.

The client is built not to be the bottleneck: one payload of the PATCH size is made once with ``os.urandom`` and
sent as ``bytes`` in every request, one ``aiohttp.ClientSession`` with a bounded ``TCPConnector`` pool serves the
whole run, and the client runs on uvloop when it is installed. Each upload is checked cheaply: every response's
Upload-Offset must be the expected one, and the final one must equal the length.

All traffic goes to 127.0.0.1. Every loop is bounded (a fixed number of requests; waits have deadlines; the whole
scenario is under ``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}
OCTET = "application/offset+octet-stream"
MiB = 1 << 20

DEFAULTS: dict[str, dict[str, Any]] = {
    "single": {"size": 512 * MiB, "patch_size": 16 * MiB, "uploads": 1, "in_flight": 1},
    "concurrent": {"size": 64 * MiB, "patch_size": 8 * MiB, "uploads": 8, "in_flight": 8},
    "small": {"size": 64 << 10, "patch_size": 64 << 10, "uploads": 200, "in_flight": 16},
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kib|k|mib|m|gib|g)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "k": 1 << 10, "kib": 1 << 10, "m": MiB, "mib": MiB, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``64KiB``, ``16MiB``, ``2GiB`` or a bare number of MiB, as bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64KiB, 512MiB, 2GiB or a number of MiB)")
    unit = (match.group(2) or "mib").lower()
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return value


def human(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


class BenchError(Exception):
    """The server misbehaved or an upload came out wrong: the run is not valid."""


# --- the server under test -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RssSampler(threading.Thread):
    """Samples the RSS of a process and its children every ``interval`` seconds; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.last = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def rss(self) -> int:
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def sample(self) -> int:
        try:
            value = self.rss()
        except psutil.NoSuchProcess:
            return self.last
        self.last = value
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def cpu_split(process: psutil.Process) -> tuple[float, float]:
    """User and system (kernel: fsync, file creation, socket work) CPU seconds of a process and its children."""
    user = system = 0.0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            user += times.user
            system += times.system
    return user, system


def _pg_admin(admin_url: str, statement: str) -> None:
    import asyncpg  # a dependency of tusingest: present in its venv

    async def run() -> None:
        connection = await asyncpg.connect(admin_url, timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    # A fresh loop in a worker thread: this may be called while the client's loop is running.
    with contextlib.closing(asyncio.new_event_loop()) as loop:
        result: list[BaseException] = []

        def target() -> None:
            try:
                loop.run_until_complete(run())
            except BaseException as exc:
                result.append(exc)

        worker = threading.Thread(target=target)
        worker.start()
        worker.join(timeout=60)
        if result:
            raise result[0]


@contextlib.contextmanager
def session_store(store: str, workdir: Path, admin_url: str, tusingest: str) -> Iterator[str]:
    """A DATABASE_URL for a fresh, empty, ready-to-use session store; a PostgreSQL database is dropped after."""
    if store == "sqlite":
        yield f"sqlite:///{workdir / 'tusingest.db'}"
        return
    name = f"tusbench_{secrets.token_hex(5)}"
    url = urlsplit(admin_url)._replace(path=f"/{name}").geturl()
    _pg_admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        migrate = subprocess.run(
            [tusingest, "migrate"],
            env={**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "warning"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if migrate.returncode != 0:
            raise BenchError(f"`tusingest migrate` failed ({migrate.returncode}):\n{migrate.stderr.strip()}")
        yield url
    finally:
        _pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    staging_dir: Path
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    listen = ["--host", "127.0.0.1", "--port", str(port)]
    here = Path(__file__).resolve().parent
    if args.server == "bare":
        return [sys.executable, str(here / "bare_app.py"), *listen]
    if args.server == "node":
        if not (here / "node_reference" / "node_modules" / "@tus" / "server").is_dir():
            raise BenchError("--server node: run `npm ci` in benchmarks/node_reference first")
        return [shutil.which("node") or "node", str(here / "node_reference" / "server.mjs"), *listen]
    patches = ",".join(filter(None, [args.patches, "granian" if args.asgi == "granian" else ""]))
    if patches:
        return [sys.executable, str(here / "serve_patched.py"), "--patches", patches, "serve", *listen]
    return [args.tusingest, "serve", *listen]


@contextlib.contextmanager
def run_server(
    args: argparse.Namespace,
    database_url: str,
    workdir: Path,
    max_file_mb: int,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """``settings``: more environment for the server (e.g. compression or clamd), over the defaults below."""
    port = free_port()
    staging = workdir / "staging"
    log_path = workdir / "server.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "STAGING_DIR": str(staging),
        # The finaliser places each file on this directory element, then frees the staging.
        "DEFAULT_ELEMENT_DIR": str(workdir / "elements"),
        "SERVICE_DISCOVERY_CACHE_FILE": str(workdir / "storage_elements.json"),
        "MAX_FILE_SIZE_MB": str(max_file_mb),
        # Quiet unless asked: LOG_LEVEL=info measures the access lines too (the observability A/B).
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "warning"),
        **(settings or {}),
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server_command(args, port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Server(process, f"http://127.0.0.1:{port}", staging, log_path)
    try:
        yield server
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


async def wait_ready(session: aiohttp.ClientSession, server: Server, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            async with session.get(server.base_url + "/health/ready") as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}: {await response.text()}"
        except aiohttp.ClientError as exc:
            last_error = str(exc) or type(exc).__name__
        await asyncio.sleep(0.1)
    raise BenchError(f"the server was not ready within {deadline_s:.0f} s ({last_error}):\n{server.log_tail()}")


# --- the scenarios ---------------------------------------------------------------------------------------------


@dataclass
class Recorder:
    latencies_ms: list[float] = field(default_factory=list)
    last_patch_ms: list[float] = field(default_factory=list)  # each upload's last PATCH: it waits for the file
    bytes_sent: int = 0
    uploads_done: int = 0
    upload_ids: list[str] = field(default_factory=list)

    async def timed(self, request: Callable[[], Awaitable[None]]) -> float:
        started = time.perf_counter()
        await request()
        elapsed = (time.perf_counter() - started) * 1000
        self.latencies_ms.append(elapsed)
        return elapsed


async def _fail(response: aiohttp.ClientResponse, what: str) -> BenchError:
    text = (await response.text(errors="replace"))[:300]
    return BenchError(f"{what}: HTTP {response.status} {text.strip()}")


def _offset(response: aiohttp.ClientResponse) -> int:
    value = response.headers.get("Upload-Offset")
    if value is None or not value.isdigit():
        raise BenchError(f"response {response.status} without a valid Upload-Offset ({value!r})")
    return int(value)


async def create(session: aiohttp.ClientSession, base_url: str, length: int) -> str:
    headers = {**TUS_HEADERS, "Upload-Length": str(length)}
    async with session.post(base_url + "/files/", headers=headers) as response:
        if response.status != 201:
            raise await _fail(response, "POST /files/")
        location = response.headers.get("Location")
    if not location:
        raise BenchError("POST /files/ answered 201 without a Location")
    return location


async def upload_by_patches(
    session: aiohttp.ClientSession, base_url: str, length: int, payload: bytes, recorder: Recorder
) -> str:
    """One upload: a POST, then PATCHes of len(payload) bytes (the last one shorter); returns its Location."""
    location = await create(session, base_url, length)
    offset = 0
    max_patches = -(-length // len(payload))
    for _ in range(max_patches):
        if offset >= length:
            break
        size = min(len(payload), length - offset)
        body = payload if size == len(payload) else payload[:size]
        headers = {**TUS_HEADERS, "Upload-Offset": str(offset), "Content-Type": OCTET}
        expected = offset + size

        async def patch(body: bytes = body, headers: dict[str, str] = headers, expected: int = expected) -> None:
            async with session.patch(location, data=body, headers=headers) as response:
                if response.status != 204:
                    raise await _fail(response, f"PATCH at offset {headers['Upload-Offset']}")
                got = _offset(response)
            if got != expected:
                raise BenchError(f"PATCH answered Upload-Offset {got}, expected {expected}")

        elapsed = await recorder.timed(patch)
        offset = expected
        recorder.bytes_sent += size
        if offset == length:
            recorder.last_patch_ms.append(elapsed)
    if offset != length:
        raise BenchError(f"upload ended at offset {offset}, its length is {length}")
    recorder.uploads_done += 1
    recorder.upload_ids.append(location.rstrip("/").rsplit("/", 1)[-1])
    return location


async def upload_in_one_post(session: aiohttp.ClientSession, base_url: str, payload: bytes, recorder: Recorder) -> None:
    headers = {**TUS_HEADERS, "Upload-Length": str(len(payload)), "Content-Type": OCTET}

    async def post() -> None:
        async with session.post(base_url + "/files/", data=payload, headers=headers) as response:
            if response.status != 201:
                raise await _fail(response, "POST /files/ with a body")
            got = _offset(response)
            location = response.headers.get("Location", "")
        if got != len(payload):
            raise BenchError(f"creation-with-upload answered Upload-Offset {got}, expected {len(payload)}")
        recorder.upload_ids.append(location.rstrip("/").rsplit("/", 1)[-1])

    await recorder.timed(post)
    recorder.bytes_sent += len(payload)
    recorder.uploads_done += 1


async def run_scenario(
    session: aiohttp.ClientSession, base_url: str, args: argparse.Namespace, payload: bytes, recorder: Recorder
) -> None:
    if args.scenario == "small":
        queue = iter(range(args.uploads))

        async def worker() -> None:
            for _ in queue:  # the shared iterator bounds the total number of uploads
                await upload_in_one_post(session, base_url, payload, recorder)

        await asyncio.gather(*(worker() for _ in range(min(args.in_flight, args.uploads))))
    else:
        await asyncio.gather(
            *(upload_by_patches(session, base_url, args.size, payload, recorder) for _ in range(args.uploads))
        )


def stored_bytes(elements_dir: Path) -> int:
    """Bytes of the files tusingest's finaliser placed (attr.json sidecars left out)."""
    if not elements_dir.is_dir():
        return 0
    return sum(p.stat().st_size for p in elements_dir.rglob("*") if p.is_file() and not p.name.endswith(".attr.json"))


def staged_bytes(staging_dir: Path, upload_id: str) -> int:
    if (staging_dir / upload_id).is_file():  # @tus/file-store (--server node): one file per upload
        return (staging_dir / upload_id).stat().st_size
    return sum(path.stat().st_size for path in (staging_dir / upload_id).glob("*.chunk"))


# --- profiling -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def py_spy(pid: int, output: str | None, rate: int, native: bool, blocking: bool) -> Iterator[None]:
    """Record the server with py-spy for the duration of the block (``--format raw``: collapsed stacks).

    ``--nonblocking`` unless ``blocking``: pausing the server's 8 threads for every sample halves the throughput of
    the ``small`` scenario, which would distort where the time goes.
    """
    if output is None:
        yield
        return
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        raise BenchError("--profile needs py-spy (.venv/bin/pip install py-spy)")
    fmt = "speedscope" if output.endswith(".json") else "flamegraph" if output.endswith(".svg") else "raw"
    command = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", fmt, "-o", output, "--threads"]
    if native:
        command.append("--native")
    if not blocking:
        command.append("--nonblocking")
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let py-spy attach before the load starts
    if recorder.poll() is not None:
        stderr = recorder.stderr.read().decode(errors="replace") if recorder.stderr else ""
        raise BenchError(f"py-spy could not attach to {pid}: {stderr.strip()}")
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(timeout=10)


# --- one run ---------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is the maximum."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


@dataclass
class Result:
    scenario: str
    store: str
    size: int
    patch_size: int
    uploads: int
    in_flight: int
    total_bytes: int
    wall_s: float
    mib_s: float
    uploads_s: float
    requests: int
    p50_ms: float
    p99_ms: float
    last_patch_p50_ms: float  # PATCH scenarios: the PATCH that completes an upload answers once the file is stored
    last_patch_max_ms: float
    peak_rss_mib: float
    idle_rss_mib: float
    server_cpu_s: float
    client_cpu_s: float
    rss_samples: int
    verified: str
    server_system_s: float = 0.0  # the kernel's share of server_cpu_s
    label: str = ""
    started_at: str = ""
    python: str = field(default_factory=lambda: sys.version.split()[0])

    def line(self) -> str:
        what = "POST" if self.scenario == "small" else "PATCH"
        label = f"[{self.label}] " if self.label else ""
        return (
            f"{self.scenario:<10} store={self.store:<8} {label}size={human(self.size)} x{self.uploads} "
            f"{self.mib_s:8.1f} MiB/s {self.uploads_s:8.1f} uploads/s  {what} p50 {self.p50_ms:7.1f} ms "
            f"p99 {self.p99_ms:7.1f} ms  last PATCH p50 {self.last_patch_p50_ms:7.1f} "
            f"max {self.last_patch_max_ms:7.1f} ms  "
            f"peak RSS {self.peak_rss_mib:6.1f} MiB (idle {self.idle_rss_mib:.1f})  "
            f"cpu server {self.server_cpu_s:.1f}s (sys {self.server_system_s:.1f}s) client {self.client_cpu_s:.1f}s  "
            f"wall {self.wall_s:.2f}s"
        )


async def bench(args: argparse.Namespace, server: Server) -> Result:
    payload = os.urandom(args.patch_size if args.scenario != "small" else args.size)
    connector = aiohttp.TCPConnector(limit=max(args.in_flight, 1), limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        await wait_ready(session, server)
        proc = psutil.Process(server.process.pid)
        sampler = RssSampler(server.process.pid)
        await asyncio.sleep(args.settle)  # start-up allocations done; see --settle
        idle = sampler.sample()
        sampler.peak = idle
        sampler.start()
        recorder = Recorder()
        try:
            with py_spy(
                server.process.pid, args.profile, args.profile_rate, args.profile_native, args.profile_blocking
            ):
                user_before, system_before = cpu_split(proc)
                client_before = time.process_time()
                started = time.perf_counter()
                async with asyncio.timeout(args.timeout):
                    await run_scenario(session, server.base_url, args, payload, recorder)
                wall = time.perf_counter() - started
                client_cpu = time.process_time() - client_before
                user_after, system_after = cpu_split(proc)
                server_user, server_system = user_after - user_before, system_after - system_before
        finally:
            sampler.stop()
        sampler.sample()

    expected_uploads = args.uploads
    if recorder.uploads_done != expected_uploads:
        raise BenchError(f"{recorder.uploads_done} uploads finished, {expected_uploads} expected")
    verified = f"{recorder.uploads_done} final offsets == length"
    if args.scenario == "single":
        stored = stored_bytes(server.staging_dir.parent / "elements")
        for upload_id in recorder.upload_ids:
            on_disk = staged_bytes(server.staging_dir, upload_id) or stored
            if on_disk != args.size:
                raise BenchError(f"upload {upload_id}: {on_disk} bytes on disk, {args.size} sent")
        verified += "; bytes on disk (staged, or placed by the finaliser) == length"
    return Result(
        scenario=args.scenario,
        store=args.store,
        size=args.size,
        patch_size=args.patch_size,
        uploads=args.uploads,
        in_flight=args.in_flight,
        total_bytes=recorder.bytes_sent,
        wall_s=round(wall, 4),
        mib_s=round(recorder.bytes_sent / MiB / wall, 2),
        uploads_s=round(recorder.uploads_done / wall, 2),
        requests=len(recorder.latencies_ms),
        p50_ms=round(percentile(recorder.latencies_ms, 50), 2),
        p99_ms=round(percentile(recorder.latencies_ms, 99), 2),
        last_patch_p50_ms=round(percentile(recorder.last_patch_ms, 50), 2) if recorder.last_patch_ms else 0.0,
        last_patch_max_ms=round(max(recorder.last_patch_ms), 2) if recorder.last_patch_ms else 0.0,
        peak_rss_mib=round(sampler.peak / MiB, 1),
        idle_rss_mib=round(idle / MiB, 1),
        server_cpu_s=round(server_user + server_system, 2),
        server_system_s=round(server_system, 2),
        client_cpu_s=round(client_cpu, 2),
        rss_samples=sampler.samples,
        verified=verified,
        label=args.label or default_label(args),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def default_label(args: argparse.Namespace) -> str:
    parts = []
    if args.server == "bare":
        parts.append("bare app")
    if args.server == "node":
        parts.append("node @tus/server")
    if args.patches:
        parts.append(f"patches={args.patches}")
    if args.asgi != "hypercorn":
        parts.append(f"asgi={args.asgi}")
    if args.tmp_dir:
        parts.append(f"tmp={args.tmp_dir}")
    return " ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start tusingest on 127.0.0.1, run one upload scenario against it, report throughput, "
        "latency and the server's peak RSS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--scenario", choices=sorted(DEFAULTS), default="single")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--size", type=parse_size, help="bytes per upload (default per scenario: 512MiB/64MiB/64KiB)")
    parser.add_argument("--patch-size", type=parse_size, help="bytes per PATCH (single 16MiB, concurrent 8MiB)")
    parser.add_argument("--uploads", type=int, help="number of uploads (concurrent 8, small 200)")
    parser.add_argument("--in-flight", type=int, help="uploads in flight at once (small: 16)")
    parser.add_argument("--results", type=Path, help="append the result to this file as a JSON line")
    parser.add_argument("--label", default="", help="free text stored with the JSON result")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL URL of a user who may create databases (--store postgres); env BENCH_PG_ADMIN_URL",
    )
    parser.add_argument(
        "--server",
        choices=["tusingest", "bare", "node"],
        default="tusingest",
        help="bare: benchmarks/bare_app.py, Starlette + Hypercorn appending bodies to a file (no store, no fsync); "
        "node: benchmarks/node_reference/server.mjs, @tus/server + @tus/file-store",
    )
    parser.add_argument("--patches", default="", help="run tusingest through serve_patched.py with these patches")
    parser.add_argument(
        "--asgi",
        choices=["hypercorn", "granian"],
        default="hypercorn",
        help="the ASGI server tusingest runs on (granian: serve_patched.py's granian patch; issue 16 part 5)",
    )
    parser.add_argument("--tusingest", default=str(Path(sys.executable).parent / "tusingest"), help="the CLI")
    parser.add_argument("--tmp-dir", default=None, help="where the staging directory and SQLite file go")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="seconds between the server's readiness and the load (see docs/benchmarks.md: on a VM that reports"
        " free pages to its host, a run that starts soon after the previous one freed its files writes cheaply)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline for the whole scenario, seconds")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="deadline per request, seconds")
    parser.add_argument("--profile", help="record the server with py-spy into this file (.svg, .json or raw text)")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--profile-blocking", action="store_true", help="let py-spy pause the server per sample")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.scenario].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.scenario == "single":
        args.uploads = args.in_flight = 1
    if args.scenario == "concurrent":
        args.in_flight = args.uploads
    if args.scenario == "small":
        args.patch_size = args.size
    if args.asgi != "hypercorn" and args.server != "tusingest":
        parser.error("--asgi applies to --server tusingest only")
    if args.server in ("bare", "node") and args.store != "sqlite":
        parser.error(f"--server {args.server} has no session store: use --store sqlite (the default)")
    if args.uploads < 1 or args.in_flight < 1:
        parser.error("--uploads and --in-flight must be at least 1")
    if args.scenario != "small" and args.patch_size > args.size:
        args.patch_size = args.size
    return args


def uvloop_runner() -> Callable[[Any], Any]:
    """``uvloop.run`` when uvloop is installed (as the server runs), else ``asyncio.run``."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run
    return asyncio.run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = uvloop_runner()
    os.sync()  # start from clean page cache: dirty pages of a previous run would be written back during this one
    workdir = Path(tempfile.mkdtemp(prefix="tusbench-", dir=args.tmp_dir))
    max_file_mb = max(5120, -(-args.size // MiB))
    try:
        with (
            session_store(args.store, workdir, args.pg_admin_url, args.tusingest) as database_url,
            run_server(args, database_url, workdir, max_file_mb) as server,
        ):
            result = runner(bench(args, server))
    except BenchError as exc:
        print(f"FAILED {args.scenario} store={args.store}: {exc}", file=sys.stderr)
        log = workdir / "server.log"
        if log.is_file():
            print("server log (last lines):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(result.line(), flush=True)
    if args.results is not None:
        with open(args.results, "a") as out:
            out.write(json.dumps(asdict(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
