"""Placing objects through the ElementPool's parts (select, reserve, call): failover when an element's
S3 server stops, the circuit breaker opening after its threshold, and closing again once the server is
back (real moto)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, s3_client
from tusingest.app import element_settings
from tusingest.config import load_settings
from tusingest.elements.backend import Backend, BackendError, ObjectInfo
from tusingest.elements.backends import open_backend
from tusingest.elements.breaker import BreakerSettings, BreakerState
from tusingest.elements.model import ElementList, StorageElement
from tusingest.elements.pool import ElementPool, ElementUnavailable, NoElementAvailable
from tusingest.elements.s3 import S3ClientPool
from tusingest.elements.selection import Selector

BUCKET = "failover-main"
PAYLOAD = b"artstore " * 100_000  # 900 KB


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_bucket(endpoint: str) -> None:
    client = s3_client(endpoint)
    try:
        client.create_bucket(Bucket=BUCKET)
    finally:
        client.close()


async def stream() -> AsyncIterator[bytes]:
    for start in range(0, len(PAYLOAD), 64 << 10):
        yield PAYLOAD[start : start + (64 << 10)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def pool(private_moto_server: MotoServer, tmp_path: Path, clock: Clock) -> AsyncIterator[ElementPool]:
    make_bucket(private_moto_server.url)
    settings = load_settings(s3_connect_timeout_seconds=1.0, s3_read_timeout_seconds=5.0)
    s3_clients = S3ClientPool.from_settings(element_settings(settings).s3)
    # Per-element keys from the environment, as production passes them (never through Redis).
    environ = {
        "ELEMENT_S3_MAIN_AWS_ACCESS_KEY_ID": MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "ELEMENT_S3_MAIN_AWS_SECRET_ACCESS_KEY": MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }

    def backend_for(element: StorageElement) -> Backend:
        return open_backend(element, element_settings(settings, environ).s3, s3_clients)

    element_pool = ElementPool(
        backend_for,
        selector=Selector("priority"),
        breaker_settings=BreakerSettings(failure_threshold=3, timeout=30.0, success_threshold=2),
        retry_attempts=2,
        retry_base_delay=0.0,
        probe_timeout=5.0,
        clock=clock,
    )
    element_pool.apply(
        ElementList.model_validate(
            {
                "version": 1,
                "storage_elements": [
                    {
                        "element_id": "s3-main",
                        "mode": "rw",
                        "backend": "s3",
                        "endpoint": private_moto_server.url,
                        "bucket": BUCKET,
                        "prefix": "files",
                        "priority": 1,
                    },
                    {
                        "element_id": "local",
                        "mode": "rw",
                        "backend": "directory",
                        "path": str(tmp_path / "local"),
                        "priority": 2,
                    },
                ],
            }
        )
    )
    try:
        yield element_pool
    finally:
        await element_pool.close()
        await s3_clients.close()


async def put(pool: ElementPool, key: str) -> str:
    """Place one file the way the upload saga's placement loop does (the pool has no put of its own):
    choose an element, put under a reservation through its breaker, and on an element failure choose
    another. Raises NoElementAvailable once every candidate failed."""
    tried: set[str] = set()
    while True:
        element_id = pool.select(len(PAYLOAD), exclude=tried).element.element_id

        async def put_there(backend: Backend) -> ObjectInfo:
            return await backend.put(key, stream(), length=len(PAYLOAD), content_type="text/plain")

        try:
            with pool.reserve(element_id, len(PAYLOAD)):
                info = await pool.call(element_id, put_there)
        except (BackendError, ElementUnavailable):
            tried.add(element_id)
            continue
        pool.state(element_id).placed_bytes += info.size
        assert info.size == len(PAYLOAD)
        return element_id


async def stored_digest(pool: ElementPool, element_id: str, key: str) -> str:
    digest = hashlib.sha256()
    async for chunk in pool.backend(element_id).get(key):
        digest.update(chunk)
    return digest.hexdigest()


async def test_files_go_to_the_preferred_element_while_it_is_healthy(pool: ElementPool) -> None:
    assert await put(pool, "a/one.txt") == "s3-main"
    assert await stored_digest(pool, "s3-main", "a/one.txt") == hashlib.sha256(PAYLOAD).hexdigest()


async def test_a_stopped_s3_server_opens_the_breaker_and_uploads_fail_over(
    pool: ElementPool, private_moto_server: MotoServer
) -> None:
    private_moto_server.stop()

    # First file: two attempts on s3-main fail (two breaker failures), then it goes to local.
    assert await put(pool, "b/first.txt") == "local"
    assert pool.state("s3-main").breaker.state is BreakerState.CLOSED
    # Second file: the third failure reaches the threshold and opens the breaker.
    assert await put(pool, "b/second.txt") == "local"
    assert pool.state("s3-main").breaker.state is BreakerState.OPEN
    # While open, s3-main is not even tried.
    failures_before = pool.state("s3-main").breaker.consecutive_failures
    assert await put(pool, "b/third.txt") == "local"
    assert pool.state("s3-main").breaker.consecutive_failures == failures_before
    assert await stored_digest(pool, "local", "b/third.txt") == hashlib.sha256(PAYLOAD).hexdigest()
    assert not [row for row in pool.statuses() if row.element_id == "s3-main" and row.breaker != "open"]


async def test_the_breaker_closes_again_after_the_server_returns(
    pool: ElementPool, private_moto_server: MotoServer, clock: Clock
) -> None:
    private_moto_server.stop()
    for index in range(2):
        await put(pool, f"c/{index}.txt")
    assert pool.state("s3-main").breaker.state is BreakerState.OPEN

    private_moto_server.start()
    make_bucket(private_moto_server.url)  # a restarted moto is empty
    clock.now += 30.0  # the breaker's timeout passes: half-open
    assert pool.state("s3-main").breaker.state is BreakerState.HALF_OPEN

    assert await pool.probe("s3-main") is True
    assert pool.state("s3-main").breaker.state is BreakerState.HALF_OPEN  # one success of two
    assert await pool.probe("s3-main") is True
    assert pool.state("s3-main").breaker.state is BreakerState.CLOSED
    assert await put(pool, "c/after.txt") == "s3-main"


async def test_a_failed_probe_while_half_open_opens_the_breaker_again(
    pool: ElementPool, private_moto_server: MotoServer, clock: Clock
) -> None:
    private_moto_server.stop()
    for index in range(2):
        await put(pool, f"d/{index}.txt")
    clock.now += 30.0
    assert await pool.probe("s3-main") is False
    assert pool.state("s3-main").breaker.state is BreakerState.OPEN
    (row,) = [row for row in pool.statuses() if row.element_id == "s3-main"]
    assert row.healthy is False and row.last_error


async def test_no_element_available_when_every_element_fails(
    pool: ElementPool, private_moto_server: MotoServer, tmp_path: Path
) -> None:
    private_moto_server.stop()
    (tmp_path / "local").write_text("a file where the element's directory should be")
    with pytest.raises(NoElementAvailable) as failure:
        await put(pool, "e/none.txt")
    assert set(failure.value.tried) == {"s3-main", "local"}


async def test_a_full_element_is_skipped_and_reservations_are_released(pool: ElementPool, tmp_path: Path) -> None:
    pool.apply(
        ElementList.model_validate(
            {
                "version": 2,
                "storage_elements": [
                    {
                        "element_id": "tiny",
                        "mode": "rw",
                        "path": str(tmp_path / "tiny"),
                        "capacity_bytes": 10,
                        "priority": 0,
                    },
                    {"element_id": "local", "mode": "rw", "path": str(tmp_path / "local"), "priority": 2},
                ],
            }
        )
    )
    assert await put(pool, "f/big.txt") == "local"
    assert pool.state("local").reserved_bytes == 0
    assert pool.state("local").placed_bytes == len(PAYLOAD)
