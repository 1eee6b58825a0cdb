"""A circuit breaker per Storage Element, so a failing element is skipped instead of retried.

closed → open after ``failure_threshold`` consecutive failures (never, when disabled); open → half-open once
``timeout`` seconds have passed; half-open → closed after ``success_threshold`` consecutive
successes, or back to open on any failure. Our own, because the asyncio breakers on PyPI
(aiocircuitbreaker, purgatory) close after a single success and do not expose their state for
the health table; this one is a plain state machine with an injectable clock, fed by upload
calls and by the health probe alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_threshold: int = 5
    timeout: float = 30.0
    success_threshold: int = 2
    enabled: bool = True  # CIRCUIT_BREAKER_ENABLED=false: failures are still counted and shown, never open


class CircuitBreaker:
    def __init__(self, settings: BreakerSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self.last_failure: str | None = None

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose timeout has passed reads as half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._settings.timeout:
            self._state = BreakerState.HALF_OPEN
            self._successes = 0
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allows_calls(self) -> bool:
        """False while open: selection skips the element. Half-open lets calls through as trials."""
        if self._state is BreakerState.CLOSED:  # the common case, without a clock read
            return True
        return self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        state = self.state
        self._failures = 0
        if state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self._settings.success_threshold:
                self._state = BreakerState.CLOSED
                self._successes = 0
                self.last_failure = None

    def record_failure(self, reason: str = "") -> None:
        state = self.state
        self.last_failure = reason or self.last_failure
        if state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if not self._settings.enabled:
            return
        if state is BreakerState.CLOSED and self._failures >= self._settings.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._successes = 0

    def seconds_until_half_open(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._settings.timeout - (self._clock() - self._opened_at))
