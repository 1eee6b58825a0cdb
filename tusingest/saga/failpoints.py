"""Failure injection at named saga steps, for tests that must prove recovery on a real process.

SAGA_FAILPOINTS is a comma list of ``<point>=<action>[@<element_id>]``: ``pause`` blocks the saga
there for good (the test then kills the process), ``fail`` raises a permanent element failure.
Most points sit between steps; ``put_midway`` sits inside the object's put, once half its bytes
have gone to the element. Empty in production; nothing here costs anything when no point is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from tusingest.elements.backend import BackendError

log = logging.getLogger(__name__)

ACTIONS = ("pause", "fail")


@dataclass(frozen=True, slots=True)
class Failpoint:
    action: str
    element_id: str | None


class Failpoints:
    def __init__(self, spec: str = "") -> None:
        self._points: dict[str, Failpoint] = {}
        self.reached: set[str] = set()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            point, _, rest = item.partition("=")
            action, _, element_id = rest.partition("@")
            if action not in ACTIONS:
                raise ValueError(f"failpoint {item!r}: action must be one of {', '.join(ACTIONS)}")
            self._points[point.strip()] = Failpoint(action, element_id or None)
        if self._points:
            log.warning("saga failpoints are set (testing only): %s", spec)

    async def reach(self, point: str, element_id: str | None = None) -> None:
        failpoint = self._points.get(point)
        if failpoint is None or (failpoint.element_id is not None and failpoint.element_id != element_id):
            return
        log.warning("failpoint %s reached: %s", point, failpoint.action)
        self.reached.add(point)  # for a test in the same process: a small file's steps are not in the saga log
        if failpoint.action == "pause":
            await asyncio.Event().wait()
        raise BackendError(f"failpoint {point} on {element_id}", transient=False)

    def hook(self, point: str, element_id: str | None = None) -> Callable[[], Awaitable[None]] | None:
        """``reach(point, element_id)`` as a callback for code that waits there, or None when the point is not set."""
        if point not in self._points:
            return None
        return lambda: self.reach(point, element_id)

    def midway(
        self, point: str, chunks: AsyncIterator[bytes], length: int, element_id: str | None = None
    ) -> AsyncIterator[bytes]:
        """chunks as they are, reaching point once half of length has passed through."""
        if point not in self._points:
            return chunks
        return self._reach_midway(point, chunks, length, element_id)

    async def _reach_midway(
        self, point: str, chunks: AsyncIterator[bytes], length: int, element_id: str | None
    ) -> AsyncIterator[bytes]:
        passed, reached = 0, False
        async for chunk in chunks:
            yield chunk
            passed += len(chunk)
            if not reached and passed >= length // 2:
                reached = True
                await self.reach(point, element_id)
