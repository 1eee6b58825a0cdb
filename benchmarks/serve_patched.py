"""``tusingest serve`` with experimental monkeypatches: measures what a proposed optimisation would gain.

Nothing here is meant for production: each patch stands in for a change proposed to tusingest (or is an unsafe
upper bound, said so below) so that ``load.py --patches`` can measure its effect before anyone writes it::

    .venv/bin/python benchmarks/load.py --scenario single --patches recv1m,sfr
    .venv/bin/python benchmarks/serve_patched.py --patches recv1m serve --host 127.0.0.1 --port 8020

Patches (comma-separated):

``recv1m``
    Hypercorn reads the socket in 64 KiB pieces (``hypercorn.asyncio.tcp_server.MAX_RECV``); read 1 MiB at a time,
    so every per-read cost (h11 events, ASGI messages, queue hand-offs, buffer copies) is paid 16 times less often.
``sfr``
    After each staging ``writev`` (every 4 MiB), start writeback with ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
    (through ctypes: the os module lacks it), so the fsync at the end of the PATCH finds most pages already on
    their way to the disk.
``writethread``
    The staging ``writev`` (4 MiB at a time) runs in a worker thread instead of on the event loop, double-buffered
    (at most one batch per upload in flight; ``sync`` and ``close`` wait for it), so that copying into the page
    cache overlaps with parsing the next bytes. With ``sfr`` the writeback is started from that thread too.
``nofsync``
    Unsafe upper bound: no fsync of staged files or directories at all (what a store without durability does).
``nodirfsync``
    Unsafe upper bound: fsync staged files but never their directories.
``pool32``
    A 32-thread default executor instead of asyncio's min(32, cpus + 4) = 6 on this machine.
``post1``
    creation-with-upload writes the upload row once, already COMPLETE when the body is the whole upload, instead of
    INSERT, then UPDATE (mark complete), then SELECT: one database round trip instead of three.
``plainhooks``
    The tus path only: the finaliser is swapped for ``tusingest.tus.PlainHooks``, so a complete upload is only
    marked complete (no hashing, no placing, no registration). What ``benchmarks/compare.py`` calls "tus path";
    a benchmark-only launcher, never a production setting.
``postfast``
    ``post1`` plus: the body of a creation-with-upload (at most the write buffer, 4 MiB) is gathered in memory and
    staged in one worker-thread call (mkdir, open, write, fsync file, fsync directory, fsync parent, close) instead
    of two thread hops and a listing of the new, empty directory.
``granian``
    Granian serves the app instead of Hypercorn (``tests/fixtures/granian.py``, same Config, same start-up and
    SIGTERM path); ``load.py --asgi granian`` asks for it. Measured, not offered (docs/benchmarks.md).
``appqueue2``
    Hypercorn's ``max_app_queue_size`` 2 instead of 8: at most 2 reads of 512 KiB wait per connection for the app
    (1 MiB instead of 4 MiB), the rest waits in the kernel's socket buffers. For the peak-RSS experiments.
``hops``
    Not an optimisation: counts the hand-offs to other threads (thread pools, aiosqlite's thread) by the function
    handed over, and writes them to ``$HOPS_OUT`` (/tmp/hops.txt) when the server exits: where a small upload's
    thread trips come from.
``tracemalloc``
    Not an optimisation: traces Python's allocations and writes the top lines of the snapshot that held the most
    at once, and what grew since a baseline, to ``$TRACEMALLOC_OUT`` when the server exits (slow): which buffers
    make the peak RSS, what a long run accumulates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def patch_recv1m() -> None:
    import hypercorn.asyncio.tcp_server as tcp_server

    tcp_server.MAX_RECV = 1 << 20


def patch_sfr() -> None:
    import ctypes
    import ctypes.util

    from tusingest.staging import directory

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    sync_file_range = libc.sync_file_range  # the os module does not expose it
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    sync_file_range_write = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages, do not wait
    original = directory.ChunkWriter._flush

    def start_writeback(fd: int) -> None:
        sync_file_range(fd, 0, 0, sync_file_range_write)

    def _flush(self: directory.ChunkWriter) -> None:
        pending = self._pending_bytes
        original(self)
        if pending:
            start_writeback(self._fd)

    global _sync_file_range
    _sync_file_range = start_writeback
    directory.ChunkWriter._flush = _flush  # type: ignore[method-assign]


_sync_file_range: Callable[[int], None] | None = None  # set by patch_sfr, used by patch_writethread


def patch_writethread() -> None:
    """Staging writes in a worker thread, double-buffered: the loop parses the next 4 MiB while the last is written.

    The loop waits for a writer's previous batch before it hands over the next one (at most one batch in flight
    per upload), and sync() and close() wait for it too, so the order of bytes and the commit point are unchanged.
    """
    from concurrent.futures import Future

    from tusingest.staging import directory

    executor = ThreadPoolExecutor(2, thread_name_prefix="staging-write")
    in_flight: dict[int, Future[None]] = {}
    original_sync = directory.ChunkWriter.sync
    original_close = directory.ChunkWriter.close

    def wait(writer: directory.ChunkWriter) -> None:
        future = in_flight.pop(id(writer), None)
        if future is not None:
            future.result()

    def _flush(self: directory.ChunkWriter) -> None:
        wait(self)
        if not self._pending:
            return
        if self._flushed - self._chunk_start >= self._staging.chunk_max_bytes:
            self._roll()
        buffers, fd, total = self._pending, self._fd, self._pending_bytes
        self._flushed += total
        self._pending = []
        self._pending_bytes = 0

        def write() -> None:
            done = os.writev(fd, buffers)
            rest = b"".join(buffers)[done:] if done != total else b""
            while rest:
                rest = rest[os.write(fd, rest) :]
            if _sync_file_range is not None:
                _sync_file_range(fd)

        in_flight[id(self)] = executor.submit(write)

    async def sync(self: directory.ChunkWriter) -> int:
        self._flush()
        future = in_flight.pop(id(self), None)
        if future is not None:
            await asyncio.wrap_future(future)
        return await original_sync(self)

    def close(self: directory.ChunkWriter) -> None:
        wait(self)
        original_close(self)

    directory.ChunkWriter._flush = _flush  # type: ignore[method-assign]
    directory.ChunkWriter.sync = sync  # type: ignore[method-assign]
    directory.ChunkWriter.close = close  # type: ignore[method-assign]


def patch_nofsync() -> None:
    from tusingest.staging import directory

    directory.os = _OsWithoutFsync()  # type: ignore[assignment]
    directory._fsync_dir = lambda path: None


class _OsWithoutFsync:
    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        return None


def patch_nodirfsync() -> None:
    from tusingest.staging import directory

    directory._fsync_dir = lambda path: None


def patch_pool32() -> None:
    from tusingest import cli

    original = cli._serve

    async def _serve(settings: Any, listener: Any, *args: Any) -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="pool32"))
        await original(settings, listener, *args)

    cli._serve = _serve


def _post_handle(fast: bool) -> Callable[..., Any]:
    from starlette.requests import Request
    from starlette.responses import Response

    from tusingest.sessions import Upload, UploadState
    from tusingest.sessions.model import new_upload_id, utcnow
    from tusingest.staging import directory
    from tusingest.tus.base import expires_header, tus_headers
    from tusingest.tus.body import Interrupt
    from tusingest.tus.errors import TooLarge
    from tusingest.tus.headers import OFFSET_OCTET_STREAM, parse_non_negative
    from tusingest.tus.patch import content_type
    from tusingest.tus.post import PostHandler

    original = PostHandler.handle

    async def stage_at_once(staging: directory.DirectoryStaging, upload_id: str, body: bytes) -> int:
        folder = staging.directory(upload_id)

        def _write() -> int:
            folder.mkdir(parents=True)
            fd = os.open(directory._chunk_path(folder, 0), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            directory._fsync_dir(folder)
            directory._fsync_dir(folder.parent)
            return len(body)

        return await asyncio.to_thread(_write)

    async def handle(self: PostHandler, request: Request) -> Response:
        ctx = self.ctx
        with_body = content_type(request) == OFFSET_OCTET_STREAM
        length = parse_non_negative("Upload-Length", request.headers.get("upload-length"), required=False)
        if not with_body or length is None or request.headers.get("upload-metadata"):
            return await original(self, request)
        if length > ctx.staging.write_buffer_bytes and fast:
            return await original(self, request)
        upload_id = new_upload_id()
        interrupt = Interrupt()
        async with ctx.locker.lock(upload_id, on_release_request=interrupt.fire):
            if fast:
                parts = []
                received = 0
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > length:
                        raise TooLarge("the body is longer than Upload-Length")
                    parts.append(chunk)
                offset = await stage_at_once(ctx.staging, upload_id, b"".join(parts))
            else:
                offset = await self._receive(request, upload_id, length, interrupt)
            now = utcnow()
            state = UploadState.COMPLETE if offset == length else UploadState.ACTIVE
            upload = Upload(
                id=upload_id,
                length=length,
                offset=offset,
                state=state,
                created_at=now,
                updated_at=now,
                expires_at=ctx.expires_at(now),
            )
            await ctx.store.create(upload)
        headers = tus_headers() | {"Location": ctx.location(request, upload_id)} | expires_header(upload)
        headers["Upload-Offset"] = str(upload.offset)
        return Response(status_code=201, headers=headers)

    return handle


def patch_post1() -> None:
    from tusingest.tus.post import PostHandler

    PostHandler.handle = _post_handle(fast=False)  # type: ignore[method-assign]


def patch_postfast() -> None:
    from tusingest.tus.post import PostHandler

    PostHandler.handle = _post_handle(fast=True)  # type: ignore[method-assign]


def patch_plainhooks() -> None:
    import tusingest.api.finaliser as finaliser_module
    from tusingest.tus import PlainHooks

    def plain(sagas: Any, store: Any, policy: Any, **_: Any) -> PlainHooks:
        return PlainHooks(store)

    finaliser_module.FinaliserHooks = plain  # type: ignore[assignment,misc]


def patch_granian() -> None:
    from tests.fixtures.granian import use_granian  # the repository root is on sys.path (main)

    use_granian()


def patch_appqueue2() -> None:
    import tusingest.serving as serving

    made = serving.hypercorn_config

    def config(*args: Any, **kwargs: Any) -> Any:
        result = made(*args, **kwargs)
        result.max_app_queue_size = 2
        return result

    serving.hypercorn_config = config  # the CLI imports it from the module when it serves


def patch_tracemalloc() -> None:
    """Trace Python's allocations; at exit write to $TRACEMALLOC_OUT the top lines (by line of allocation) of the
    snapshot that held the most at once, and what grew since the first snapshot taken $TRACEMALLOC_BASELINE_S (20)
    seconds after start. Slows the server down: for where, not how fast."""
    import atexit
    import threading
    import time
    import tracemalloc

    tracemalloc.start(int(os.environ.get("TRACEMALLOC_FRAMES", "1")))  # more frames: slower start
    started = time.monotonic()
    baseline_after = float(os.environ.get("TRACEMALLOC_BASELINE_S", "20"))
    kept: dict[str, Any] = {"size": 0, "most": None, "baseline": None, "last": None}

    def watch() -> None:
        while True:
            time.sleep(0.25)
            current, _ = tracemalloc.get_traced_memory()
            if current > kept["size"] * 1.05:
                kept["size"], kept["most"] = current, tracemalloc.take_snapshot()
            if kept["baseline"] is None and time.monotonic() - started > baseline_after:
                kept["baseline"] = tracemalloc.take_snapshot()

    def report() -> None:
        with open(os.environ.get("TRACEMALLOC_OUT", "/tmp/tracemalloc.txt"), "w") as out:
            if kept["most"] is not None:
                out.write(f"most traced at once: {kept['size'] / (1 << 20):.1f} MiB\n")
                for stat in kept["most"].statistics("traceback")[:12]:
                    out.write(f"{stat.size / (1 << 20):8.1f} MiB {stat.count:6d} blocks\n")
                    out.writelines(f"    {line}\n" for line in stat.traceback.format()[-8:])
            if kept["baseline"] is not None:
                out.write(f"\ngrown since {baseline_after:.0f} s after start:\n")
                for diff in tracemalloc.take_snapshot().compare_to(kept["baseline"], "lineno")[:15]:
                    out.write(f"    {diff}\n")

    threading.Thread(target=watch, daemon=True).start()
    atexit.register(report)


def _handed_over(function: Any) -> str:
    """The function inside asyncio.to_thread's and run_in_executor's partials and context runs."""
    import functools

    while True:
        if isinstance(function, functools.partial):
            function = function.args[0] if function.func.__name__ == "run" and function.args else function.func
        elif getattr(function, "__name__", "") == "run" and getattr(function, "__self__", None) is not None:
            return "contextvars.run"
        else:
            return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


_PLUMBING = ("sqlite", "directory.py", "digests.py", "asyncio", "aiosqlite", "threading", "concurrent")


def _asked_by() -> str:
    """The innermost frame of tusingest that is not the store, staging or element plumbing doing the hand-off."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "/tusingest/" in path and not any(part in path.rpartition("/")[2] for part in _PLUMBING):
            return f"{path.rpartition('/tusingest/')[2]}:{frame.f_code.co_qualname}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def patch_hops() -> None:
    """Count each hand-off to a worker thread by what was handed over and who asked; write the counts at exit."""
    import atexit
    import collections

    import aiosqlite

    counts: collections.Counter[str] = collections.Counter()
    submit = ThreadPoolExecutor.submit
    execute = aiosqlite.Connection._execute

    def counted_submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        counts[f"{self._thread_name_prefix or 'pool'}: {_handed_over(fn)} <- {_asked_by()}"] += 1
        return submit(self, fn, *args, **kwargs)

    async def counted_execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        counts[f"aiosqlite: {_handed_over(fn)} <- {_asked_by()}"] += 1
        return await execute(self, fn, *args, **kwargs)

    ThreadPoolExecutor.submit = counted_submit  # type: ignore[method-assign]
    aiosqlite.Connection._execute = counted_execute  # type: ignore[method-assign]

    def report() -> None:
        with open(os.environ.get("HOPS_OUT", "/tmp/hops.txt"), "w") as out:
            out.write(f"{sum(counts.values())} hand-offs\n")
            out.writelines(f"{count:8d}  {name}\n" for name, count in counts.most_common())

    atexit.register(report)


PATCHES: dict[str, Callable[[], None]] = {
    "recv1m": patch_recv1m,
    "sfr": patch_sfr,
    "writethread": patch_writethread,  # after sfr: replaces _flush and starts the writeback in its thread
    "nofsync": patch_nofsync,
    "nodirfsync": patch_nodirfsync,
    "pool32": patch_pool32,
    "post1": patch_post1,
    "postfast": patch_postfast,
    "plainhooks": patch_plainhooks,
    "granian": patch_granian,
    "appqueue2": patch_appqueue2,
    "tracemalloc": patch_tracemalloc,
    "hops": patch_hops,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", default="", help=f"comma-separated, of: {', '.join(PATCHES)}")
    args, rest = parser.parse_known_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    wanted = {part.strip() for part in args.patches.split(",") if part.strip()}
    for name in sorted(wanted - set(PATCHES)):
        parser.error(f"unknown patch {name!r}; known: {', '.join(PATCHES)}")
    for name, apply in PATCHES.items():  # in this order, whatever the order asked for
        if name in wanted:
            apply()
    from tusingest.cli import main as tusingest_main

    sys.argv = ["tusingest", *rest]
    tusingest_main()


if __name__ == "__main__":
    main()
