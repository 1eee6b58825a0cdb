"""The per-element circuit breaker: closed → open → half-open → closed, on an injected clock; and
the pool feeding it only with failures of the element, never with a request's own fault."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import cast

import pytest

from tusingest.elements.backend import Backend, BackendError, ObjectInfo, ObjectRefused
from tusingest.elements.breaker import BreakerSettings, BreakerState, CircuitBreaker
from tusingest.elements.model import ElementList
from tusingest.elements.pool import ElementPool
from tusingest.elements.selection import Selector


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(failures: int = 3, timeout: float = 10.0, successes: int = 2) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerSettings(failures, timeout, successes), clock=clock), clock


def test_breaker_stays_closed_below_the_failure_threshold() -> None:
    breaker, _ = make(failures=3)
    breaker.record_failure("boom")
    breaker.record_failure("boom")
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allows_calls()


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    breaker, _ = make(failures=3)
    for _ in range(3):
        breaker.record_failure("connection refused")
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows_calls()
    assert breaker.last_failure == "connection refused"


def test_a_success_resets_the_consecutive_failure_count() -> None:
    breaker, _ = make(failures=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_open_breaker_turns_half_open_after_the_timeout() -> None:
    breaker, clock = make(failures=1, timeout=10.0)
    breaker.record_failure()
    clock.now += 9.9
    assert breaker.state is BreakerState.OPEN
    assert breaker.seconds_until_half_open() > 0
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allows_calls()


def test_half_open_breaker_closes_after_success_threshold_successes() -> None:
    breaker, clock = make(failures=1, timeout=5.0, successes=2)
    breaker.record_failure()
    clock.now += 5.0
    breaker.record_success()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.last_failure is None


def test_a_failure_while_half_open_opens_again_and_restarts_the_timeout() -> None:
    breaker, clock = make(failures=1, timeout=5.0, successes=2)
    breaker.record_failure()
    clock.now += 5.0
    breaker.record_success()
    breaker.record_failure("still down")
    assert breaker.state is BreakerState.OPEN
    clock.now += 4.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN


def test_successes_while_open_do_not_close_the_breaker_early() -> None:
    breaker, _ = make(failures=1, timeout=60.0, successes=1)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_success()
    assert breaker.state is BreakerState.OPEN


# --- the pool feeds the breaker only with what the element did ----------------------------------


class RefusingBackend:
    """A backend whose put fails with the given error and counts its calls."""

    def __init__(self, element_id: str, error: BackendError | None) -> None:
        self.element_id = element_id
        self.error = error
        self.puts = 0

    async def put(self, key: str, chunks: AsyncIterable[bytes], **_: object) -> ObjectInfo:
        self.puts += 1
        async for _chunk in chunks:
            pass
        if self.error is not None:
            raise self.error
        return ObjectInfo(key, 1)


def pool_of(backends: dict[str, RefusingBackend]) -> ElementPool:
    pool = ElementPool(
        lambda element: cast(Backend, backends[element.element_id]),
        selector=Selector("priority"),
        breaker_settings=BreakerSettings(failure_threshold=3, timeout=30.0, success_threshold=1),
        retry_attempts=3,
        retry_base_delay=0.0,
    )
    elements = [
        {"element_id": element_id, "mode": "rw", "backend": "directory", "path": f"/tmp/{element_id}", "priority": n}
        for n, element_id in enumerate(backends)
    ]
    pool.apply(ElementList.model_validate({"version": 1, "storage_elements": elements}))
    return pool


async def one_byte() -> AsyncIterator[bytes]:
    yield b"x"


async def put(pool: ElementPool, element_id: str) -> ObjectInfo:
    return await pool.call(element_id, lambda backend: backend.put("k", one_byte(), length=1))


# The pool's put_object is gone: the upload saga's placement loop chooses and fails over (tested
# with the saga); what the pool still owes is that a refusal neither counts nor is retried.
async def test_a_refused_object_neither_counts_against_the_element_nor_is_retried() -> None:
    first = RefusingBackend("first", ObjectRefused("name too long", key="k"))
    pool = pool_of({"first": first})
    for _ in range(5):
        with pytest.raises(ObjectRefused):
            await put(pool, "first")
    breaker = pool.state("first").breaker
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0
    assert first.puts == 5  # one attempt each: a refusal is not retried


async def test_an_element_failure_still_counts_and_is_retried() -> None:
    first = RefusingBackend("first", BackendError("disk on fire", transient=True))
    pool = pool_of({"first": first})
    with pytest.raises(BackendError):
        await put(pool, "first")
    assert first.puts == 3
    assert pool.state("first").breaker.state is BreakerState.OPEN


def test_a_disabled_breaker_counts_failures_but_never_opens() -> None:
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, enabled=False), clock=Clock())
    for _ in range(10):
        breaker.record_failure("connection refused")
    assert breaker.state is BreakerState.CLOSED and breaker.allows_calls()
    assert breaker.consecutive_failures == 10 and breaker.last_failure == "connection refused"
