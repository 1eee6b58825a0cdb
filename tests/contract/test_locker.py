"""The Locker contract (after tus-node-server's lockerContract): one writer per upload, holders
asked to release, bounded waits, release on cancellation. Every Locker implementation runs it;
the cross-node part runs two PostgresLockers on one database, which is what two nodes are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tusingest.sessions.locks import Locker, LockTimeout, MemoryLocker
from tusingest.sessions.pglocks import PostgresLocker


@pytest.fixture(params=["memory", "postgres"])
async def locker(request: pytest.FixtureRequest) -> AsyncIterator[Locker]:
    implementation: Locker
    if request.param == "memory":
        implementation = MemoryLocker(default_timeout=1.0)
    else:
        implementation = PostgresLocker(request.getfixturevalue("postgres_url"), default_timeout=1.0)
    await implementation.open()
    try:
        yield implementation
    finally:
        await implementation.close()


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


async def test_a_lock_taken_after_request_release_all_is_asked_to_release_at_once(locker: Locker) -> None:
    """A request that got its lock while the node stops (it waited for the lock, or its head came in
    just before the signal) lets go as soon as it holds it, like the ones that held a lock already."""
    asked: list[str] = []
    holding = asyncio.Event()
    finish = asyncio.Event()

    async def first() -> None:
        async with locker.lock("u", on_release_request=lambda: (asked.append("first"), finish.set())):
            holding.set()
            await finish.wait()

    task = asyncio.create_task(first())
    await holding.wait()
    locker.request_release_all()
    async with locker.lock("u", on_release_request=lambda: asked.append("waiter"), ask_holder=False):
        assert asked == ["first", "waiter"]  # asked before its block began
    async with locker.lock("other", on_release_request=lambda: asked.append("newcomer")):
        assert asked[-1] == "newcomer"
    await task


# -- across nodes: two PostgresLockers on one database ------------------------------------------


@pytest.fixture
async def nodes(postgres_url: str) -> AsyncIterator[tuple[PostgresLocker, PostgresLocker]]:
    # Polling only every 5 s: a waiter that gets the lock sooner was woken by the holder's node.
    a, b = (PostgresLocker(postgres_url, default_timeout=1.0, retry_interval=(5.0, 5.0)) for _ in range(2))
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await b.close()
        await a.close()


async def hold_until_asked(
    node: Locker, upload_id: str, held: asyncio.Event, asked: asyncio.Event, leaving: asyncio.Event | None = None
) -> None:
    async with node.lock(upload_id, on_release_request=asked.set):
        held.set()
        await asked.wait()
        if leaving is not None:
            leaving.set()  # the last thing it does holding the lock


async def test_a_holder_on_another_node_is_asked_to_release_and_the_newcomer_gets_the_lock_at_once(
    nodes: tuple[PostgresLocker, PostgresLocker],
) -> None:
    a, b = nodes
    held, asked, leaving = asyncio.Event(), asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_until_asked(a, "u1", held, asked, leaving))
    await held.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with b.lock("u1"):
        waited = loop.time() - started
        # The holder had left its critical section. (Not ``holder.done()``: the unlock reaches the
        # database, and wakes this node, before the holder's task has run its last step.)
        holder_left = leaving.is_set()
    await holder
    assert asked.is_set() and holder_left
    assert waited < 1.0  # woken by `released`, not by the 5 s poll


async def test_a_holder_on_another_node_that_does_not_release_makes_the_newcomer_time_out(
    nodes: tuple[PostgresLocker, PostgresLocker],
) -> None:
    a, b = nodes
    held, release = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        async with a.lock("u1"):
            held.set()
            await release.wait()

    task = asyncio.create_task(stubborn())
    await held.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LockTimeout):
        async with b.lock("u1", timeout=0.3):
            pass
    waited = loop.time() - started
    release.set()
    await task
    assert 0.3 <= waited < 1.0


async def test_background_work_on_another_node_neither_asks_the_holder_nor_gets_the_lock(
    nodes: tuple[PostgresLocker, PostgresLocker],
) -> None:
    a, b = nodes
    held, asked, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with a.lock("u1", on_release_request=asked.set):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    with pytest.raises(LockTimeout):
        async with b.lock("u1", timeout=0.2, ask_holder=False):
            pass
    release.set()
    await task
    assert not asked.is_set()


async def test_a_background_waiter_on_another_node_is_woken_when_the_holder_lets_go(
    nodes: tuple[PostgresLocker, PostgresLocker],
) -> None:
    a, b = nodes
    held, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with a.lock("u1"):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    waiter = asyncio.create_task(b.lock("u1", timeout=3.0, ask_holder=False).__aenter__())
    await asyncio.sleep(0.2)  # b has tried once and said it waits
    loop = asyncio.get_running_loop()
    released_at = loop.time()
    release.set()
    await task
    await waiter
    assert loop.time() - released_at < 1.0


async def test_a_node_that_closes_while_holding_frees_its_locks(nodes: tuple[PostgresLocker, PostgresLocker]) -> None:
    a, b = nodes
    held, asked = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_until_asked(a, "u1", held, asked))
    await held.wait()
    await a.close()  # the node goes away without releasing
    async with b.lock("u1", timeout=0, ask_holder=False):
        pass
    await holder
    assert asked.is_set()  # its holder was told it no longer holds anything


async def test_a_node_whose_lock_connection_dies_asks_its_holders_to_let_go_and_reconnects(
    nodes: tuple[PostgresLocker, PostgresLocker], postgres_url: str
) -> None:
    a, b = nodes
    held, asked = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_until_asked(a, "u1", held, asked))
    await held.wait()
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks "
            "WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await admin.close()
    await asyncio.wait_for(asked.wait(), 5)
    await holder
    async with b.lock("u1", timeout=0):
        pass
    async with a.lock("u2", timeout=0):  # node a takes locks again on a new connection
        pass


async def test_a_node_holds_an_upload_once_however_many_local_requests_want_it(
    nodes: tuple[PostgresLocker, PostgresLocker],
) -> None:
    a, b = nodes
    order: list[str] = []

    async def writer(name: str) -> None:
        async with a.lock("u1"):
            order.append(f"{name} in")
            await asyncio.sleep(0.01)
            order.append(f"{name} out")

    await asyncio.gather(*(writer(f"w{i}") for i in range(5)))
    assert all(order[i].endswith("in") and order[i + 1].endswith("out") for i in range(0, len(order), 2))
    async with b.lock("u1", timeout=0):  # and every local release gave the database lock back
        pass


async def test_a_claimed_new_upload_is_held_within_the_node_and_stopped_by_release_all(locker: Locker) -> None:
    asked = asyncio.Event()
    held = asyncio.Event()

    async def creation() -> None:
        async with locker.claim_new("new-upload", on_release_request=asked.set):
            held.set()
            await asked.wait()

    task = asyncio.create_task(creation())
    await held.wait()
    locker.request_release_all()  # graceful shutdown reaches a creation's body too
    await task
    async with locker.lock("new-upload", timeout=0):
        pass


def counted(locker: Locker, name: str) -> float:
    metrics = locker.metrics  # type: ignore[attr-defined]  # both lockers count into the app's Metrics
    return metrics.registry.get_sample_value(f"artstore_ingester_{name}_total") or 0.0


async def test_a_wait_and_the_release_request_it_sends_are_counted(locker: Locker) -> None:
    async with locker.lock("u1"):
        pass
    assert (counted(locker, "lock_waits"), counted(locker, "lock_release_requests")) == (0.0, 0.0)
    asked = asyncio.Event()
    held = asyncio.Event()

    async def holder() -> None:
        async with locker.lock("u1", on_release_request=asked.set):
            held.set()
            await asked.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    async with locker.lock("u1"):
        pass
    await task

    assert (counted(locker, "lock_waits"), counted(locker, "lock_release_requests")) == (1.0, 1.0)


async def test_a_wait_for_another_nodes_lock_is_counted_on_the_waiting_node(postgres_url: str) -> None:
    first, second = (PostgresLocker(postgres_url, default_timeout=2.0) for _ in range(2))
    await first.open()
    await second.open()
    try:
        asked = asyncio.Event()
        held = asyncio.Event()

        async def holder() -> None:
            async with first.lock("u1", on_release_request=asked.set):
                held.set()
                await asked.wait()

        task = asyncio.create_task(holder())
        await held.wait()
        async with second.lock("u1"):
            pass
        await task
    finally:
        await second.close()
        await first.close()

    assert (counted(second, "lock_waits"), counted(second, "lock_release_requests")) == (1.0, 1.0)
    assert counted(first, "lock_waits") == 0.0
