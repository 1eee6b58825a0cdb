"""Choosing the Storage Element for a new file (STORAGE_SELECTION_STRATEGY).

Only elements that take uploads (edit, rw), report a usable status, have a breaker that is not
open and have room for the file (capacity - used - bytes reserved by uploads in flight) are
candidates. ``retention_policy=temporary`` prefers edit elements, ``permanent`` prefers rw; a
preferred datacenter narrows further when it has a candidate. Each strategy then picks one;
ties go to the lower priority number, then to the element id, so choices are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from tusingest.elements.breaker import CircuitBreaker
from tusingest.elements.model import Mode, StorageElement

Retention = Literal["temporary", "permanent"]


class Strategy(StrEnum):
    LEAST_USED = "least_used"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    PRIORITY = "priority"


@dataclass(slots=True, eq=False)
class ElementState:
    """One element as this node sees it: the Admin Module's record plus local knowledge."""

    element: StorageElement
    breaker: CircuitBreaker
    reserved_bytes: int = 0  # uploads being placed on it right now
    placed_bytes: int = 0  # placed by this node since the last snapshot of its fill level
    health: dict[str, object] = field(default_factory=dict)
    # Derived from element; kept as plain attributes because selection reads them for every
    # element on every choice (1,000 elements must take microseconds, not milliseconds).
    element_id: str = field(init=False)
    takes_uploads: bool = field(init=False)
    capacity: int | None = field(init=False)
    priority: int = field(init=False)

    def __post_init__(self) -> None:
        self.set_element(self.element)

    def set_element(self, element: StorageElement) -> None:
        self.element = element
        self.element_id = element.element_id
        self.takes_uploads = element.mode.accepts_uploads and element.selectable_status
        self.capacity = element.capacity_bytes
        self.priority = element.priority

    @property
    def used_bytes(self) -> int:
        return self.element.used_bytes + self.placed_bytes + self.reserved_bytes

    def room_for(self, size: int) -> bool:
        capacity = self.capacity
        return capacity is None or capacity - self.used_bytes >= size

    @property
    def fill_ratio(self) -> float:
        capacity = self.capacity
        if not capacity:
            return 0.0 if capacity is None else 1.0
        return self.used_bytes / capacity

    @property
    def writable(self) -> bool:
        return self.takes_uploads and self.breaker.allows_calls()


class Selector:
    """Applies one strategy; keeps the round-robin position between calls."""

    def __init__(self, strategy: Strategy | str, *, rng: random.Random | None = None) -> None:
        self.strategy = Strategy(strategy)
        self._rng = rng or random.Random()
        self._turn = 0

    def choose(
        self,
        states: Sequence[ElementState],
        size: int,
        *,
        retention: Retention | None = None,
        datacenter: str | None = None,
        exclude: Collection[str] = (),
    ) -> ElementState | None:
        """The element for a file of size bytes, or None when no element qualifies.

        One pass sorts candidates into tiers: 0 = preferred mode and datacenter, up to 3 =
        neither. Only the best non-empty tier goes to the strategy.
        """
        preferred_mode = None if retention is None else (Mode.EDIT if retention == "temporary" else Mode.RW)
        tiers: list[list[ElementState]] = [[], [], [], []]
        for state in states:
            if not state.takes_uploads or (exclude and state.element_id in exclude):
                continue
            capacity = state.capacity
            if capacity is not None and capacity - state.used_bytes < size:
                continue
            if not state.breaker.allows_calls():
                continue
            element = state.element
            tier = 0
            if preferred_mode is not None and element.mode is not preferred_mode:
                tier = 2
            if datacenter is not None and element.datacenter != datacenter:
                tier += 1
            tiers[tier].append(state)
        for candidates in tiers:
            if candidates:
                return self._pick(candidates)
        return None

    def _pick(self, candidates: list[ElementState]) -> ElementState:
        match self.strategy:
            case Strategy.LEAST_USED:
                return min(candidates, key=lambda s: (s.fill_ratio, s.priority, s.element_id))
            case Strategy.PRIORITY:
                return min(candidates, key=lambda s: (s.priority, s.fill_ratio, s.element_id))
            case Strategy.RANDOM:
                return self._rng.choice(candidates)
            case Strategy.ROUND_ROBIN:
                ordered = sorted(candidates, key=lambda s: (s.priority, s.element_id))
                chosen = ordered[self._turn % len(ordered)]
                self._turn += 1
                return chosen
