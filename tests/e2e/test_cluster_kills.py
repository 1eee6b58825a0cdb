"""Three `tusingest serve` nodes on one PostgreSQL database, one staging directory and one
directory Storage Element. Tus clients spread their PATCHes round-robin over the nodes while the
node receiving a PATCH is SIGKILLed at random moments (mid-body, right after the body, while its
saga runs, after its answer) and restarted. Every upload must end as exactly one registered file
with the source's SHA-256, and nothing may be left over: no temp file or orphan object on the
element, no staging folder, no unfinished saga.

Seeded: ``TUSINGEST_CHAOS_SEED=<n>[,<n>...]`` replays a run's plan (sizes, contents, chunk
sizes, node order, which PATCH is cut and how). Where exactly inside the server a SIGKILL lands
is the scheduler's, so a seed reproduces the plan, and a window it hit once it hits often.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
import httpx
import pytest

from tests.e2e.test_saga_recovery import serving
from tests.e2e.test_serve_cli import clean_env, free_port
from tests.fixtures.rawhttp import open_request, read_response
from tests.fixtures.server import OCTETS, TUS

SEEDS = [int(seed) for seed in os.environ.get("TUSINGEST_CHAOS_SEED", "1010").split(",")]

NODES = 3
UPLOADS = 20
CLIENTS = 4  # uploads in flight at once
MIN_SIZE, MAX_SIZE = 256 << 10, 8 << 20
MIN_CHUNK, MAX_CHUNK = 64 << 10, 3 << 20
KILLS = (6, 9)  # how many kills a run plans, inclusive
OUTCOME_SECONDS = 60.0  # how long a complete upload may take to become a file (or a failure)
DELIVERY_SECONDS = 60.0  # how long a client may take to get all its bytes accepted
PATCH_ANSWER_SECONDS = 40.0  # above FINALISE_WAIT_SECONDS: the completing PATCH waits for its saga

# Answers after which a tus client asks HEAD and tries again: the offset moved under it (409), the
# upload is busy (423), its request was interrupted before committing anything (400), or a 5xx.
RETRIED = frozenset({400, 409, 423})

# Short leases and timeouts, so recovery after a kill happens within a test's time.
KILL_TEST_SETTINGS = {
    "SAGA_LEASE_SECONDS": "3",
    "SAGA_RECOVERY_INTERVAL_SECONDS": "1",
    "LOCK_TIMEOUT_SECONDS": "3",
    "FINALISE_WAIT_SECONDS": "20",
    "SHUTDOWN_GRACE_SECONDS": "5",
    "STAGING_WRITE_BUFFER_KB": "256",  # small writes, so a body cut mid-way has bytes to keep
    "COMPRESSION_ENABLED": "false",  # random bytes do not compress; spare the two cores the try
}

Moment = Literal["mid-body", "body-sent", "in-saga", "after-answer"]


@dataclass
class Kill:
    """When to SIGKILL the node receiving one of an upload's PATCHes."""

    at_patch: int  # this PATCH of the upload, or the completing one if that comes first
    moment: Moment
    fraction: float  # of the body sent before a mid-body kill

    def due(self, patches_sent: int, completing: bool) -> bool:
        if self.moment == "in-saga":  # only the completing PATCH starts a saga
            return completing
        return completing or patches_sent >= self.at_patch


