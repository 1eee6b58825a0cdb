"""Service discovery against a real, private redis-server: the snapshot key, the change channel,
outages, and the cache, fallback and default lists used when Redis is absent."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.fixtures.rawhttp import eventually
from tests.fixtures.redis import RedisServer, free_port
from tusingest.elements.discovery import DiscoveryError, ElementDiscovery
from tusingest.elements.model import BackendKind, ElementList, Mode

KEY = "artstore:storage_elements"
CHANNEL = "artstore:storage_elements:changed"

# Unclosed connections or transports would show up as these warnings; they fail the test instead.
pytestmark = pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")


def element(element_id: str, **fields: Any) -> dict[str, Any]:
    """An element as the Admin Module sends it, with fields we do not use (api_url, file_count)."""
    return {
        "element_id": element_id,
        "name": f"Storage Element {element_id}",
        "mode": "edit",
        "api_url": f"http://{element_id}:8010",
        "endpoint": "http://minio:9000",
        "bucket": "artstore",
        "capacity_bytes": 10**12,
        "used_bytes": 10**9,
        "file_count": 42,
        "priority": 100,
        "status": "online",
        **fields,
    }


def snapshot(version: int, *elements: dict[str, Any]) -> str:
    document = {"version": version, "timestamp": "2026-11-28T12:00:00Z", "storage_elements": list(elements)}
    return json.dumps(document)


def versions(lists: list[ElementList]) -> list[int]:
    return [listed.version for listed in lists]


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, bool, timeout)


class Paths:
    def __init__(self, root: Path) -> None:
        self.cache = root / "cache" / "storage_elements.json"
        self.fallback = root / "fallback.json"
        self.default_dir = root / "elements" / "local"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """What the Admin Module does to Redis: SET the snapshot key, PUBLISH on the channel."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def discoveries() -> AsyncIterator[list[ElementDiscovery]]:
    """Every discovery a test makes is closed at teardown, even when the test fails."""
    made: list[ElementDiscovery] = []
    yield made
    for discovery in made:
        await discovery.close()
    gc.collect()  # a connection left open now warns in this test, not in whichever test the GC runs during


@pytest.fixture
def make_discovery(paths: Paths, discoveries: list[ElementDiscovery]) -> Callable[..., ElementDiscovery]:
    def make(redis_url: str | None, **overrides: Any) -> ElementDiscovery:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "key": KEY,
            "channel": CHANNEL,
            "fallback_path": None,
            "cache_path": paths.cache,
            "default_element_dir": paths.default_dir,
            "reconnect_max_seconds": 0.5,
            "timeout_seconds": 1.0,
        }
        discovery = ElementDiscovery(**(values | overrides))
        discoveries.append(discovery)
        return discovery

    return make


# Redis up


async def test_start_reads_the_snapshot_key_and_writes_it_to_the_cache(
    redis_server: RedisServer, admin: Redis, paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    await admin.set(KEY, snapshot(7, element("se-1"), element("se-2", mode="ro", priority=5)))
    discovery = make_discovery(redis_server.url)

    await discovery.start()

    assert (discovery.source, discovery.connected, discovery.last_error) == ("redis", True, None)
    assert discovery.last_refresh is not None
    assert discovery.current.version == 7
    elements = discovery.current.by_id()
    assert sorted(elements) == ["se-1", "se-2"]
    assert elements["se-2"].mode is Mode.RO
    assert elements["se-2"].priority == 5
    assert elements["se-1"].bucket == "artstore"
    assert not hasattr(elements["se-1"], "api_url")
    assert paths.cache.read_text() == discovery.current.to_json()
    assert ElementList.parse(paths.cache.read_text()) == discovery.current


async def test_published_full_snapshot_replaces_the_list(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url)
    await discovery.start()

    await admin.publish(CHANNEL, snapshot(2, element("se-1"), element("se-3")))

    await wait_until(lambda: discovery.current.version == 2)
    assert sorted(discovery.current.by_id()) == ["se-1", "se-3"]
    assert discovery.source == "redis"


@pytest.mark.parametrize(
    "event",
    [json.dumps({"event": "updated", "element_id": "se-2"}), "storage_elements_changed"],
    ids=["json-event", "bare-string"],
)
async def test_change_event_rereads_the_key(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery], event: str
) -> None:
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url)
    await discovery.start()
    await admin.set(KEY, snapshot(2, element("se-1"), element("se-2")))

    await admin.publish(CHANNEL, event)

    await wait_until(lambda: discovery.current.version == 2)
    assert sorted(discovery.current.by_id()) == ["se-1", "se-2"]


