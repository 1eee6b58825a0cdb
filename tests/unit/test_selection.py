"""Choosing a Storage Element: modes, status, breakers, room, retention, datacenter and each strategy."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tusingest.elements.breaker import BreakerSettings, CircuitBreaker
from tusingest.elements.model import StorageElement
from tusingest.elements.selection import ElementState, Selector

GiB = 1 << 30


def state(element_id: str, **fields: Any) -> ElementState:
    values: dict[str, Any] = {
        "element_id": element_id,
        "mode": "rw",
        "backend": "directory",
        "path": f"/srv/{element_id}",
        "capacity_bytes": 100 * GiB,
        "used_bytes": 0,
        "priority": 100,
    }
    values.update(fields)
    return ElementState(StorageElement.model_validate(values), CircuitBreaker(BreakerSettings(failure_threshold=1)))


def chosen(selector: Selector, states: list[ElementState], size: int = 1, **kwargs: Any) -> str | None:
    result = selector.choose(states, size, **kwargs)
    return None if result is None else result.element.element_id


def test_only_edit_and_rw_elements_take_uploads() -> None:
    states = [state("ro", mode="ro"), state("ar", mode="ar"), state("edit", mode="edit")]
    assert chosen(Selector("priority"), states) == "edit"
    assert chosen(Selector("priority"), states[:2]) is None


def test_offline_and_maintenance_elements_are_skipped() -> None:
    states = [state("off", status="offline", priority=1), state("maint", status="maintenance", priority=2), state("on")]
    assert chosen(Selector("priority"), states) == "on"


def test_an_element_with_an_open_breaker_is_skipped() -> None:
    broken, healthy = state("broken", priority=1), state("healthy", priority=2)
    broken.breaker.record_failure("down")
    assert chosen(Selector("priority"), [broken, healthy]) == "healthy"


def test_an_element_without_room_for_the_file_is_skipped() -> None:
    full = state("full", capacity_bytes=10 * GiB, used_bytes=9 * GiB, priority=1)
    roomy = state("roomy", priority=2)
    assert chosen(Selector("priority"), [full, roomy], size=GiB) == "full"
    assert chosen(Selector("priority"), [full, roomy], size=GiB + 1) == "roomy"


def test_bytes_reserved_by_uploads_in_flight_count_against_room() -> None:
    element = state("one", capacity_bytes=10 * GiB, used_bytes=5 * GiB)
    element.reserved_bytes = 4 * GiB
    assert chosen(Selector("priority"), [element], size=GiB) == "one"
    assert chosen(Selector("priority"), [element], size=GiB + 1) is None


def test_unknown_capacity_means_no_limit() -> None:
    assert chosen(Selector("least_used"), [state("open", capacity_bytes=None)], size=10**15) == "open"


def test_temporary_retention_prefers_edit_and_permanent_prefers_rw() -> None:
    states = [state("edit", mode="edit", priority=200), state("rw", mode="rw", priority=1)]
    assert chosen(Selector("priority"), states, retention="temporary") == "edit"
    assert chosen(Selector("priority"), states, retention="permanent") == "rw"


def test_retention_preference_falls_back_to_the_other_writable_mode() -> None:
    assert chosen(Selector("priority"), [state("rw", mode="rw")], retention="temporary") == "rw"


def test_preferred_datacenter_wins_when_it_has_a_candidate() -> None:
    states = [state("near", datacenter="dc2", priority=500), state("far", datacenter="dc1", priority=1)]
    assert chosen(Selector("priority"), states, datacenter="dc2") == "near"
    assert chosen(Selector("priority"), states, datacenter="dc9") == "far"


def test_excluded_elements_are_not_chosen_again() -> None:
    states = [state("a", priority=1), state("b", priority=2)]
    assert chosen(Selector("priority"), states, exclude={"a"}) == "b"


def test_least_used_picks_the_lowest_fill_ratio_then_priority() -> None:
    states = [
        state("half", used_bytes=50 * GiB, priority=1),
        state("tenth", used_bytes=10 * GiB, priority=9),
        state("tenth-preferred", used_bytes=10 * GiB, priority=5),
    ]
    assert chosen(Selector("least_used"), states) == "tenth-preferred"


def test_least_used_compares_fill_ratio_not_bytes() -> None:
    big = state("big", capacity_bytes=1000 * GiB, used_bytes=100 * GiB)  # 10 %
    small = state("small", capacity_bytes=10 * GiB, used_bytes=5 * GiB)  # 50 %
    assert chosen(Selector("least_used"), [small, big]) == "big"


def test_priority_picks_the_lowest_priority_number() -> None:
    states = [state("b", priority=20), state("a", priority=10), state("c", priority=30)]
    assert chosen(Selector("priority"), states) == "a"


def test_round_robin_cycles_through_candidates_in_priority_order() -> None:
    states = [state("c", priority=3), state("a", priority=1), state("b", priority=2)]
    selector = Selector("round_robin")
    assert [chosen(selector, states) for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_random_uses_every_candidate_and_only_candidates() -> None:
    states = [state("a"), state("b"), state("c"), state("ro", mode="ro")]
    selector = Selector("random", rng=random.Random(7))
    picks = {chosen(selector, states) for _ in range(200)}
    assert picks == {"a", "b", "c"}


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError):
        Selector("fastest")
