"""What the observability costs on the tus path: the same requests through the real app with metrics, traces and
access lines on, and with all three off, measured in CPU seconds of this process (all its threads).

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/instrumentation.py                 # 8 rounds, on/off alternating
    .venv/bin/python benchmarks/instrumentation.py --rounds 12 --stream-mib 128 --small 400

Why in-process: the server-level figures of ``load.py`` (wall time, server CPU) move by 5-10 % between runs on this
machine, more than the effect measured here. This drives ``build_app``'s ASGI app directly: a lifespan, then for each
round one upload of ``--stream-mib`` MiB in 16 MiB PATCHes delivered as 64 KiB ``http.request`` messages (what
Hypercorn hands over per socket read) and ``--small`` creation-with-upload POSTs of 64 KiB. The finaliser is
swapped for ``PlainHooks`` (the tus path, as ``serve_patched.py --patches plainhooks`` does); staging and SQLite sit
on ``--tmp-dir`` (default /dev/shm, so the disk's fsync time is out of the figures and the Python work is all
that is left: the instrumentation's share is at its largest there). Rounds alternate on and off; the figure is
the median of the per-pair ratios of CPU seconds.

"On" is the default configuration: PROMETHEUS_METRICS_ENABLED and OPENTELEMETRY_ENABLED true (spans made, no
exporter), LOG_LEVEL info with JSON access lines written to a file. "Off": both disabled, LOG_LEVEL warning.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import statistics
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


PROFILE: Any = None  # a cProfile.Profile to run during the measured part (``--profile``)


async def _measure(
    on: bool, tmp: Path, args: argparse.Namespace, payload: list[bytes], small_body: list[bytes]
) -> float:
    from tusingest.app import build_app
    from tusingest.config import Settings
    from tusingest.observability.logs import LogSettings, configure

    work = Path(tempfile.mkdtemp(dir=tmp))
    settings = Settings(
        database_url=f"sqlite:///{work}/tusingest.db",
        staging_dir=str(work / "staging"),
        default_element_dir=str(work / "elements"),
        service_discovery_cache_file=str(work / "storage_elements.json"),
        opentelemetry_enabled=on,
        prometheus_metrics_enabled=on,
        log_level="info" if on else "warning",
        log_format="json",
    )
    configure(LogSettings(level=settings.log_level, format="json"))
    log_file = open(work / "access.log", "w")
    logging.getLogger().handlers[0].setStream(log_file)  # type: ignore[attr-defined]
    from tusingest.sessions.migrations import upgrade_async

    await upgrade_async(settings.database_url)
    app = build_app(settings)
    stop, _task = await _lifespan(app)
    try:
        await _round(app, MiB * 16, 5, payload, small_body)  # warm-up: imports, first statements
        if PROFILE is not None:
            PROFILE.enable()
        began = time.process_time()
        await _round(app, args.stream_mib * MiB, args.small, payload, small_body)
        spent = time.process_time() - began
        if PROFILE is not None:
            PROFILE.disable()
    finally:
        await stop()
        log_file.close()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds in all, alternating on and off")
    parser.add_argument("--stream-mib", type=int, default=128, help="MiB of the one streamed upload per round")
    parser.add_argument("--small", type=int, default=300, help="64 KiB creation-with-upload POSTs per round")
    parser.add_argument("--tmp-dir", default="/dev/shm", help="where staging and SQLite go")
    parser.add_argument(
        "--mode", choices=["on", "off"], help="one measurement only (for an instruction counter such as callgrind)"
    )
    args = parser.parse_args()
    _plain_hooks()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    payload = _pieces(bytes(range(256)) * (PATCH // 256))
    small_body = payload[:1]
    tmp = Path(tempfile.mkdtemp(dir=args.tmp_dir, prefix="instrumentation-"))
    if args.mode:
        spent = asyncio.run(_measure(args.mode == "on", tmp, args, payload, small_body))
        print(f"{args.mode}: {spent:.3f} CPU s")
        return
    figures: dict[bool, list[float]] = {True: [], False: []}
    for index in range(args.rounds):
        on = index % 2 == 0
        figures[on].append(asyncio.run(_measure(on, tmp, args, payload, small_body)))
        print(f"round {index + 1}: {'on ' if on else 'off'} {figures[on][-1]:.3f} CPU s", file=sys.stderr)
    ratios = [a / b for a, b in zip(figures[True], figures[False], strict=False)]
    print(
        f"instrumentation on/off, CPU seconds per round ({args.stream_mib} MiB streamed + {args.small} x 64 KiB):"
        f" on median {statistics.median(figures[True]):.3f}, off median {statistics.median(figures[False]):.3f},"
        f" ratio per pair {', '.join(f'{r:.3f}' for r in ratios)}; median ratio {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
