"""Three `tusingest serve` nodes behind a private nginx (round-robin, the proxy settings of
deploy/nginx/tusingest-proxy.conf), sharing PostgreSQL (a fresh database per test) and Redis, and
every test twice, once per staging mode:
- "directory": one shared staging directory and one directory Storage Element;
- "s3": nothing else shared but S3 (a moto server): STAGING_BACKEND=s3 on a staging bucket, with
  5 MiB parts (CHUNK_SIZE_MB=5) so uploads cross part boundaries, an S3 Storage Element in another
  bucket, and each node's own STAGING_DIR for scratch files only.
Clients know only nginx's address. Each PATCH of an upload lands on another node; a node SIGKILLed
while it receives a PATCH costs the client a retry (and in s3 mode the bytes it held in memory but
had not synced: the client resumes from the committed offset), never a committed byte; a seeded
run of uploads with kills at random moments ends with every upload registered once, exact, and
nothing left over (no staged object, no orphan object, no open multipart upload); a node killed in
the middle of a saga has it finished by another node once its lease runs out; a rolling SIGTERM
restart of all three under running uploads answers no 5xx of a node's own."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
import psutil
import pytest

from tests.e2e.test_cluster_kills import KILL_TEST_SETTINGS, Cluster, Node, backoff, database, poll
from tests.e2e.test_saga_recovery import serving
from tests.e2e.test_serve_cli import clean_env
from tests.fixtures.nginx import Nginx, running_nginx
from tests.fixtures.rawhttp import eventually, open_request, read_response
from tests.fixtures.redis import RedisServer
from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket, s3_client
from tests.fixtures.server import OCTETS, TUS
from tusingest.finalise.upload import SMALL_FILE

SETTLE_SECONDS = 40.0  # how long a delivered upload may take to become a registered file
PART_SIZE = 5 << 20  # s3 mode: CHUNK_SIZE_MB=5, the smallest part S3 allows
NODE_STAGING = "staging"  # s3 mode: STAGING_DIR, relative to each node's own working directory


@dataclass(frozen=True)
class Leftovers:
    """What the cluster holds beyond each registered file and its attr.json: all empty when clean."""

    orphans: tuple[str, ...] = ()  # objects or files on an element that no file row names
    missing: tuple[str, ...] = ()  # a registered file's object or attr.json not on its element
    staged: tuple[str, ...] = ()  # staging objects or folders, and scratch files in a node's STAGING_DIR
    multipart: tuple[str, ...] = ()  # open multipart uploads, in the staging bucket or the element's

    @property
    def clean(self) -> bool:
        return not (self.orphans or self.missing or self.staged or self.multipart)


class Shared(Protocol):
    """Where the nodes stage and store bytes, as a test reads it back (blocking calls: run them in
    a thread)."""

    mode: str

    def settings(self) -> dict[str, str]:
        """The nodes' settings for it."""
        ...

    def stored(self, storage_key: str) -> bytes:
        """The bytes of a registered file on the element."""
        ...

    def holds_body_bytes(self, upload_id: str) -> bool:
        """The node receiving a PATCH of the upload has taken bytes of its body (mid-body)."""
        ...

    def leftovers(self, keys: set[str]) -> Leftovers:
        """What is there beyond the files of ``keys`` (storage keys) and their attr.json."""
        ...


@dataclass
class SharedDirectory:
    """Shared-directory staging and a directory element."""

    staging: Path
    element: Path
    mode: str = "directory"

    def settings(self) -> dict[str, str]:
        return {"STAGING_DIR": str(self.staging), "DEFAULT_ELEMENT_DIR": str(self.element)}

    def stored(self, storage_key: str) -> bytes:
        return (self.element / storage_key).read_bytes()

    def holds_body_bytes(self, upload_id: str) -> bool:
        # The directory backend writes a body to the shared folder as it arrives: 1 MiB staged is
        # 1 MiB of the body received (the PATCH is longer).
        folder = self.staging / upload_id
        staged = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
        return staged >= 1 << 20

    def leftovers(self, keys: set[str]) -> Leftovers:
        expected = keys | {key + ".attr.json" for key in keys}
        found = {p.relative_to(self.element).as_posix() for p in self.element.rglob("*") if p.is_file()}
        staged = sorted(p.name for p in self.staging.iterdir()) if self.staging.exists() else []
        return Leftovers(tuple(sorted(found - expected)), tuple(sorted(expected - found)), tuple(staged))


