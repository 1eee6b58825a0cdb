"""Does the server's memory grow with the number of uploads? 1,000 small uploads on one server, its RSS after each
hundred (and the peak), on load.py's server and sampler.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/rss_growth.py                          # 1000 x 64 KiB, 16 in flight, SQLite
    .venv/bin/python benchmarks/rss_growth.py --uploads 300 --size 1MiB --every 50

Each upload is one POST carrying its body (creation-with-upload, as ``load.py --scenario small``): it is complete
with that request, so each one goes through finalisation too (placed on the directory element and registered).
After every ``--every`` uploads the client waits until all in flight are answered, then reads the server's RSS
(process and children): that is the figure per mark. The peak is sampled every 50 ms throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import load

MiB = load.MiB


async def grow(args: argparse.Namespace, server: load.Server) -> None:
    payload = os.urandom(args.size)
    connector = aiohttp.TCPConnector(limit=args.in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        await load.wait_ready(session, server)
        sampler = load.RssSampler(server.process.pid)
        await asyncio.sleep(0.3)
        idle = sampler.sample()
        sampler.peak = idle
        sampler.start()
        recorder = load.Recorder()
        print(f"idle RSS {idle / MiB:.1f} MiB", flush=True)
        started = time.perf_counter()
        try:

            async def worker(queue: Iterator[int]) -> None:
                for _ in queue:  # the shared iterator bounds the uploads of this mark
                    await load.upload_in_one_post(session, server.base_url, payload, recorder)

            for done in range(args.every, args.uploads + 1, args.every):
                queue = iter(range(args.every))
                await asyncio.gather(*(worker(queue) for _ in range(args.in_flight)))
                print(
                    f"after {done:5d} uploads: RSS {sampler.sample() / MiB:6.1f} MiB  (peak so far "
                    f"{sampler.peak / MiB:.1f})  {time.perf_counter() - started:6.1f} s",
                    flush=True,
                )
        finally:
            sampler.stop()
    if recorder.uploads_done != args.uploads - args.uploads % args.every:
        raise load.BenchError(f"{recorder.uploads_done} uploads answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--size", type=load.parse_size, default=64 << 10)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--patches", default="", help="run the server through serve_patched.py with these")
    parser.add_argument("--tusingest", default=str(Path(sys.executable).parent / "tusingest"), help="the CLI")
    args = parser.parse_args(argv)
    server_args = load.parse_args(["--tusingest", args.tusingest, "--patches", args.patches])
    workdir = Path(tempfile.mkdtemp(prefix="tusrss-"))
    try:
        with (
            load.session_store("sqlite", workdir, "", args.tusingest) as database_url,
            load.run_server(server_args, database_url, workdir, 1024) as server,
        ):
            load.uvloop_runner()(grow(args, server))
    except load.BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
