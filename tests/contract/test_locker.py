"""The Locker contract (after tus-node-server's lockerContract): one writer per upload, holders
asked to release, bounded waits, release on cancellation. Every Locker implementation runs it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tusingest.sessions.locks import Locker, LockTimeout, MemoryLocker


@pytest.fixture(params=["memory"])
def locker(request: pytest.FixtureRequest) -> Iterator[Locker]:
    yield MemoryLocker(default_timeout=1.0)


async def test_a_free_upload_is_locked_and_released(locker: Locker) -> None:
    async with locker.lock("u1"):
        pass
    async with locker.lock("u1", timeout=0):
        pass


async def test_locks_of_different_uploads_do_not_interfere(locker: Locker) -> None:
    async with locker.lock("u1"), locker.lock("u2", timeout=0):
        pass


async def test_the_holder_is_asked_to_release_and_the_newcomer_gets_the_lock_after_it(locker: Locker) -> None:
    asked = asyncio.Event()
    held = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with locker.lock("u1", on_release_request=asked.set):
            order.append("holder in")
            held.set()
            await asked.wait()
            order.append("holder out")

    task = asyncio.create_task(holder())
    await held.wait()
    async with locker.lock("u1"):
        order.append("newcomer in")
    await task
    assert order == ["holder in", "holder out", "newcomer in"]


async def test_a_holder_that_does_not_release_makes_the_newcomer_time_out(locker: Locker) -> None:
    release = asyncio.Event()
    held = asyncio.Event()

    async def stubborn() -> None:
        async with locker.lock("u1"):
            held.set()
            await release.wait()

    task = asyncio.create_task(stubborn())
    await held.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LockTimeout):
        async with locker.lock("u1", timeout=0.2):
            pass
    waited = loop.time() - started
    release.set()
    await task
    assert 0.2 <= waited < 1.0


async def test_background_work_does_not_ask_the_holder_to_release(locker: Locker) -> None:
    asked = asyncio.Event()
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locker.lock("u1", on_release_request=asked.set):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    with pytest.raises(LockTimeout):
        async with locker.lock("u1", timeout=0, ask_holder=False):
            pass
    release.set()
    await task
    assert not asked.is_set()


async def test_a_cancelled_holder_releases_the_lock(locker: Locker) -> None:
    held = asyncio.Event()

    async def holder() -> None:
        async with locker.lock("u1"):
            held.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(holder())
    await held.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with locker.lock("u1", timeout=0):
        pass


async def test_a_cancelled_waiter_does_not_take_the_lock_later(locker: Locker) -> None:
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locker.lock("u1"):
            held.set()
            await release.wait()

    first = asyncio.create_task(holder())
    await held.wait()
    waiter = asyncio.create_task(locker.lock("u1").__aenter__())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await first
    async with locker.lock("u1", timeout=0):
        pass


async def test_request_release_all_asks_every_holder(locker: Locker) -> None:
    asked: list[str] = []
    held = [asyncio.Event(), asyncio.Event()]
    done = asyncio.Event()

    async def holder(i: int) -> None:
        async with locker.lock(f"u{i}", on_release_request=lambda: asked.append(f"u{i}")):
            held[i].set()
            await done.wait()

    tasks = [asyncio.create_task(holder(i)) for i in range(2)]
    for event in held:
        await event.wait()
    locker.request_release_all()
    done.set()
    await asyncio.gather(*tasks)
    assert sorted(asked) == ["u0", "u1"]