@dataclass
class Planned:
    index: int
    payload: bytes
    chunks: random.Random  # this upload's chunk sizes
    kill: Kill | None
    path: str = ""  # /files/<id> once created
    trace: list[str] = field(default_factory=list)  # what its client sent where, for a failure message

    @property
    def upload_id(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def plan(seed: int) -> list[Planned]:
    rng = random.Random(seed)
    sizes = [rng.randint(MIN_SIZE, MAX_SIZE) for _ in range(UPLOADS)]
    killed = set(rng.sample(range(UPLOADS), rng.randint(*KILLS)))
    moments: list[Moment] = ["mid-body", "body-sent", "in-saga", "after-answer"]
    uploads = []
    for index, size in enumerate(sizes):
        kill = None
        if index in killed:
            kill = Kill(at_patch=rng.randint(0, 3), moment=rng.choice(moments), fraction=rng.uniform(0.05, 0.95))
        payload = random.Random(f"{seed}:{index}:content").randbytes(size)
        uploads.append(Planned(index, payload, random.Random(f"{seed}:{index}:chunks"), kill))
    return uploads


@dataclass
class Node:
    name: str
    cwd: Path
    port: int
    generation: int = 0  # bumped by each kill: a kill aimed at a process that is gone is dropped
    process: subprocess.Popen[bytes] | None = None
    stack: AsyncExitStack | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Cluster:
    """The nodes, and the one way to kill one: SIGKILL, then a new process on the same port,
    started in the background while the others carry on."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.env = env
        self.nodes = []
        for n in range(NODES):
            cwd = root / f"node-{n}"  # each node's own ./data (its element-list cache)
            cwd.mkdir()
            self.nodes.append(Node(f"node-{n}", cwd, free_port()))
        self.kills: list[str] = []
        self._restarts: list[asyncio.Task[None]] = []

    async def _start(self, node: Node) -> None:
        stack = AsyncExitStack()
        node.process = await stack.enter_async_context(serving(node.cwd, self.env, node.port))
        node.stack = stack

    async def start(self) -> None:
        await asyncio.gather(*(self._start(node) for node in self.nodes))

    def node(self, turn: int) -> Node:
        return self.nodes[turn % NODES]

    async def kill(self, node: Node, generation: int, why: str) -> bool:
        """SIGKILL ``node`` if it still runs the process that got the request; False if not."""
        async with node.lock:
            if node.generation != generation or node.process is None or node.stack is None:
                return False
            node.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(node.process.wait, 10)
            await node.stack.aclose()
            node.process = node.stack = None
            node.generation += 1
            self.kills.append(f"{node.name} {why}")
        self._restarts.append(asyncio.create_task(self._restart(node)))
        return True

    async def _restart(self, node: Node) -> None:
        async with node.lock:
            await self._start(node)

    async def stop(self) -> None:
        """Wait for pending restarts, then stop every node as an operator would (SIGTERM)."""
        await asyncio.gather(*self._restarts)
        for node in self.nodes:
            async with node.lock:
                if node.stack is not None:
                    await node.stack.aclose()
                    node.process = node.stack = None


@dataclass
class Answer:
    status: int
    headers: dict[str, str]


async def poll[T](probe: Callable[[], Awaitable[T]], until: Callable[[T], bool], timeout: float, every: float) -> T:
    """Like rawhttp.eventually, but paced: these probes are HTTP requests or queries against
    nodes that share two cores with the run, and a tight loop would slow what it waits for.
    Returns the last value whether or not it satisfied ``until``; the caller judges it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if until(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(every)


class TusClient:
    """What a tus client does: PATCH from the known offset; after any failure (connection
    refused or cut, 400, 409, 423, 5xx) ask the next node with HEAD where the upload stands and go
    on from there. Its nodes go round-robin, one per request."""

    def __init__(self, cluster: Cluster, http: httpx.AsyncClient, db: asyncpg.Pool) -> None:
        self.cluster = cluster
        self.http = http
        self.db = db

    async def create(self, upload: Planned) -> None:
        name = base64.b64encode(f"chaos-{upload.index}.bin".encode()).decode()
        headers = TUS | {"Upload-Length": str(len(upload.payload)), "Upload-Metadata": f"filename {name}"}
        response = await self.http.post(f"{self.cluster.node(upload.index).url}/files/", headers=headers)
        assert response.status_code == 201, response.text
        upload.path = httpx.URL(response.headers["Location"]).path

    async def deliver(self, upload: Planned) -> None:
        """Send every byte; returns once a node has accepted the last one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DELIVERY_SECONDS
        length = len(upload.payload)
        turn, offset, patches, failures = upload.index, 0, 0, 0
        known = True  # the offset is known (0 after creation, else from the last 204)
        while True:
            assert loop.time() < deadline, f"upload {upload.upload_id}: not delivered in {DELIVERY_SECONDS:g} s"
            node = self.cluster.node(turn)
            turn += 1
            if not known:
                offset_or_none = await self.head(node, upload.path)
                upload.trace.append(f"HEAD {node.name} -> {offset_or_none}")
                if offset_or_none is None:
                    failures += 1
                    await backoff(failures)
                    continue
                offset, known = offset_or_none, True
            if offset == length:
                return
            size = min(upload.chunks.randint(MIN_CHUNK, MAX_CHUNK), length - offset)
            kill = upload.kill if upload.kill and upload.kill.due(patches, offset + size == length) else None
            answer, killed = await self.patch(node, upload, offset, upload.payload[offset : offset + size], kill)
            patches += 1
            got = "no answer" if answer is None else f"{answer.status} {answer.headers.get('upload-offset')}"
            done = f" {answer.headers.get('artstore-upload-status')}" if answer and offset + size == length else ""
            cut = f" [{kill.moment} kill{'' if killed else ' missed'}]" if kill else ""
            upload.trace.append(f"PATCH {node.name} @{offset}+{size} -> {got}{done}{cut}")
            if kill is not None and killed:
                upload.kill = None  # else it stays armed: the node had already been killed under it
            if answer is not None and answer.status == 204:
                offset, failures = int(answer.headers["upload-offset"]), 0
                continue
            if answer is not None and answer.status not in RETRIED and answer.status < 500:
                return  # refused for good (the upload failed, say): its session status tells how
            known = False
            failures += 1
            await backoff(failures)

    async def head(self, node: Node, path: str) -> int | None:
        try:
            response = await self.http.head(node.url + path, headers=TUS)
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            assert response.status_code in (423, 500, 502, 503), f"HEAD {path}: {response.status_code}"
            return None
        return int(response.headers["Upload-Offset"])

    async def patch(
        self, node: Node, upload: Planned, offset: int, body: bytes, kill: Kill | None
    ) -> tuple[Answer | None, bool]:
        """One PATCH on a raw socket (so a kill can land mid-body); the answer, or None if the
        connection failed, and whether the planned kill happened."""
        generation = node.generation
        headers = TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS, "Content-Length": str(len(body))}
        why = f"{kill.moment} of PATCH {upload.upload_id} @{offset}+{len(body)}" if kill else ""
        killed = False
        writer: asyncio.StreamWriter | None = None
        answering: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        try:
            reader, opened = await asyncio.wait_for(open_request(node.url + upload.path, "PATCH", headers), 10)
            writer = opened
            cut = int(len(body) * kill.fraction) if kill is not None and kill.moment == "mid-body" else len(body)
            opened.write(body[:cut])
            await opened.drain()
            if kill is not None and kill.moment in ("mid-body", "body-sent"):
                killed = await self.cluster.kill(node, generation, why)
            if cut < len(body) and not killed:
                opened.write(body[cut:])
                await opened.drain()
            answering = asyncio.ensure_future(asyncio.wait_for(read_response(reader), PATCH_ANSWER_SECONDS))
            if kill is not None and kill.moment == "in-saga":
                await self.saga_started_or(upload.upload_id, answering)
                killed = await self.cluster.kill(node, generation, why)
            status, response_headers = await answering
            if kill is not None and kill.moment == "after-answer":
                killed = await self.cluster.kill(node, generation, why)
            return Answer(status, response_headers), killed
        except (OSError, TimeoutError, IndexError, ValueError, asyncio.IncompleteReadError):
            return None, killed  # IndexError/ValueError: the connection closed before a status line
        finally:
            if answering is not None:
                answering.cancel()
            if writer is not None:
                writer.close()

    async def saga_started_or(self, upload_id: str, answering: asyncio.Future[Any]) -> None:
        """Until the upload's saga has a row or its PATCH is answered (a small file's saga may
        finish first), bounded: on a stranded upload neither comes and the kill goes ahead."""

        async def saga_row() -> bool:
            query = "SELECT count(*) FROM sagas WHERE kind = 'upload' AND subject_id = $1"
            return answering.done() or bool(await self.db.fetchval(query, upload_id))

        await poll(saga_row, bool, timeout=20, every=0.005)

    async def outcome(self, upload: Planned) -> dict[str, Any]:
        """The session status once it is settled (completed or failed), or the last one seen."""
        turn = upload.index

        async def status() -> dict[str, Any]:
            nonlocal turn
            node = self.cluster.node(turn)
            turn += 1
            try:
                response = await self.http.get(f"{node.url}/api/files/upload/session/{upload.upload_id}")
            except httpx.TransportError as exc:
                return {"status": f"unreachable ({type(exc).__name__})"}
            if response.status_code != 200:
                return {"status": f"HTTP {response.status_code}", "body": response.text}
            return dict(response.json())

        return await poll(status, lambda body: body["status"] in ("completed", "failed"), OUTCOME_SECONDS, 0.1)


async def backoff(failures: int) -> None:
    # A client's retry delay (tus-js-client's retryDelays), not a wait on anything.
    await asyncio.sleep(min(0.05 * 2**failures, 1.0))


@asynccontextmanager
async def database(url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
    try:
        yield pool
    finally:
        await pool.close()


async def evidence(db: asyncpg.Pool, upload_id: str, staging: Path) -> str:
    """Where an upload stands in the database and in staging, for a failure message."""
    row = await db.fetchrow("SELECT state, upload_offset, upload_length FROM uploads WHERE id = $1", upload_id)
    sagas = await db.fetch(
        "SELECT state, step, attempts, error_code, error, owner FROM sagas WHERE subject_id = $1 ORDER BY created_at",
        upload_id,
    )
    folder = staging / upload_id
    staged = sorted(p.name for p in folder.iterdir()) if folder.exists() else "no staging folder"
    saga_text = [dict(s) for s in sagas] or "NO SAGA"
    return f"upload row {dict(row) if row else None}; sagas {saga_text}; staging {staged}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: f"seed={seed}")
async def test_random_sigkills_of_the_receiving_node_leave_every_upload_registered_once_and_nothing_over(
    tmp_path: Path, postgres_url: str, seed: int
) -> None:
    staging = tmp_path / "staging"
    element = tmp_path / "element"
    env = clean_env(
        DATABASE_URL=postgres_url, STAGING_DIR=str(staging), DEFAULT_ELEMENT_DIR=str(element), **KILL_TEST_SETTINGS
    )
    uploads = plan(seed)
    planned_kills = sum(u.kill is not None for u in uploads)
    cluster = Cluster(tmp_path, env)
    where = f"seed {seed} (TUSINGEST_CHAOS_SEED={seed}), logs under {tmp_path}"
    outcomes: dict[int, dict[str, Any]] = {}
    async with database(postgres_url) as db, httpx.AsyncClient(timeout=10) as http:
        try:
            await cluster.start()
            client = TusClient(cluster, http, db)
            # Created before the chaos begins: a creation lost with a killed node would leave an
            # upload nobody knows of, which is the client's loss, not the server's.
            for upload in uploads:
                await client.create(upload)
            queue: asyncio.Queue[Planned] = asyncio.Queue()
            for upload in uploads:
                queue.put_nowait(upload)

            async def work() -> None:
                while not queue.empty():
                    upload = queue.get_nowait()
                    try:
                        await client.deliver(upload)
                    except AssertionError as exc:
                        outcomes[upload.index] = {"status": f"not delivered: {exc}"}
                        continue
                    outcomes[upload.index] = await client.outcome(upload)

            await asyncio.gather(*(work() for _ in range(CLIENTS)))
            unsettled = "SELECT subject_id, state, step FROM sagas WHERE state IN ('running', 'compensating')"
            unfinished = await poll(
                lambda: db.fetch(unsettled),
                lambda rows: not rows,
                timeout=30,
                every=0.2,
            )
        finally:
            await cluster.stop()

        problems = [f"saga left {row['state']} at step {row['step']}: upload {row['subject_id']}" for row in unfinished]
        for upload in uploads:
            status = outcomes[upload.index]["status"]
            if status != "completed":
                detail = await evidence(db, upload.upload_id, staging)
                problems.append(
                    f"upload {upload.upload_id} (#{upload.index}) ended {status!r}: {detail}; "
                    f"its client: {' | '.join(upload.trace)}"
                )
        files = await db.fetch("SELECT upload_id, sha256, size_bytes, storage_key, content_encoding FROM files")
        sagas = await db.fetch("SELECT subject_id, state FROM sagas WHERE kind = 'upload'")

    rows_by_upload: dict[str, list[asyncpg.Record]] = {}
    for row in files:
        rows_by_upload.setdefault(row["upload_id"], []).append(row)
    ours = {upload.upload_id for upload in uploads}
    problems += [f"file row for an unknown upload {upload_id}" for upload_id in rows_by_upload.keys() - ours]
    expected_objects: set[str] = set()
    for upload in uploads:
        rows = rows_by_upload.get(upload.upload_id, [])
        if len(rows) != 1:
            problems.append(f"upload {upload.upload_id} (#{upload.index}) has {len(rows)} file rows")
            continue
        (row,) = rows
        if (row["sha256"], row["size_bytes"]) != (upload.sha256, len(upload.payload)):
            problems.append(
                f"upload {upload.upload_id}: registered sha256 {row['sha256']} size {row['size_bytes']}, "
                f"source {upload.sha256} size {len(upload.payload)}"
            )
        expected_objects |= {row["storage_key"], row["storage_key"] + ".attr.json"}
        stored = element / row["storage_key"]
        if stored.is_file():
            if row["content_encoding"] is None and hashlib.sha256(stored.read_bytes()).hexdigest() != upload.sha256:
                problems.append(f"upload {upload.upload_id}: the object {row['storage_key']} differs from the source")
            attr = json.loads((element / (row["storage_key"] + ".attr.json")).read_bytes())
            if attr["sha256"] != upload.sha256:
                problems.append(f"upload {upload.upload_id}: attr.json says sha256 {attr['sha256']}")
        completed_sagas = [s for s in sagas if s["subject_id"] == upload.upload_id and s["state"] == "completed"]
        if len(completed_sagas) != 1:
            problems.append(f"upload {upload.upload_id} has {len(completed_sagas)} completed sagas")

    on_element = {p.relative_to(element).as_posix() for p in element.rglob("*") if p.is_file()}
    problems += [f"missing on the element: {key}" for key in sorted(expected_objects - on_element)]
    problems += [f"left over on the element: {key}" for key in sorted(on_element - expected_objects)]
    problems += [f"left over in staging: {p.name}" for p in sorted(staging.iterdir())] if staging.exists() else []

    kills = "\n  ".join(cluster.kills)
    assert not problems, f"{where}; {len(cluster.kills)} kills:\n  {kills}\nproblems:\n  " + "\n  ".join(problems)
    # The chaos must really have happened, or this test proves nothing. A planned kill is dropped
    # only when its node had already been killed under the same PATCH and its upload completed.
    assert len(cluster.kills) >= planned_kills - 2, f"{where}: only {len(cluster.kills)} of {planned_kills} kills"
