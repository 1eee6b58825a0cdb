"""How long choosing a Storage Element takes with many elements (issue 4: "microseconds").

Builds N elements (mixed modes, fill levels, datacenters, some breakers open), then times
Selector.choose for each strategy with and without a retention preference and a datacenter.

    .venv/bin/python benchmarks/selection.py --elements 1000
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tusingest.elements.breaker import BreakerSettings, CircuitBreaker
from tusingest.elements.model import StorageElement
from tusingest.elements.selection import ElementState, Selector, Strategy

GiB = 1 << 30


def build(n: int, rng: random.Random) -> list[ElementState]:
    states = []
    for i in range(n):
        element = StorageElement.model_validate(
            {
                "element_id": f"se-{i:04d}",
                "mode": rng.choice(["edit", "rw", "rw", "rw", "ro", "ar"]),
                "backend": "s3",
                "bucket": f"bucket-{i}",
                "capacity_bytes": 1024 * GiB,
                "used_bytes": rng.randrange(0, 1024) * GiB,
                "priority": rng.randrange(1, 200),
                "datacenter": f"dc{i % 4}",
                "status": rng.choice(["online"] * 9 + ["offline"]),
            }
        )
        breaker = CircuitBreaker(BreakerSettings(failure_threshold=1))
        if rng.random() < 0.05:
            breaker.record_failure("down")
        states.append(ElementState(element, breaker))
    return sorted(states, key=lambda s: (s.element.priority, s.element.element_id))


def measure(selector: Selector, states: list[ElementState], rounds: int, **kwargs: object) -> list[float]:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        selector.choose(states, 64 << 20, **kwargs)  # type: ignore[arg-type]
        timings.append((time.perf_counter_ns() - started) / 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--elements", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    states = build(args.elements, random.Random(42))
    print(f"{args.elements} elements, {args.rounds} selections each; microseconds per selection")
    print(f"{'strategy':<12} {'options':<28} {'median':>8} {'p99':>8}")
    for strategy in Strategy:
        for label, kwargs in (
            ("-", {}),
            ("retention=permanent", {"retention": "permanent"}),
            ("retention+datacenter=dc2", {"retention": "temporary", "datacenter": "dc2"}),
        ):
            selector = Selector(strategy, rng=random.Random(1))
            measure(selector, states, 100, **kwargs)  # warm up
            timings = sorted(measure(selector, states, args.rounds, **kwargs))
            p99 = timings[int(len(timings) * 0.99) - 1]
            print(f"{strategy.value:<12} {label:<28} {statistics.median(timings):>8.1f} {p99:>8.1f}")


if __name__ == "__main__":
    main()