async def test_published_snapshot_older_than_the_current_one_is_ignored(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    seen: list[ElementList] = []
    await admin.set(KEY, snapshot(5, element("se-1")))
    discovery = make_discovery(redis_server.url, on_change=seen.append)
    await discovery.start()

    await admin.publish(CHANNEL, snapshot(4, element("se-old")))
    # Messages on a channel arrive in order: once version 6 is in, version 4 has been handled.
    await admin.publish(CHANNEL, snapshot(6, element("se-1"), element("se-2")))

    await wait_until(lambda: discovery.current.version == 6)
    assert versions(seen) == [5, 6]


async def test_on_change_fires_once_per_change(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    seen: list[ElementList] = []
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url, on_change=seen.append)
    await discovery.start()

    await admin.publish(CHANNEL, snapshot(2, element("se-1"), element("se-2")))
    await admin.publish(CHANNEL, snapshot(2, element("se-1"), element("se-2")))  # the same again
    await admin.set(KEY, snapshot(2, element("se-1"), element("se-2")))
    await admin.publish(CHANNEL, "changed")  # re-read finds what we have
    await admin.publish(CHANNEL, snapshot(2, element("se-1"), element("se-2", status="offline")))  # content only
    await admin.publish(CHANNEL, snapshot(3, element("se-1")))

    await wait_until(lambda: discovery.current.version == 3)
    assert versions(seen) == [1, 2, 2, 3]
    assert seen[2].by_id()["se-2"].status == "offline"


async def test_a_failing_on_change_handler_does_not_stop_the_updates(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    calls: list[int] = []

    def broken(listed: ElementList) -> None:
        calls.append(listed.version)
        raise RuntimeError("handler bug")

    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url, on_change=broken)
    await discovery.start()

    await admin.publish(CHANNEL, snapshot(2, element("se-2")))

    await wait_until(lambda: discovery.current.version == 2)
    assert calls == [1, 2]
    assert discovery.connected


async def test_refresh_rereads_the_key_now(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url)
    await discovery.start()
    await admin.set(KEY, snapshot(2, element("se-2")))  # no PUBLISH

    refreshed = await discovery.refresh()

    assert refreshed.version == 2
    assert discovery.current == refreshed


async def test_snapshot_with_a_bad_element_keeps_the_good_ones(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    bad = element("se-bad", mode="sideways")
    no_bucket = {key: value for key, value in element("se-nobucket").items() if key != "bucket"}
    await admin.set(KEY, snapshot(3, element("se-1"), bad, no_bucket, element("se-2")))
    discovery = make_discovery(redis_server.url)

    await discovery.start()

    assert sorted(discovery.current.by_id()) == ["se-1", "se-2"]
    assert discovery.source == "redis"


async def test_missing_key_uses_the_cache_until_the_admin_module_writes_it(
    redis_server: RedisServer, admin: Redis, paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    paths.cache.parent.mkdir(parents=True)
    paths.cache.write_text(snapshot(4, element("se-cached")))
    discovery = make_discovery(redis_server.url)
    await discovery.start()
    assert (discovery.source, discovery.connected) == ("cache", True)
    assert discovery.last_error is not None and KEY in discovery.last_error

    await admin.set(KEY, snapshot(5, element("se-1")))
    await admin.publish(CHANNEL, json.dumps({"event": "created", "element_id": "se-1"}))

    await wait_until(lambda: discovery.source == "redis")
    assert sorted(discovery.current.by_id()) == ["se-1"]
    assert discovery.last_error is None


# Redis lost and back


async def test_lost_redis_keeps_the_last_list(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url)
    await discovery.start()
    before = discovery.current

    redis_server.stop()

    await wait_until(lambda: not discovery.connected)
    assert discovery.current == before
    assert discovery.source == "redis"
    assert discovery.last_error is not None
    with pytest.raises(DiscoveryError, match="unavailable"):
        await discovery.refresh()


async def test_an_outage_is_logged_once_however_many_reconnects_fail(
    redis_server: RedisServer,
    admin: Redis,
    make_discovery: Callable[..., ElementDiscovery],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url)
    await discovery.start()
    redis_server.stop()
    attempts = 0

    def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    # Something that accepts and hangs up stands in for the port, to count reconnect attempts.
    impostor = await asyncio.start_server(hang_up, "127.0.0.1", redis_server.port)
    async with impostor:
        with caplog.at_level(logging.INFO, logger="tusingest.elements.discovery"):
            await wait_until(lambda: attempts >= 3)
    redis_server.start()
    await wait_until(lambda: discovery.connected)

    outages = [record for record in caplog.records if "unavailable" in record.getMessage()]
    assert [record.levelno for record in outages] == [logging.WARNING], [record.getMessage() for record in outages]


async def test_reconnect_rereads_the_key_changed_while_disconnected(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    seen: list[ElementList] = []
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url, on_change=seen.append)
    await discovery.start()
    # The restarted server loads this SAVEd value: the key "changed while Redis was down", unannounced.
    await admin.set(KEY, snapshot(2, element("se-1"), element("se-2")))
    await admin.save()
    redis_server.stop()
    await wait_until(lambda: not discovery.connected)
    assert discovery.current.version == 1

    redis_server.start()

    # The outage's error is cleared once the re-read is done, which includes writing the cache in a thread:
    # wait for that too rather than catch the moment between the list applied and the error cleared.
    await wait_until(lambda: discovery.connected and discovery.current.version == 2 and discovery.last_error is None)
    assert discovery.source == "redis"
    assert versions(seen) == [1, 2]


async def test_frozen_redis_is_noticed_by_the_liveness_ping(
    redis_server: RedisServer, admin: Redis, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url, health_check_seconds=0.2)
    await discovery.start()

    redis_server.freeze()
    try:
        await wait_until(lambda: not discovery.connected, timeout=5)
        assert discovery.last_error is not None and "PING" in discovery.last_error
        assert discovery.current.version == 1
    finally:
        redis_server.thaw()

    await wait_until(lambda: discovery.connected)


# Redis absent at start


async def test_absent_redis_at_start_uses_the_cache(
    redis_server: RedisServer, paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    paths.cache.parent.mkdir(parents=True)
    paths.cache.write_text(snapshot(9, element("se-cached")))
    paths.fallback.write_text(snapshot(1, element("se-fallback")))
    redis_server.stop()
    discovery = make_discovery(redis_server.url, fallback_path=paths.fallback)

    await discovery.start()

    assert (discovery.source, discovery.connected) == ("cache", False)
    assert sorted(discovery.current.by_id()) == ["se-cached"]
    assert discovery.last_error is not None


async def test_absent_redis_without_cache_uses_the_fallback_file(
    redis_server: RedisServer, paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    paths.fallback.write_text(snapshot(1, element("se-fallback")))
    redis_server.stop()
    discovery = make_discovery(redis_server.url, fallback_path=paths.fallback)

    await discovery.start()

    assert discovery.source == "fallback"
    assert sorted(discovery.current.by_id()) == ["se-fallback"]


async def test_absent_redis_with_a_corrupt_cache_uses_the_fallback_file(
    redis_server: RedisServer, paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    paths.cache.parent.mkdir(parents=True)
    paths.cache.write_text('{"version": 3, "storage_elem')
    paths.fallback.write_text(snapshot(1, element("se-fallback")))
    redis_server.stop()
    discovery = make_discovery(redis_server.url, fallback_path=paths.fallback)

    await discovery.start()

    assert discovery.source == "fallback"


async def test_absent_redis_without_cache_or_fallback_uses_one_local_directory(
    paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    discovery = make_discovery(f"redis://127.0.0.1:{free_port()}/0")

    await discovery.start()

    assert (discovery.source, discovery.connected) == ("default", False)
    (local,) = discovery.current.storage_elements
    assert (local.element_id, local.mode, local.backend) == ("local", Mode.EDIT, BackendKind.DIRECTORY)
    assert (local.path, local.priority, local.status, local.capacity_bytes) == (
        str(paths.default_dir),
        100,
        "online",
        None,
    )


async def test_redis_coming_up_after_start_replaces_the_local_list(
    redis_server: RedisServer, admin: Redis, paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    seen: list[ElementList] = []
    await admin.set(KEY, snapshot(3, element("se-1")))
    await admin.save()  # loaded again by the start below, so the key is there the moment Redis answers
    redis_server.stop()
    discovery = make_discovery(redis_server.url, on_change=seen.append)
    await discovery.start()
    assert discovery.source == "default"

    redis_server.start()

    await wait_until(lambda: discovery.source == "redis")
    assert discovery.connected
    assert sorted(discovery.current.by_id()) == ["se-1"]
    assert versions(seen) == [0, 3]
    # The cache is written (atomically, in a worker thread) just after the list is applied.
    await wait_until(paths.cache.exists)
    assert ElementList.parse(paths.cache.read_text()) == discovery.current


# No Redis configured


async def test_without_redis_the_fallback_file_is_used(
    paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    paths.fallback.write_text(snapshot(2, element("se-1"), element("se-2")))
    discovery = make_discovery(None, fallback_path=paths.fallback)

    await discovery.start()

    assert (discovery.source, discovery.connected) == ("fallback", False)
    assert sorted(discovery.current.by_id()) == ["se-1", "se-2"]
    assert not paths.cache.exists()
    with pytest.raises(DiscoveryError):
        await discovery.refresh()


async def test_without_redis_or_fallback_one_local_directory_is_used(
    paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    discovery = make_discovery(None)

    await discovery.start()

    assert discovery.source == "default"
    assert [element.path for element in discovery.current.storage_elements] == [str(paths.default_dir)]


async def test_missing_fallback_file_is_an_error_at_start(
    paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    discovery = make_discovery(None, fallback_path=paths.fallback)

    with pytest.raises(DiscoveryError, match=str(paths.fallback)):
        await discovery.start()


async def test_fallback_file_with_invalid_json_is_an_error_at_start(
    paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    paths.fallback.write_text('{"storage_elements": [')
    discovery = make_discovery(None, fallback_path=paths.fallback)

    with pytest.raises(DiscoveryError, match=str(paths.fallback)):
        await discovery.start()


async def test_missing_fallback_file_is_an_error_even_when_redis_answers(
    redis_server: RedisServer, admin: Redis, paths: Paths, make_discovery: Callable[..., ElementDiscovery]
) -> None:
    await admin.set(KEY, snapshot(1, element("se-1")))
    discovery = make_discovery(redis_server.url, fallback_path=paths.fallback)

    with pytest.raises(DiscoveryError, match=str(paths.fallback)):
        await discovery.start()
