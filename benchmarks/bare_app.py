"""A bare Starlette + Hypercorn app that only appends PATCH bodies to a file: the floor under tusingest's figures.

It speaks just enough tus for ``load.py`` (POST with or without a body, PATCH, /health/ready) and does nothing
else: no session store, no lock, no fsync, no header validation beyond Upload-Offset. Run by ``load.py --server
bare``; it can also be started by hand::

    STAGING_DIR=/tmp/bare .venv/bin/python benchmarks/bare_app.py --host 127.0.0.1 --port 8099

Bytes go to ``STAGING_DIR/<id>/00000000000000000000.chunk`` so that load.py's on-disk check works unchanged.
The server runs like ``tusingest serve``: Hypercorn's asyncio worker on uvloop, no access log.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

OCTET = "application/offset+octet-stream"
TUS = {"Tus-Resumable": "1.0.0"}


def build_app(root: Path) -> Starlette:
    root.mkdir(parents=True, exist_ok=True)
    lengths: dict[str, int] = {}

    def chunk_path(upload_id: str) -> Path:
        return root / upload_id / "00000000000000000000.chunk"

    async def append(request: Request, upload_id: str) -> int:
        # Blocking writes on the event loop, on purpose: that is what the simplest app does.
        with open(chunk_path(upload_id), "ab") as f:
            async for chunk in request.stream():
                f.write(chunk)
            return f.tell()

    async def create(request: Request) -> Response:
        upload_id = secrets.token_hex(16)
        lengths[upload_id] = int(request.headers["upload-length"])
        (root / upload_id).mkdir()
        chunk_path(upload_id).touch()
        headers = {**TUS, "Location": f"{request.url.scheme}://{request.headers['host']}/files/{upload_id}"}
        if request.headers.get("content-type") == OCTET:
            headers["Upload-Offset"] = str(await append(request, upload_id))
        return Response(status_code=201, headers=headers)

    async def patch(request: Request) -> Response:
        upload_id = request.path_params["upload_id"]
        if upload_id not in lengths:
            return Response(status_code=404, headers=TUS)
        offset = int(request.headers["upload-offset"])
        if offset != chunk_path(upload_id).stat().st_size:
            return Response(status_code=409, headers=TUS)
        return Response(status_code=204, headers={**TUS, "Upload-Offset": str(await append(request, upload_id))})

    async def ready(request: Request) -> Response:
        return Response("ready\n")

    return Starlette(
        routes=[
            Route("/files/", create, methods=["POST"]),
            Route("/files/{upload_id}", patch, methods=["PATCH"]),
            Route("/health/ready", ready),
        ]
    )


async def serve(host: str, port: int, root: Path) -> None:
    import asyncio

    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await hypercorn_serve(build_app(root), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, Path(os.environ.get("STAGING_DIR", "./bare-staging"))))


if __name__ == "__main__":
    main()
