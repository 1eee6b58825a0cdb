"""A subscriber that does not read (a stalled SSE client) holds at most QUEUE_MAX events: its backlog is
replaced by one RESYNC, after which it reads the upload's state again and goes on from there."""

from __future__ import annotations

from tusingest.sessions.progress import QUEUE_MAX, RESYNC, ProgressBus, ProgressEvent, Subscription


def drained(queue: Subscription) -> list[ProgressEvent | None]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def test_a_subscriber_that_falls_behind_gets_one_resync_instead_of_an_unbounded_backlog() -> None:
    bus = ProgressBus()
    with bus.subscribe("u1") as queue:
        for offset in range(QUEUE_MAX):
            bus.deliver(ProgressEvent("u1", offset=offset))
        assert queue.qsize() == QUEUE_MAX  # up to the bound, every step is kept
        bus.deliver(ProgressEvent("u1", offset=QUEUE_MAX))
        bus.deliver(ProgressEvent("u1", offset=QUEUE_MAX + 1))
        assert drained(queue) == [RESYNC, ProgressEvent("u1", offset=QUEUE_MAX + 1)]
        for _ in range(3 * QUEUE_MAX):
            bus.resync()
        assert queue.qsize() <= QUEUE_MAX
    assert bus.subscriptions == 0


def test_events_of_another_upload_do_not_reach_a_subscriber() -> None:
    bus = ProgressBus()
    with bus.subscribe("u1") as queue:
        bus.deliver(ProgressEvent("u2", offset=5))
        assert queue.empty()