@dataclass
class SharedBuckets:
    """S3 staging in one bucket, an S3 element in another, on one moto server; each node's own
    STAGING_DIR (``nodes``) for scratch files."""

    moto: MotoServer
    staging_bucket: str
    element_bucket: str
    nodes: list[Path]
    elements_file: Path  # the element list the nodes fall back on (SERVICE_DISCOVERY_FALLBACK_CONFIG)
    staging_prefix: str = "staging/"
    element_prefix: str = "files/"
    mode: str = "s3"

    @property
    def endpoint(self) -> str:
        return self.moto.url

    def settings(self) -> dict[str, str]:
        elements = {
            "version": 1,
            "storage_elements": [
                {
                    "element_id": "se-s3",
                    "mode": "rw",
                    "backend": "s3",
                    "endpoint": self.endpoint,
                    "bucket": self.element_bucket,
                    "prefix": self.element_prefix.rstrip("/"),
                }
            ],
        }
        self.elements_file.write_text(json.dumps(elements))
        return {
            "STAGING_BACKEND": "s3",
            "STAGING_DIR": NODE_STAGING,
            "STAGING_S3_BUCKET": self.staging_bucket,
            "STAGING_S3_PREFIX": self.staging_prefix,
            "STAGING_S3_ENDPOINT_URL": self.endpoint,
            "STAGING_S3_ACCESS_KEY_ID": MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "STAGING_S3_SECRET_ACCESS_KEY": MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "CHUNK_SIZE_MB": str(PART_SIZE >> 20),
            "SERVICE_DISCOVERY_FALLBACK_CONFIG": str(self.elements_file),
            "ELEMENT_SE_S3_AWS_ACCESS_KEY_ID": MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "ELEMENT_SE_S3_AWS_SECRET_ACCESS_KEY": MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }

    @contextmanager
    def _client(self) -> Iterator[Any]:
        client = s3_client(self.endpoint)
        try:
            yield client
        finally:
            client.close()

    def stored(self, storage_key: str) -> bytes:
        with self._client() as client:
            body: bytes = client.get_object(Bucket=self.element_bucket, Key=self.element_prefix + storage_key)[
                "Body"
            ].read()
            return body

    def holds_body_bytes(self, upload_id: str) -> bool:
        # S3 staging keeps a body in memory until its PATCH ends, but for whole parts, each sent as
        # it fills: part 1 of the upload's multipart upload is the first 5 MiB of the body received.
        return self.part_sent(upload_id, 1)

    def part_sent(self, upload_id: str, number: int) -> bool:
        """A multipart upload of the upload's staging holds part ``number``."""
        key = f"{self.staging_prefix}{upload_id}/data"
        with self._client() as client:
            uploads = client.list_multipart_uploads(Bucket=self.staging_bucket, Prefix=key).get("Uploads", [])
            for upload in uploads:
                parts = client.list_parts(Bucket=self.staging_bucket, Key=key, UploadId=upload["UploadId"])
                if any(part["PartNumber"] == number for part in parts.get("Parts", [])):
                    return True
        return False

    def _keys(self, client: Any, bucket: str) -> set[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {entry["Key"] for page in pages for entry in page.get("Contents", [])}

    def _multipart(self, client: Any, bucket: str) -> set[str]:
        pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
        return {f"{bucket}/{u['Key']} {u['UploadId']}" for page in pages for u in page.get("Uploads", [])}

    def leftovers(self, keys: set[str]) -> Leftovers:
        expected = {self.element_prefix + key for key in keys}
        expected |= {key + ".attr.json" for key in expected}
        with self._client() as client:
            found = self._keys(client, self.element_bucket)
            staged = {f"{self.staging_bucket}/{key}" for key in self._keys(client, self.staging_bucket)}
            multipart = self._multipart(client, self.staging_bucket) | self._multipart(client, self.element_bucket)
        for node in self.nodes:
            if node.exists():
                staged |= {str(p) for p in node.iterdir()}
        return Leftovers(
            tuple(sorted(found - expected)),
            tuple(sorted(expected - found)),
            tuple(sorted(staged)),
            tuple(sorted(multipart)),
        )

    def multipart_history(self) -> Counter[str]:
        """How many multipart uploads the staging bucket saw created, completed and aborted, from
        moto's request log: aborted ones are what killed nodes left open and cleanup took."""
        history: Counter[str] = Counter()
        # A request line, maybe coloured by status (werkzeug paints a 204 with ANSI codes).
        data = re.compile(
            rf'"(?:\x1b\[[\d;]*m)*(POST|DELETE) /{re.escape(self.staging_bucket)}/\S+/data\?(uploads|uploadId=)'
        )
        for method, query in data.findall(self.moto.output()):
            history["created" if query == "uploads" else "completed" if method == "POST" else "aborted"] += 1
        return history


@dataclass
class Setup:
    cluster: Cluster
    nginx: Nginx
    db: asyncpg.Pool
    http: httpx.AsyncClient  # to nginx only
    shared: Shared

    def node_at(self, upstream: str) -> Node:
        """The node an ``X-Upstream`` value (``127.0.0.1:port``) names."""
        port = int(upstream.rsplit(":", 1)[1])
        return next(node for node in self.cluster.nodes if node.port == port)


@pytest.fixture(params=["directory", "s3"])
async def setup(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> AsyncIterator[Setup]:
    env = clean_env(
        DATABASE_URL=postgres_url, REDIS_URL=redis_server.url, TRUST_PROXY_HEADERS="true", **KILL_TEST_SETTINGS
    )
    cluster = Cluster(tmp_path, env)
    buckets: list[str] = []
    moto: MotoServer | None = None
    shared: Shared
    if request.param == "directory":
        shared = SharedDirectory(tmp_path / "staging", tmp_path / "element")
    else:
        moto = request.getfixturevalue("moto_server")
        buckets = [create_bucket(moto.url), create_bucket(moto.url)]
        nodes = [node.cwd / NODE_STAGING for node in cluster.nodes]
        shared = SharedBuckets(moto, *buckets, nodes=nodes, elements_file=tmp_path / "elements.json")
    cluster.env.update(shared.settings())  # before any node starts
    try:
        await cluster.start()
        with running_nginx(tmp_path / "nginx", [node.port for node in cluster.nodes]) as nginx:
            async with database(postgres_url) as db, httpx.AsyncClient(base_url=nginx.url, timeout=30) as http:
                yield Setup(cluster, nginx, db, http, shared)
    finally:
        await cluster.stop()
        for bucket in buckets:
            assert moto is not None
            remove_bucket(moto.url, bucket)


def patch_headers(offset: int, length: int) -> dict[str, str]:
    return TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS, "Content-Length": str(length)}


async def create(setup: Setup, length: int) -> str:
    """A new upload, through nginx; its path. Its Location is nginx's: the nodes trust X-Forwarded-*."""
    response = await setup.http.post("/files/", headers=TUS | {"Upload-Length": str(length)})
    assert response.status_code == 201, response.text
    location = response.headers["Location"]
    assert location.startswith(setup.nginx.url + "/files/"), location
    return httpx.URL(location).path


def receiving(cluster: Cluster) -> Node | None:
    """The node with a request connection open (from nginx, which keeps none open between
    requests): while one PATCH is in flight, the node receiving it."""
    for node in cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            continue
        try:
            connections = psutil.Process(node.process.pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == node.port for c in connections):
            return node
    return None


async def receiving_node(cluster: Cluster, timeout: float = 10) -> Node | None:
    return await poll(lambda: asyncio.to_thread(receiving, cluster), lambda node: node is not None, timeout, 0.02)


async def raw_patch(
    setup: Setup, path: str, offset: int, body: bytes, cut: int, at_cut: Callable[[], Awaitable[bool]]
) -> tuple[int, dict[str, str]] | None:
    """A PATCH through nginx on a raw socket: ``cut`` bytes of ``body``, then ``at_cut()`` (True
    if it killed the receiving node), then the rest unless it did. The answer, or None if the
    connection failed before one came."""
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await open_request(setup.nginx.url + path, "PATCH", patch_headers(offset, len(body)))
        writer.write(body[:cut])
        await writer.drain()
        if not await at_cut() and cut < len(body):
            writer.write(body[cut:])
            await writer.drain()
        async with asyncio.timeout(60):
            return await read_response(reader)
    except (OSError, TimeoutError, IndexError, ValueError, asyncio.IncompleteReadError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def head_offset(setup: Setup, path: str) -> int | None:
    try:
        response = await setup.http.head(path, headers=TUS)
    except httpx.TransportError:
        return None
    assert response.status_code < 500 or response.status_code in (502, 503), f"HEAD {path}: {response.status_code}"
    return int(response.headers["Upload-Offset"]) if response.status_code == 200 else None


@dataclass
class Delivery:
    answers: list[str] = field(default_factory=list)  # "status node" of each PATCH, in order
    retries: int = 0


async def finish(setup: Setup, path: str, payload: bytes, delivery: Delivery, chunk: int | None = None) -> None:
    """What a tus client does after a failure: HEAD for the offset, PATCH the rest (in ``chunk``
    pieces), and again on any failure; nginx picks the node each time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        assert loop.time() < deadline, f"{path}: not delivered in 60 s; PATCH answers {delivery.answers}"
        offset = await head_offset(setup, path)
        if offset is None:
            delivery.retries += 1
            await backoff(delivery.retries)
            continue
        if offset == len(payload):
            return
        body = payload[offset : offset + (chunk or len(payload))]
        try:
            response = await setup.http.patch(path, headers=patch_headers(offset, len(body)), content=body)
        except httpx.TransportError:
            delivery.answers.append("no answer")
            delivery.retries += 1
            await backoff(delivery.retries)
            continue
        delivery.answers.append(f"{response.status_code} {response.headers.get('x-upstream')}")
        if response.status_code != 204:
            assert response.status_code in (400, 409, 423, 502, 503), f"PATCH {path}: {response.status_code}"
            delivery.retries += 1
            await backoff(delivery.retries)


async def registered_once(setup: Setup, upload_id: str, payload: bytes) -> None:
    """The upload is one file in the registry with the source's SHA-256, stored exactly on the element."""
    query = "SELECT sha256, size_bytes, storage_key FROM files WHERE upload_id = $1"
    rows = await poll(lambda: setup.db.fetch(query, upload_id), bool, SETTLE_SECONDS, 0.1)
    assert len(rows) == 1, f"upload {upload_id}: {len(rows)} file rows"
    (row,) = rows
    source = hashlib.sha256(payload).hexdigest()
    assert (row["sha256"], row["size_bytes"]) == (source, len(payload))
    stored = await asyncio.to_thread(setup.shared.stored, row["storage_key"])
    assert hashlib.sha256(stored).hexdigest() == source


async def nothing_left_over(setup: Setup, upload_ids: list[str]) -> Leftovers:
    """No saga unfinished; on the element only each file and its attr.json; nothing staged, no
    multipart upload open. Returns what it counted (all empty)."""
    unsettled = "SELECT subject_id, state, step FROM sagas WHERE state IN ('running', 'compensating')"
    assert not await poll(lambda: setup.db.fetch(unsettled), lambda rows: not rows, SETTLE_SECONDS, 0.2)
    rows = await setup.db.fetch("SELECT storage_key FROM files WHERE upload_id = ANY($1::text[])", upload_ids)
    keys = {row["storage_key"] for row in rows}
    # Staging's cleanups after a seal run in the background: give them a moment.
    left = await poll(lambda: asyncio.to_thread(setup.shared.leftovers, keys), lambda left: left.clean, 10, 0.2)
    assert left.orphans == () and left.missing == (), left
    assert left.staged == (), left
    assert left.multipart == (), left
    return left


async def test_each_patch_of_an_upload_lands_on_another_node_and_the_file_is_exact(setup: Setup) -> None:
    # Two parts and a bit in s3 mode: the second node creates the multipart upload (its first part
    # holds the first node's tail), the third sends part 2 into it.
    payload = random.Random(15).randbytes(2 * PART_SIZE + (2 << 20))
    path = await create(setup, len(payload))
    third = len(payload) // 3
    upstreams = []
    for offset in range(0, len(payload), third):
        body = payload[offset : offset + third]
        response = await setup.http.patch(path, headers=patch_headers(offset, len(body)), content=body)
        assert response.status_code == 204, response.text
        assert response.headers["Upload-Offset"] == str(offset + len(body))
        upstreams.append(response.headers["X-Upstream"])
    assert len(upstreams) == 3 and len(set(upstreams)) == 3, upstreams

    async def patched() -> list[str]:  # nginx logs a request just after its answer went out
        return [line.split("upstream=")[1].split()[0] for line in setup.nginx.access_log() if line.startswith("PATCH")]

    assert await eventually(patched, lambda logged: len(logged) == 3) == upstreams  # nginx's own log says the same
    upload_id = path.rsplit("/", 1)[1]
    await registered_once(setup, upload_id, payload)
    await nothing_left_over(setup, [upload_id])


async def test_a_node_killed_mid_patch_costs_a_retry_through_nginx_and_another_node_finishes(setup: Setup) -> None:
    payload = random.Random(16).randbytes(6 << 20)
    path = await create(setup, len(payload))
    upload_id = path.rsplit("/", 1)[1]
    sent = PART_SIZE + (512 << 10)  # in s3 mode past a part, which the node sends as the body goes on
    killed: list[Node] = []

    async def kill_the_receiver() -> bool:
        node = await receiving_node(setup.cluster)
        assert node is not None, "no node is receiving the PATCH"

        async def holds_body_bytes() -> bool:
            return await asyncio.to_thread(setup.shared.holds_body_bytes, upload_id)

        await eventually(holds_body_bytes, bool, timeout=20)  # mid-body: it took bytes, the body goes on
        assert await setup.cluster.kill(node, node.generation, f"mid-body of PATCH {upload_id}")
        killed.append(node)
        return True

    answer = await raw_patch(setup, path, 0, payload, sent, kill_the_receiver)
    assert answer is None or answer[0] == 502, answer  # the node died under nginx: no 204, no 5xx of its own
    delivery = Delivery()
    await finish(setup, path, payload, delivery)
    (victim,) = killed
    finisher = delivery.answers[-1].split()[1]
    assert delivery.answers[-1].startswith("204") and setup.node_at(finisher) is not victim, delivery.answers
    await registered_once(setup, upload_id, payload)
    await nothing_left_over(setup, [upload_id])


UPLOADS = 20  # the count


async def all_up(cluster: Cluster) -> bool:
    return all(node.process is not None for node in cluster.nodes)


MIN_SIZE = 256 << 10
# In s3 mode uploads of one to three parts, in PATCHes of up to two parts: a PATCH then often
# crosses a part boundary, and a kill in its middle leaves a part or a multipart upload nothing names.
MAX_SIZE = {"directory": 3 << 20, "s3": 2 * PART_SIZE + (2 << 20)}
MIN_CHUNK = {"directory": 128 << 10, "s3": 1 << 20}
MAX_CHUNK = {"directory": 1 << 20, "s3": 2 * PART_SIZE}


async def test_seeded_uploads_with_kills_at_random_moments_lose_nothing_and_register_each_once(setup: Setup) -> None:
    seed = 1515
    rng = random.Random(seed)
    kills = {"mid-body": 0, "after-answer": 0, "missed": 0}
    past_a_part = 0  # s3 mode: mid-body kills once the node had sent a part of the body
    ids, payloads, resumes, failed_requests, planned = [], [], 0, 0, 0
    for index in range(UPLOADS):
        payload = rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE[setup.shared.mode]))
        chunk = rng.randint(MIN_CHUNK[setup.shared.mode], MAX_CHUNK[setup.shared.mode])
        kill_at = rng.randrange(3) if rng.random() < 0.75 else None  # which PATCH of the upload
        moment = rng.choice(["mid-body", "after-answer"])
        fraction = rng.uniform(0.1, 0.9)
        planned += kill_at is not None
        # One node down at a time, as in a cluster that loses a machine: the one killed for the
        # previous upload is back (its restart runs in the background) before the next begins.
        await eventually(lambda: all_up(setup.cluster), bool, timeout=30)
        path = await create(setup, len(payload))
        offset, patches = 0, 0
        delivery = Delivery()
        while offset < len(payload):
            body = payload[offset : offset + chunk]
            armed = kill_at is not None and (patches == kill_at or offset + len(body) == len(payload))
            patches += 1
            cut = int(len(body) * fraction)
            # s3 mode: the cut comes past a part boundary; the node sends that part as the body goes on.
            last_part = (offset + cut) // PART_SIZE if (offset + cut) // PART_SIZE > offset // PART_SIZE else 0

            async def at_cut(
                armed: bool = armed,
                moment: str = moment,
                index: int = index,
                upload_id: str = path.rsplit("/", 1)[1],
                last_part: int = last_part,
            ) -> bool:
                nonlocal past_a_part
                if not armed or moment != "mid-body":
                    return False
                node = await receiving_node(setup.cluster, timeout=2)
                shared = setup.shared
                if node is not None and last_part and isinstance(shared, SharedBuckets):
                    # Killed once that part went up: what the killed PATCH leaves in S3 is then
                    # a part or a whole multipart upload that no committed tail names.
                    async def sent() -> bool:
                        return await asyncio.to_thread(shared.part_sent, upload_id, last_part)

                    await eventually(sent, bool, timeout=20)
                done = node is not None and await setup.cluster.kill(node, node.generation, f"mid-body #{index}")
                kills["mid-body" if done else "missed"] += 1
                past_a_part += done and last_part > 0
                return done

            answer = await raw_patch(setup, path, offset, body, cut, at_cut)
            if armed:
                kill_at = None
            if answer is not None and armed and moment == "after-answer" and "x-upstream" in answer[1]:
                node = setup.node_at(answer[1]["x-upstream"].split(",")[-1].strip())
                done = await setup.cluster.kill(node, node.generation, f"after-answer #{index}")
                kills["after-answer" if done else "missed"] += 1
            if answer is not None and answer[0] == 204:
                offset = int(answer[1]["upload-offset"])
                continue
            resumes += 1
            await finish(setup, path, payload, delivery, chunk)  # HEAD, then the rest, through nginx
            break
        failed_requests += delivery.retries
        ids.append(path.rsplit("/", 1)[1])
        payloads.append(payload)
    for upload_id, payload in zip(ids, payloads, strict=True):
        await registered_once(setup, upload_id, payload)
    left = await nothing_left_over(setup, ids)
    total = kills["mid-body"] + kills["after-answer"]
    staged_in = ""
    if isinstance(setup.shared, SharedBuckets):
        parts = sum(-(-len(payload) // PART_SIZE) for payload in payloads)
        history = await asyncio.to_thread(setup.shared.multipart_history)
        staged_in = (
            f" in {parts} parts of 5 MiB (staging multipart uploads: {history['created']} created, "
            f"{history['completed']} completed, {history['aborted']} aborted; {past_a_part} mid-body kills "
            "after a part of the body went up)"
        )
        assert past_a_part >= 1, "no mid-body kill after a part went up: the test proved little of S3 staging"
    print(
        f"\ncluster kill loop ({setup.shared.mode}), seed {seed}: {UPLOADS} uploads{staged_in}, "
        f"{planned} kills planned, {total} SIGKILLs "
        f"({kills['mid-body']} mid-body, {kills['after-answer']} after the answer, {kills['missed']} missed), "
        f"{resumes} resumes from HEAD, {failed_requests} failed requests after them; "
        f"0 lost, 0 corrupted, each registered once; {len(left.orphans)} orphan objects, "
        f"{len(left.staged)} staged objects or files, {len(left.multipart)} open multipart uploads"
    )
    assert total >= UPLOADS // 2, f"only {total} kills happened: the test proved little ({kills})"


def serve_log(node: Node) -> str:
    return "".join(log.read_text(errors="replace") for log in sorted(node.cwd.glob("serve-*.log")))


async def restart_with(setup: Setup, node: Node, **settings: str) -> None:
    """``node`` stopped (SIGTERM) and started again on its port with ``settings`` added to the cluster's."""
    async with node.lock:
        if node.stack is not None:
            await node.stack.aclose()
        stack = AsyncExitStack()
        node.process = await stack.enter_async_context(serving(node.cwd, setup.cluster.env | settings, node.port))
        node.stack = stack
        node.generation += 1


async def sigkill(node: Node) -> None:
    """SIGKILL ``node`` and leave it down (no restart): what survives must do its work."""
    async with node.lock:
        assert node.process is not None and node.stack is not None
        node.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(node.process.wait, 10)
        await node.stack.aclose()
        node.process = node.stack = None
        node.generation += 1


async def upstream_of_head(setup: Setup, path: str) -> str:
    response = await setup.http.head(path, headers=TUS)
    assert response.status_code == 200, response.status_code
    return response.headers["X-Upstream"]


async def test_a_node_killed_in_the_middle_of_finalisation_is_finished_by_another_node_within_the_lease(
    setup: Setup,
) -> None:
    # One node pauses its sagas once the file is inspected (a large file: the step is in the saga
    # log), the completing PATCH reaches it through nginx, and it is SIGKILLed there for good.
    lease = float(KILL_TEST_SETTINGS["SAGA_LEASE_SECONDS"])
    interval = float(KILL_TEST_SETTINGS["SAGA_RECOVERY_INTERVAL_SECONDS"])
    paused = setup.cluster.nodes[0]
    await restart_with(setup, paused, SAGA_FAILPOINTS="inspected=pause")
    payload = random.Random(17).randbytes(SMALL_FILE + (1 << 20))
    path = await create(setup, len(payload))
    upload_id = path.rsplit("/", 1)[1]
    # nginx goes round-robin in its configured order: after the node before ``paused`` answered,
    # the next request goes to ``paused`` (each HEAD moves one node on; nothing else talks to nginx).
    before = setup.cluster.nodes[-1]
    for _ in range(len(setup.cluster.nodes)):
        if setup.node_at(await upstream_of_head(setup, path)) is before:
            break
    else:
        pytest.fail("nginx did not go round-robin over the nodes")
    victims: list[Node] = []
    killed_at: list[float] = []

    async def kill_once_paused() -> bool:
        node = await receiving_node(setup.cluster)
        assert node is paused, f"the completing PATCH went to {node and node.name}, not {paused.name}"
        await eventually(
            lambda: asyncio.to_thread(serve_log, paused), lambda log: "failpoint inspected reached" in log, timeout=30
        )
        saga = await setup.db.fetchrow("SELECT state, step, owner FROM sagas WHERE subject_id = $1", upload_id)
        assert saga is not None and (saga["state"], saga["step"]) == ("running", "inspected"), saga
        assert paused.process is not None and f"-{paused.process.pid}-" in saga["owner"], saga
        await sigkill(paused)
        killed_at.append(asyncio.get_running_loop().time())
        victims.append(paused)
        return True

    answer = await raw_patch(setup, path, 0, payload, len(payload), kill_once_paused)
    assert victims == [paused]
    assert answer is None or answer[0] == 502, answer  # nginx's, for the connection the node dropped
    survivors = {node.process.pid for node in setup.cluster.nodes if node.process is not None}
    assert len(survivors) == 2

    query = "SELECT state, step, owner FROM sagas WHERE subject_id = $1"
    saga = await poll(lambda: setup.db.fetchrow(query, upload_id), lambda row: row["state"] != "running", 30, 0.1)
    took = asyncio.get_running_loop().time() - killed_at[0]
    assert saga["state"] == "completed", saga
    # The lease runs out, a survivor's next recovery round claims the saga and finishes it from
    # its step: the file is already inspected, so what is left is the put and the registration.
    assert took < lease + 2 * interval + 8, f"recovered {took:.1f} s after the kill (lease {lease:g} s)"
    assert any(f"-{pid}-" in saga["owner"] for pid in survivors), saga
    await registered_once(setup, upload_id, payload)
    head = await setup.http.head(path, headers=TUS)
    assert head.headers["ArtStore-Upload-Status"] == "completed"
    assert setup.node_at(head.headers["X-Upstream"]) is not paused
    await nothing_left_over(setup, [upload_id])
    print(f"\nfinalisation kill: the saga was finished by another node {took:.1f} s after the kill (lease {lease:g} s)")


ROLLING_UPLOADS = 8  # the count for the rolling restart
ROLLING_SIZE = 3 << 20
ROLLING_CHUNK = 512 << 10
SLOW_LINK_BYTES_PER_SECOND = 192 << 10  # each client's pace while the restart runs; full speed after
PIECE = 32 << 10


@dataclass
class Tally:
    """Every answer the clients got through nginx during the rolling restart."""

    answers: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # "PATCH 204": how many
    nginx_5xx: list[str] = field(default_factory=list)  # nginx's own page: the node went away under it
    node_5xx: list[str] = field(default_factory=list)  # a node answered 5xx: a failure
    no_answer: int = 0
    resumes: int = 0
    let_go: int = 0  # 204s for less than the PATCH's body: a node shutting down committed what it had

    def count(self, method: str, response: httpx.Response) -> None:
        self.answers += 1
        self.statuses[f"{method} {response.status_code}"] += 1
        if response.status_code < 500:
            return
        line = f"{method} {response.status_code} {response.headers.get('x-upstream')}"
        # nginx's error pages are HTML without tus headers; a node's answers carry Tus-Resumable.
        own = (
            response.headers.get("content-type", "").startswith("text/html") and "tus-resumable" not in response.headers
        )
        (self.nginx_5xx if own else self.node_5xx).append(line if own else f"{line}: {response.text[:200]!r}")


def listening_connections(node: Node) -> int:
    if node.process is None or node.process.poll() is not None:
        return 0
    try:
        connections = psutil.Process(node.process.pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == node.port for c in connections)


async def graceful_restart(setup: Setup, node: Node) -> float:
    """SIGTERM ``node`` as an orchestrator does, wait for its exit, start it again and wait until
    it is ready. Seconds the old process took to exit."""
    async with node.lock:
        assert node.process is not None and node.stack is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        node.process.send_signal(signal.SIGTERM)
        grace = float(KILL_TEST_SETTINGS["SHUTDOWN_GRACE_SECONDS"])
        code = await asyncio.to_thread(node.process.wait, grace + 10)
        took = loop.time() - began
        assert code == 0, f"{node.name} exited {code} on SIGTERM"
        await node.stack.aclose()
        stack = AsyncExitStack()
        node.process = await stack.enter_async_context(serving(node.cwd, setup.cluster.env, node.port))
        node.stack = stack
        node.generation += 1
        return took


async def paced(body: bytes, restarted: asyncio.Event) -> AsyncIterator[bytes]:
    """``body`` at a slow link's pace until the restart is over (a pace, not a synchronisation:
    it keeps PATCHes in flight while nodes go down), then at once."""
    for start in range(0, len(body), PIECE):
        yield body[start : start + PIECE]
        if not restarted.is_set():
            await asyncio.sleep(PIECE / SLOW_LINK_BYTES_PER_SECOND)


async def rolling_client(
    setup: Setup, payload: bytes, created: Callable[[], None], restarted: asyncio.Event, tally: Tally
) -> str:
    """A tus client through nginx: PATCH in chunks; after any failed request HEAD and resume.
    It holds its completing PATCH until the restart is over, so every upload spans all of it."""
    path = await create(setup, len(payload))
    created()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    offset: int | None = 0
    failures = 0
    while True:
        assert loop.time() < deadline, f"{path}: not delivered in 120 s"
        if offset is None:
            tally.resumes += 1
            try:
                response = await setup.http.head(path, headers=TUS)
            except httpx.TransportError:
                tally.no_answer += 1
                failures += 1
                await backoff(failures)
                continue
            tally.count("HEAD", response)
            if response.status_code != 200:
                failures += 1
                await backoff(failures)
                continue
            offset = int(response.headers["Upload-Offset"])
        if offset == len(payload):
            return path.rsplit("/", 1)[1]
        body = payload[offset : offset + ROLLING_CHUNK]
        if offset + len(body) == len(payload):
            await restarted.wait()
        try:
            response = await setup.http.patch(
                path, headers=patch_headers(offset, len(body)), content=paced(body, restarted)
            )
        except httpx.TransportError:
            tally.no_answer += 1
            offset = None
            continue
        tally.count("PATCH", response)
        if response.status_code == 204:
            committed = int(response.headers["Upload-Offset"])
            tally.let_go += committed < offset + len(body)
            offset, failures = committed, 0
        else:
            assert response.status_code in (400, 409, 423) or response.status_code >= 500, response.status_code
            offset = None
            failures += 1
            await backoff(failures)


async def test_a_rolling_restart_under_eight_uploads_completes_them_all_without_a_node_5xx(setup: Setup) -> None:
    rng = random.Random(1616)
    payloads = [rng.randbytes(ROLLING_SIZE + rng.randrange(1 << 20)) for _ in range(ROLLING_UPLOADS)]
    restarted, all_created = asyncio.Event(), asyncio.Event()
    tally = Tally()
    paths: list[None] = []

    def created() -> None:
        paths.append(None)
        if len(paths) == len(payloads):
            all_created.set()

    clients = [asyncio.create_task(rolling_client(setup, p, created, restarted, tally)) for p in payloads]
    exits: list[str] = []
    try:
        async with asyncio.timeout(30):
            await all_created.wait()  # from here on, a node's connections are PATCHes (or a resume's HEAD)
        for node in setup.cluster.nodes:
            # SIGTERM a node while it is receiving PATCHes: what a graceful shutdown must handle.
            in_flight = await poll(
                lambda node=node: asyncio.to_thread(listening_connections, node), bool, timeout=20, every=0.02
            )
            assert in_flight, f"no PATCH in flight on {node.name} to restart it under"
            assert not any(client.done() for client in clients), "an upload ended before the restart did"
            took = await graceful_restart(setup, node)
            exits.append(f"{node.name} ({in_flight} in flight) exited in {took:.1f} s")
        restarted.set()
        ids = await asyncio.gather(*clients)
    finally:
        restarted.set()
        for client in clients:
            client.cancel()
    assert tally.node_5xx == [], f"nodes answered 5xx during the rolling restart: {tally.node_5xx}"
    assert tally.let_go >= 1, "no PATCH was cut short by a shutdown: the restarts proved little"
    for upload_id, payload in zip(ids, payloads, strict=True):
        await registered_once(setup, upload_id, payload)
    await nothing_left_over(setup, ids)
    print(
        f"\nrolling restart: {'; '.join(exits)}; {ROLLING_UPLOADS} uploads, {tally.answers} answers, "
        f"{len(tally.nginx_5xx)} nginx 502s ({tally.nginx_5xx}), 0 node 5xx, {tally.no_answer} cut connections, "
        f"{tally.let_go} PATCHes answered 204 for what they had when their node shut down, "
        f"{tally.resumes} HEADs to resume; answers {dict(sorted(tally.statuses.items()))}; "
        "all exact, each registered once"
    )
