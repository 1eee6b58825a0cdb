"""What the observability costs on the tus path: the same requests through two copies of the real app in one
process, one with metrics, traces and access lines on and one with all three off, interleaved request by request,
measured in CPU seconds of this process (all its threads).

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/instrumentation.py                    # 256 MiB streamed, 600 small POSTs
    .venv/bin/python benchmarks/instrumentation.py --stream-mib 512 --small 1000

Why so: server-level figures (``load.py``'s wall time and server CPU) move by 5-10 % between runs on this machine,
more than the effect measured here, and more when other work shares it. Interleaving the two apps request by
request (in ABBA order) puts both under the same conditions at every moment, so the machine's drift cancels.

Each app is ``build_app``'s ASGI app, driven directly: its lifespan, then 16 MiB PATCHes delivered as 64 KiB
``http.request`` messages (what Hypercorn hands over per socket read) and creation-with-upload POSTs of 64 KiB.
The finaliser is swapped for ``PlainHooks`` (the tus path, as ``serve_patched.py --patches plainhooks`` does).
Staging and SQLite sit on ``--tmp-dir`` (default /dev/shm): the disk's fsync time is out, only the process's own
work is left, so the instrumentation's share is at its largest there.

"On" is the default configuration: PROMETHEUS_METRICS_ENABLED and OPENTELEMETRY_ENABLED true (spans made, no
exporter), the access line at info rendered as JSON (into a file). "Off": both disabled, the root logger at
warning (set between the two apps' requests: logging is the process's, not the app's); the audit logger stays
at info in both, being the security record rather than instrumentation. The CPU counted is the event loop's
thread (``time.thread_time``), where the instrumentation runs; staging's and SQLite's threads do the same
work in both apps and would only add their noise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1 << 20
MESSAGE = 64 << 10  # Hypercorn's MAX_RECV
PATCH = 16 * MiB

Message = dict[str, Any]


def _plain_hooks() -> None:
    import tusingest.api.finaliser as finaliser_module
    from tusingest.tus import PlainHooks

    def plain(sagas: Any, store: Any, policy: Any, **_: Any) -> PlainHooks:
        return PlainHooks(store)

    finaliser_module.FinaliserHooks = plain  # type: ignore[assignment,misc]


def _scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8020),
        "state": {},
    }


def _pieces(body: bytes) -> list[bytes]:
    """A body cut into the MESSAGE-sized pieces it arrives in (made once, outside the measured time)."""
    view = memoryview(body)
    return [bytes(view[i : i + MESSAGE]) for i in range(0, len(body), MESSAGE)] or [b""]


async def _request(
    app: Any, method: str, path: str, headers: dict[str, str], pieces: list[bytes]
) -> tuple[int, dict[str, str]]:
    """One request through the ASGI app; the body is handed over in ``pieces``."""
    index = 0
    answer: dict[str, Any] = {}

    async def receive() -> Message:
        nonlocal index
        if index < len(pieces):
            index += 1
            return {"type": "http.request", "body": pieces[index - 1], "more_body": index < len(pieces)}
        await asyncio.Event().wait()  # the client stays connected until the app answers
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}

    headers = {"tus-resumable": "1.0.0", "content-length": str(sum(map(len, pieces))), **headers}
    await app(_scope(method, path, headers), receive, send)
    return answer["status"], answer["headers"]


async def _round(app: Any, stream_bytes: int, small: int, payload: list[bytes], small_body: list[bytes]) -> None:
    if stream_bytes:
        await _stream(app, stream_bytes, payload)
    await _small(app, small, small_body)


async def _stream(app: Any, stream_bytes: int, payload: list[bytes]) -> None:
    status, headers = await _request(app, "POST", "/files/", {"upload-length": str(stream_bytes)}, [b""])
    assert status == 201, status
    path = headers["location"].split("://", 1)[-1]
    path = path[path.index("/") :] if not path.startswith("/") else path
    for offset in range(0, stream_bytes, PATCH):
        status, headers = await _request(
            app,
            "PATCH",
            path,
            {"upload-offset": str(offset), "content-type": "application/offset+octet-stream"},
            payload if stream_bytes - offset >= PATCH else _pieces(b"".join(payload)[: stream_bytes - offset]),
        )
        assert status == 204, (status, headers)


async def _small(app: Any, small: int, small_body: list[bytes]) -> None:
    name = base64.b64encode(b"small.bin").decode()
    for _ in range(small):
        status, _headers = await _request(
            app,
            "POST",
            "/files/",
            {
                "upload-length": str(sum(map(len, small_body))),
                "upload-metadata": f"filename {name}",
                "content-type": "application/offset+octet-stream",
            },
            small_body,
        )
        assert status == 201, status


async def _lifespan(app: Any) -> tuple[Callable[[], Awaitable[None]], asyncio.Task[None]]:
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    started = asyncio.Event()
    stopped = asyncio.Event()
    await inbox.put({"type": "lifespan.startup"})

    async def send(message: Message) -> None:
        if message["type"].startswith("lifespan.startup"):
            if message["type"].endswith("failed"):
                raise RuntimeError(message.get("message"))
            started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            stopped.set()

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    await asyncio.wait_for(started.wait(), 30)

    async def stop() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(stopped.wait(), 30)
        await task

    return stop, task


async def _app(on: bool, tmp: Path) -> tuple[Any, Callable[[], Awaitable[None]]]:
    from tusingest.app import build_app
    from tusingest.config import Settings
    from tusingest.sessions.migrations import upgrade_async

    work = Path(tempfile.mkdtemp(dir=tmp, prefix="on-" if on else "off-"))
    settings = Settings(
        database_url=f"sqlite:///{work}/tusingest.db",
        staging_dir=str(work / "staging"),
        default_element_dir=str(work / "elements"),
        service_discovery_cache_file=str(work / "storage_elements.json"),
        opentelemetry_enabled=on,
        prometheus_metrics_enabled=on,
    )
    await upgrade_async(settings.database_url)
    app = build_app(settings)
    stop, _task = await _lifespan(app)
    return app, stop


async def _interleaved(args: argparse.Namespace, tmp: Path, payload: list[bytes], small_body: list[bytes]) -> None:
    from tusingest.observability.logs import LogSettings, configure

    configure(LogSettings(level="info", format="json"))
    root = logging.getLogger()
    log_file = (tmp / "access.log").open("w")
    root.handlers[0].setStream(log_file)  # type: ignore[attr-defined]
    # The audit line is the security record, not instrumentation: both apps write it.
    logging.getLogger("tusingest.audit").setLevel(logging.INFO)
    apps = {True: await _app(True, tmp), False: await _app(False, tmp)}
    spent = {True: 0.0, False: 0.0}

    async def timed(on: bool, request: Callable[[Any], Awaitable[None]]) -> None:
        root.setLevel(logging.INFO if on else logging.WARNING)
        began = time.thread_time()
        await request(apps[on][0])
        spent[on] += time.thread_time() - began

    try:
        for on in (True, False):  # warm-up: imports, first statements, caches
            await _round(apps[on][0], 16 * MiB, 20, payload, small_body)
        order = (True, False, False, True)
        # Streams: one upload per app, their 16 MiB PATCHes interleaved.
        stream_bytes = args.stream_mib * MiB
        urls = {}
        for on in (True, False):
            status, headers = await _request(
                apps[on][0], "POST", "/files/", {"upload-length": str(stream_bytes)}, [b""]
            )
            assert status == 201, status
            urls[on] = "/files/" + headers["location"].rstrip("/").rsplit("/", 1)[-1]
        for index, offset in enumerate(range(0, stream_bytes, PATCH)):
            for on in order[index % 2 * 2 : index % 2 * 2 + 2]:

                async def patch(app: Any, on: bool = on, offset: int = offset) -> None:
                    status, headers = await _request(
                        app,
                        "PATCH",
                        urls[on],
                        {"upload-offset": str(offset), "content-type": "application/offset+octet-stream"},
                        payload,
                    )
                    assert status == 204, (status, headers)

                await timed(on, patch)
        stream = dict(spent)
        spent.update({True: 0.0, False: 0.0})
        for index in range(args.small):
            for on in order[index % 2 * 2 : index % 2 * 2 + 2]:
                await timed(on, lambda app: _small(app, 1, small_body))
    finally:
        for _, stop in apps.values():
            await stop()
        log_file.close()
    print(
        f"stream, {args.stream_mib} MiB in 16 MiB PATCHes: on {stream[True]:.3f} CPU s, off {stream[False]:.3f};"
        f" on/off {stream[True] / stream[False]:.3f}"
    )
    print(
        f"small, {args.small} x 64 KiB creation-with-upload: on {spent[True]:.3f} CPU s"
        f" ({spent[True] / args.small * 1e3:.2f} ms each), off {spent[False]:.3f}"
        f" ({spent[False] / args.small * 1e3:.2f} ms each); on/off {spent[True] / spent[False]:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream-mib", type=int, default=256, help="MiB streamed to each app (16 MiB PATCHes)")
    parser.add_argument("--small", type=int, default=600, help="64 KiB creation-with-upload POSTs to each app")
    parser.add_argument("--tmp-dir", default="/dev/shm", help="where staging and SQLite go")
    args = parser.parse_args()
    if args.stream_mib % 16:
        parser.error("--stream-mib must be a multiple of 16")
    _plain_hooks()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    payload = _pieces(bytes(range(256)) * (PATCH // 256))
    small_body = payload[:1]
    tmp = Path(tempfile.mkdtemp(dir=args.tmp_dir, prefix="instrumentation-"))
    try:
        asyncio.run(_interleaved(args, tmp, payload, small_body))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
