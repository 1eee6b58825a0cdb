"""The per-element circuit breaker: closed → open → half-open → closed, on an injected clock."""

from __future__ import annotations

from tusingest.elements.breaker import BreakerSettings, BreakerState, CircuitBreaker


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
