"""How tusingest runs on Hypercorn: one Config for the CLI and the tests alike, and the bounds
on a request head (size, field count, time to arrive) that Hypercorn and the app enforce together."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Protocol

from hypercorn.config import Config
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Hypercorn reads a socket 64 KiB at a time and has no setting for it. Large PATCH bodies
# cost a loop iteration, a queue hand-off and an ASGI message per read: 512 KiB reads cut
# that eightfold. At most max_app_queue_size reads wait per connection, which bounds memory.
SOCKET_READ_BYTES = 512 << 10


def tune_hypercorn() -> None:
    import hypercorn.asyncio.tcp_server as tcp_server

    if not hasattr(tcp_server, "MAX_RECV"):
        raise RuntimeError("this Hypercorn has no tcp_server.MAX_RECV: check SOCKET_READ_BYTES in tusingest/serving.py")
    tcp_server.MAX_RECV = SOCKET_READ_BYTES


# glibc's malloc gives freed memory back to the kernel once the heap's free top passes a threshold,
# which it raises as large blocks are freed. A node streaming a body allocates and frees 512 KiB
# reads by the thousand, and each trim makes the next ones fault their pages in again (the kernel
# zeroes them): on the tus path of a 512 MiB upload, 0.3-0.5 s of the server's 1.3-1.5 s of CPU
# (docs/benchmarks.md, "malloc's thresholds"). Fixed thresholds stop the churn: blocks under
# MALLOC_MMAP_THRESHOLD come from the heap, and up to MALLOC_TRIM_THRESHOLD of it is kept when free.
# The peak is unchanged; a node idle after a burst keeps at most that much more.
MALLOC_MMAP_THRESHOLD = 16 << 20
MALLOC_TRIM_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Fix glibc malloc's mmap and trim thresholds (above) for this process; True when set. Leaves them to
    the operator when the environment sets any malloc tunable, and does nothing without glibc's mallopt."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_set: bool = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
    trim_set: bool = mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    return mmap_set and trim_set


class ServingSettings(Protocol):
    """The settings Hypercorn's Config is made from (app.py's and the CLI's Settings has them)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def shutdown_grace_seconds(self) -> float: ...
    @property
    def request_head_max_kb(self) -> int: ...
    @property
    def request_head_timeout_seconds(self) -> float: ...


def hypercorn_config(settings: ServingSettings, bind: str | None = None) -> Config:
    tune_hypercorn()
    config = Config()
    config.bind = [bind or f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None  # the app writes its own access line (observability/logs.py)
    # A logger, not "-": its records go to the root handler, so they too are JSON lines.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.max_app_queue_size = 8
    # h11 refuses (431, empty body) a head that is still incomplete past this size: a head
    # trickled or sent in pieces never grows beyond it. A head that arrives whole within one
    # read (up to SOCKET_READ_BYTES) passes h11 and is measured by RequestHeadLimit instead.
    config.h11_max_incomplete_size = settings.request_head_max_kb << 10
    # Hypercorn's idle timer runs from the connection's start (or the previous response's end)
    # until a complete request head has arrived: it bounds how long a head may take, and how
    # long a kept-alive connection waits for the next one. (read_timeout would also cut a
    # client that quietly waits for its answer, e.g. while its upload is finalised: not used.)
    config.keep_alive_timeout = settings.request_head_timeout_seconds
    return config


class RequestHeadLimit:
    """ASGI middleware: 431 for a head with more than ``max_headers`` fields or more than
    ``max_bytes`` in all (request line and fields, as h11 counts them give or take whitespace),
    before any route sees it. The connection closes after the answer if a body was announced."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_headers: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self._problem(scope)
            if problem is not None:
                await PlainTextResponse(problem + "\n", status_code=431)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, scope: Scope) -> str | None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if len(headers) > self.max_headers:
            return f"request has {len(headers)} header fields; at most {self.max_headers} are allowed"
        query: bytes = scope.get("query_string", b"")
        target = len(scope.get("raw_path") or scope["path"].encode()) + (len(query) + 1 if query else 0)
        size = len(scope["method"]) + target + len(" HTTP/1.1\r\n") + 2
        size += sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
        if size > self.max_bytes:
            return f"request head is {size} bytes; at most {self.max_bytes} are allowed"
        return None


def runtime_warning(version: tuple[int, int, int] = sys.version_info[:3]) -> str | None:
    """What an operator should hear about the Python running a long-lived node, or None.

    CPython 3.12.0 to 3.12.5 keep every string that pathlib interns for good (python/cpython#113993,
    fixed in 3.12.6 by #123065), and pathlib interns each part of every path it parses: each
    upload's staging and element paths stay behind, about 120 bytes per upload measured here, so a
    node's memory grows with the uploads it has taken (docs/benchmarks.md, peak RSS)."""
    if (3, 12, 0) <= version < (3, 12, 6):
        return (
            f"Python {'.'.join(map(str, version))} never frees the path names it parses (CPython issue 113993): "
            "this node's memory grows by about 120 bytes per upload; run Python 3.12.6 or newer"
        )
    return None
