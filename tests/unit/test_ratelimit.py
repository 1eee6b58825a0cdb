"""Rate limits, on this process's memory and on a real redis-server: each kind trips with the right
Retry-After, the PATCH path pays once per quantum, slots come back on release or when their lease
runs out, everything is off by default and an unreachable Redis lets requests through."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.fixtures.rawhttp import eventually
from tests.fixtures.redis import RedisServer
from tusingest.config import SettingsError, load_settings
from tusingest.ratelimit import ALLOWED, Decision, RateLimiter, RateLimitSettings

type MakeLimiter = Callable[..., Awaitable[RateLimiter]]
KIB = 1024
MIB = 1 << 20


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[MakeLimiter]:
    """Build limiters on the parametrised storage; Redis ones share one private redis-server."""
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    made: list[RateLimiter] = []

    async def make(**settings: Any) -> RateLimiter:
        limiter = RateLimiter(RateLimitSettings(redis_url=redis_url, **settings))
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def test_creations_per_subject_trip_with_a_retry_after_of_the_window(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(creations_per_minute=3)
    answers = [await limiter.check_creation("alice", f"10.0.0.{n}") for n in range(4)]
    assert answers[:3] == [ALLOWED] * 3
    refused = answers[3]
    assert not refused.allowed and refused.limit == "creations"
    assert 55 < refused.retry_after <= 60 and refused.retry_after_header in {"56", "57", "58", "59", "60"}
    assert await limiter.check_creation("bob", "10.0.0.9") == ALLOWED


async def test_creations_per_address_trip_whatever_the_subject(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(creations_per_minute_per_address=2, creations_per_minute=100)
    answers = [await limiter.check_creation(f"user-{n}", "192.0.2.7") for n in range(3)]
    assert answers[:2] == [ALLOWED] * 2
    assert not answers[2].allowed and answers[2].limit == "creations_per_address"
    assert 55 < answers[2].retry_after <= 60
    assert await limiter.check_creation("user-9", "192.0.2.8") == ALLOWED


async def test_a_refused_address_does_not_spend_the_subjects_creations(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(creations_per_minute_per_address=1, creations_per_minute=2)
    assert await limiter.check_creation("alice", "192.0.2.1") == ALLOWED
    assert not (await limiter.check_creation("alice", "192.0.2.1")).allowed
    assert await limiter.check_creation("alice", "192.0.2.2") == ALLOWED
    assert (await limiter.check_creation("alice", "192.0.2.3")).limit == "creations"


async def test_the_byte_budget_trips_with_the_wait_that_earns_the_refused_quantum(make_limiter: MakeLimiter) -> None:
    # A 60 s window: the whole test runs inside one, so the sliding approximation does not blur it.
    limiter = await make_limiter(bytes_per_second=16 * KIB, bytes_window_seconds=60)
    budget = 16 * KIB * 60
    assert limiter.quantum == 4 * KIB
    upload = await limiter.begin_upload("alice")
    decisions = [await upload.charge(KIB) for _ in range(budget // KIB)]
    assert decisions == [ALLOWED] * (budget // KIB)

    refused = [await upload.charge(KIB) for _ in range(4)][-1]  # the 4th KiB completes a quantum

    assert not refused.allowed and refused.limit == "bytes"
    assert refused.retry_after == pytest.approx(4 * KIB / (16 * KIB))  # one quantum at 16 KiB/s
    assert refused.retry_after_header == "1"
    other = await limiter.begin_upload("bob")
    assert await other.charge(64 * KIB) == ALLOWED


async def test_the_patch_path_calls_the_storage_once_per_quantum(
    make_limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = await make_limiter(bytes_per_second=100 * MIB)
    assert limiter.quantum == MIB
    spent: list[int] = []
    real_spend = limiter._spend

    async def counting(subject: str, cost: int) -> Decision:
        spent.append(cost)
        return await real_spend(subject, cost)

    monkeypatch.setattr(limiter, "_spend", counting)
    upload = await limiter.begin_upload("alice")
    for _ in range(8 * 16):  # 8 MiB in 64 KiB chunks
        assert await upload.charge(64 * KIB) == ALLOWED
    assert spent == [MIB] * 8


async def test_requests_smaller_than_a_quantum_still_pay_on_release(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(bytes_per_second=MIB, bytes_window_seconds=60)
    for _ in range(3):
        upload = await limiter.begin_upload("alice")
        assert await upload.charge(1000) == ALLOWED
        await upload.release()
    assert await limiter.bytes_remaining("alice") == 60 * MIB - 3000


async def test_a_charge_larger_than_the_whole_budget_is_paid_in_parts_not_refused_forever(
    make_limiter: MakeLimiter,
) -> None:
    limiter = await make_limiter(bytes_per_second=64 * KIB)
    upload = await limiter.begin_upload("alice")
    refused = await upload.charge(200 * KIB)  # 64 KiB paid, the rest is debt
    assert not refused.allowed and refused.retry_after == pytest.approx(1.0)
    assert await limiter.bytes_remaining("alice") == 0


async def test_concurrent_uploads_trip_and_a_release_frees_one_slot_once(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(concurrent_uploads=2, concurrent_retry_after_seconds=5)
    first, second = await limiter.begin_upload("alice"), await limiter.begin_upload("alice")
    third = await limiter.begin_upload("alice")
    assert first.allowed and second.allowed
    assert not third.allowed and third.retry_after == 5 and third.decision.limit == "concurrent_uploads"
    assert (await limiter.begin_upload("bob")).allowed

    await first.release()
    await first.release()  # idempotent: frees one slot, not two
    await third.release()  # a refused allowance holds nothing

    assert (await limiter.begin_upload("alice")).allowed
    assert not (await limiter.begin_upload("alice")).allowed


async def test_a_slot_whose_holder_vanished_is_free_again_after_its_lease(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(concurrent_uploads=1, slot_lease_seconds=0.3)
    assert (await limiter.begin_upload("alice")).allowed  # never released: its node "died"
    assert not (await limiter.begin_upload("alice")).allowed
    taken = await eventually(lambda: limiter.begin_upload("alice"), lambda allowance: allowance.allowed, timeout=5)
    assert taken.allowed


async def test_a_renewed_slot_outlives_its_first_lease(
    make_limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = await make_limiter(concurrent_uploads=1, slot_lease_seconds=0.3)
    holder = await limiter.begin_upload("alice")
    renewed = 0

    async def keep_charging() -> bool:
        nonlocal renewed
        before = holder._renew_at
        await holder.charge(1)
        renewed += holder._renew_at != before
        return renewed >= 3

    await eventually(keep_charging, bool, timeout=5)  # three renewals: past the first lease's end
    assert not (await limiter.begin_upload("alice")).allowed


async def test_with_every_limit_off_everything_is_allowed() -> None:
    limiter = RateLimiter(RateLimitSettings())
    assert not limiter.settings.enabled
    assert [await limiter.check_creation("alice", "192.0.2.1") for _ in range(1000)] == [ALLOWED] * 1000
    upload = await limiter.begin_upload("alice")
    assert upload.allowed and await upload.charge(10 * MIB) == ALLOWED
    await upload.release()
    assert await limiter.bytes_remaining("alice") is None


async def test_an_unreachable_redis_lets_requests_through(redis_server: RedisServer) -> None:
    limiter = RateLimiter(
        RateLimitSettings(
            redis_url=redis_server.url, creations_per_minute=1, concurrent_uploads=1, bytes_per_second=KIB
        )
    )
    assert await limiter.check_creation("alice", "192.0.2.1") == ALLOWED
    redis_server.stop()
    try:
        assert await limiter.check_creation("alice", "192.0.2.1") == ALLOWED
        upload = await limiter.begin_upload("alice")
        assert upload.allowed and await upload.charge(4 * KIB) == ALLOWED
        await upload.release()
    finally:
        await limiter.aclose()


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("rate_limit_creations_per_minute", -1, "RATE_LIMIT_CREATIONS_PER_MINUTE"),
        ("rate_limit_creations_per_minute_per_address", "many", "RATE_LIMIT_CREATIONS_PER_MINUTE_PER_ADDRESS"),
        ("rate_limit_bytes_per_second", -5, "RATE_LIMIT_BYTES_PER_SECOND"),
        ("rate_limit_concurrent_uploads", 1.5, "RATE_LIMIT_CONCURRENT_UPLOADS"),
    ],
)
def test_a_bad_rate_limit_value_is_refused_naming_its_variable(name: str, value: object, said: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(**{name: value})
    assert said in str(refused.value)


def test_rate_limits_are_off_by_default() -> None:
    settings = load_settings()
    assert (
        settings.rate_limit_creations_per_minute,
        settings.rate_limit_creations_per_minute_per_address,
        settings.rate_limit_bytes_per_second,
        settings.rate_limit_concurrent_uploads,
    ) == (0, 0, 0, 0)
