"""The Storage Elements this node can place files on, with their breakers, health and reservations.

``ElementPool`` follows the element list from discovery, opens one backend per element,
chooses an element for a new file, runs backend calls through the element's circuit breaker
with retries of transient failures (exponential backoff with jitter, tenacity), and probes every
element on a timer. ``put_object`` fails over to another element when the chosen one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from tusingest.elements.backend import Backend, BackendError, InvalidKey, ObjectNotFound, ObjectRefused
from tusingest.elements.breaker import BreakerSettings, CircuitBreaker
from tusingest.elements.model import ElementList, StorageElement
from tusingest.elements.selection import ElementState, Retention, Selector

log = logging.getLogger(__name__)

T = TypeVar("T")
BackendFactory = Callable[[StorageElement], Backend]


class ElementUnavailable(Exception):
    """The element cannot be used now (unknown, breaker open, or it failed)."""

    code = "storage_element_unavailable"

    def __init__(self, element_id: str, reason: str) -> None:
        super().__init__(f"storage element {element_id!r} unavailable: {reason}")
        self.element_id = element_id
        self.reason = reason


class NoElementAvailable(Exception):
    """No writable element has room for the file."""

    code = "no_storage_element_available"

    def __init__(self, size: int, tried: Collection[str] = ()) -> None:
        detail = f" (failed: {', '.join(sorted(tried))})" if tried else ""
        super().__init__(f"no writable storage element with room for {size} bytes{detail}")
        self.size = size
        self.tried = tuple(tried)


@dataclass(frozen=True, slots=True)
class ElementStatus:
    """One row of the ``tusingest elements`` table and of /health/elements."""

    element_id: str
    name: str
    backend: str
    mode: str
    status: str
    priority: int
    datacenter: str | None
    capacity_bytes: int | None
    used_bytes: int
    reserved_bytes: int
    breaker: str
    healthy: bool | None
    latency_ms: float | None
    last_error: str | None
    checked_at: str | None


def _counts_against_element(exc: BaseException) -> bool:
    # A missing object, a bad key or a refused object is an answer about the request, not a sign
    # that the element is failing: it must never open the breaker (one user's file name would
    # otherwise take the element away from everyone).
    return isinstance(exc, BackendError) and not isinstance(exc, ObjectNotFound | InvalidKey | ObjectRefused)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, BackendError) and exc.transient and not isinstance(exc, ObjectRefused)


class ElementPool:
    def __init__(
        self,
        backend_factory: BackendFactory,
        *,
        selector: Selector,
        breaker_settings: BreakerSettings,
        retry_attempts: int = 3,
        retry_base_delay: float = 0.2,
        probe_timeout: float = 5.0,
        datacenter: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend_factory = backend_factory
        self._selector = selector
        self._breaker_settings = breaker_settings
        self._retry_attempts = retry_attempts
        self._retry_base_delay = retry_base_delay
        self._probe_timeout = probe_timeout
        self._datacenter = datacenter
        self._clock = clock
        self._states: dict[str, ElementState] = {}
        self._ordered: list[ElementState] = []
        self._uploadable: list[ElementState] = []
        self._backends: dict[str, Backend] = {}
        self._retired: list[Backend] = []
        self.version = 0

    # -- the element list -------------------------------------------------------------------

    def apply(self, elements: ElementList) -> None:
        """Follow a new element list. Breakers, health and reservations of elements that stay
        are kept; an element whose location changed gets a new backend."""
        states: dict[str, ElementState] = {}
        for element in elements.storage_elements:
            old = self._states.get(element.element_id)
            if old is None:
                breaker = CircuitBreaker(self._breaker_settings, clock=self._clock)
                states[element.element_id] = ElementState(element, breaker)
                continue
            if _location(old.element) != _location(element):
                backend = self._backends.pop(element.element_id, None)
                if backend is not None:
                    self._retired.append(backend)
            old.set_element(element)
            old.placed_bytes = 0  # the new snapshot's used_bytes includes what we placed
            states[element.element_id] = old
        for gone in self._states.keys() - states.keys():
            backend = self._backends.pop(gone, None)
            if backend is not None:
                self._retired.append(backend)
        self._states = states
        self._ordered = sorted(states.values(), key=lambda s: (s.element.priority, s.element.element_id))
        # Selection only ever looks at elements whose mode and status take uploads.
        self._uploadable = [state for state in self._ordered if state.takes_uploads]
        self.version = elements.version

    def state(self, element_id: str) -> ElementState:
        try:
            return self._states[element_id]
        except KeyError:
            raise ElementUnavailable(element_id, "not in the current element list") from None

    def backend(self, element_id: str) -> Backend:
        backend = self._backends.get(element_id)
        if backend is None:
            backend = self._backend_factory(self.state(element_id).element)
            self._backends[element_id] = backend
        return backend

    def has_writable_element(self) -> bool:
        return any(state.writable and state.room_for(1) for state in self._uploadable)

    def statuses(self) -> list[ElementStatus]:
        rows = []
        for state in self._ordered:
            element, health = state.element, state.health
            rows.append(
                ElementStatus(
                    element_id=element.element_id,
                    name=element.name,
                    backend=element.backend.value,
                    mode=element.mode.value,
                    status=element.status,
                    priority=element.priority,
                    datacenter=element.datacenter,
                    capacity_bytes=element.capacity_bytes,
                    used_bytes=element.used_bytes + state.placed_bytes,
                    reserved_bytes=state.reserved_bytes,
                    breaker=state.breaker.state.value,
                    healthy=_opt_bool(health.get("healthy")),
                    latency_ms=_opt_float(health.get("latency_ms")),
                    last_error=_opt_str(health.get("error")) or state.breaker.last_failure,
                    checked_at=_opt_str(health.get("checked_at")),
                )
            )
        return rows

    # -- choosing and reserving -----------------------------------------------------------

    def select(self, size: int, *, retention: Retention | None = None, exclude: Collection[str] = ()) -> ElementState:
        chosen = self._selector.choose(
            self._uploadable, size, retention=retention, datacenter=self._datacenter, exclude=exclude
        )
        if chosen is None:
            raise NoElementAvailable(size, exclude)
        return chosen

    @contextlib.contextmanager
    def reserve(self, element_id: str, size: int) -> Iterator[ElementState]:
        """Hold size bytes of the element's room while a file is being placed on it."""
        state = self.state(element_id)
        state.reserved_bytes += size
        try:
            yield state
        finally:
            state.reserved_bytes = max(0, state.reserved_bytes - size)

    # -- calls through the breaker --------------------------------------------------------

    async def call(self, element_id: str, operation: Callable[[Backend], Awaitable[T]]) -> T:
        """Run operation against the element's backend, retrying transient failures.

        The operation is called afresh on every attempt, so it must open its own input (a
        stream consumed by a failed attempt cannot be replayed). Raises ElementUnavailable when
        the breaker is open, else the last BackendError.
        """
        state = self.state(element_id)
        backend = self.backend(element_id)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retry_attempts),
            wait=wait_random_exponential(multiplier=self._retry_base_delay, max=max(self._retry_base_delay * 16, 0.1)),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if not state.breaker.allows_calls():
                    raise ElementUnavailable(element_id, f"circuit breaker open ({state.breaker.last_failure})")
                try:
                    result = await operation(backend)
                except Exception as exc:
                    if _counts_against_element(exc):
                        state.breaker.record_failure(str(exc))
                    raise
                state.breaker.record_success()
                return result
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    # -- what killed puts left ------------------------------------------------------------

    async def discard_incomplete(self, element_id: str, key: str) -> int:
        """Before key is put again on the element: remove what an earlier put of it left when its
        process was killed. Best effort: a failure is logged, and the sweep removes it later."""
        try:
            removed = await self.call(element_id, lambda backend: backend.discard_incomplete(key))
        except (BackendError, ElementUnavailable) as exc:
            log.warning("cannot check %s on %s for what an earlier put left: %s", key, element_id, exc)
            return 0
        if removed:
            log.info("removed %d unfinished put(s) of %s from %s", removed, key, element_id)
        return removed

    async def sweep_incomplete(self, older_than: datetime) -> dict[str, int]:
        """Remove, from every element that takes uploads, what puts begun before older_than left
        unfinished; returns how many per element (elements that could not be swept are left out)."""
        removed: dict[str, int] = {}
        for state in self._uploadable:
            element_id = state.element.element_id
            try:
                removed[element_id] = await self.call(element_id, lambda backend: backend.sweep_incomplete(older_than))
            except (BackendError, ElementUnavailable) as exc:
                log.warning("cannot sweep %s for unfinished puts: %s", element_id, exc)
                continue
            if removed[element_id]:
                log.info(
                    "removed %d unfinished put(s) begun before %s from %s", removed[element_id], older_than, element_id
                )
        return removed

    async def run_sweeps(self, age: float, interval: float) -> None:
        """Every interval seconds, from the first moment on, sweep away unfinished puts older than
        age seconds (longer than any put can run, so none in progress is touched)."""
        while True:
            try:
                await self.sweep_incomplete(datetime.now(UTC) - timedelta(seconds=age))
            except Exception:  # a failed round must not end the task
                log.exception("storage element sweep failed")
            await asyncio.sleep(interval)

    # -- health ---------------------------------------------------------------------------

    async def probe(self, element_id: str) -> bool:
        """Probe one element, record latency or error, and feed its breaker."""
        state = self.state(element_id)
        started = time.perf_counter()
        error: str | None = None
        try:
            async with asyncio.timeout(self._probe_timeout):
                await self.backend(element_id).probe()
        except TimeoutError:
            error = f"probe timed out after {self._probe_timeout:g}s"
        except Exception as exc:  # any failure is a failed probe; the reason is kept for the operator
            error = str(exc) or type(exc).__name__
        latency_ms = (time.perf_counter() - started) * 1000
        state.health = {
            "healthy": error is None,
            "latency_ms": round(latency_ms, 2),
            "error": error,
            "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if error is None:
            state.breaker.record_success()
        else:
            state.breaker.record_failure(error)
        return error is None

    async def probe_all(self) -> dict[str, bool]:
        ids = [state.element.element_id for state in self._ordered]
        results = await asyncio.gather(*(self.probe(element_id) for element_id in ids))
        return dict(zip(ids, results, strict=True))

    async def run_health_checks(self, interval: float) -> None:
        """Probe every element every interval seconds until cancelled."""
        while True:
            try:
                await self.probe_all()
            except Exception:  # a failed round must not end the task
                log.exception("storage element health check failed")
            await self.close_retired()
            await asyncio.sleep(interval)

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for backend in retired:
            with contextlib.suppress(Exception):
                await backend.close()

    async def close(self) -> None:
        self._retired.extend(self._backends.values())
        self._backends.clear()
        await self.close_retired()


def _location(element: StorageElement) -> tuple[object, ...]:
    return (element.backend, element.endpoint, element.bucket, element.prefix, element.region, element.path)


def _opt_bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _opt_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None
