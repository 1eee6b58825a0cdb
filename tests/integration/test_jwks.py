"""A JWKS served over real HTTP on loopback: tokens verify by kid, an unknown kid re-fetches the set
once and is then refused, a flood of made-up kids cannot hammer the endpoint, keys added or removed
upstream take effect on re-fetch, and an unreachable endpoint is a 503-kind error, not a 401."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures import jwt as keys
from tests.fixtures.jwt import JwksServer
from tests.fixtures.redis import free_port
from tusingest.auth import Authenticator, AuthError, AuthSettings, AuthUnavailable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    """A JWKS holding rsa_key("jwks-a") as kid "a"; tests replace ``document`` as upstream would."""
    server = JwksServer(keys.jwks((keys.rsa_key("jwks-a"), "a")))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def authenticator(jwks_server: JwksServer, clock: FakeClock) -> AsyncIterator[Authenticator]:
    settings = AuthSettings(jwks_url=jwks_server.url, jwks_cache_seconds=300, jwks_refetch_min_seconds=30)
    made = Authenticator(settings, clock=clock)
    try:
        yield made
    finally:
        await made.aclose()


def bearer(key: keys.PrivateKey, kid: str, sub: str = "user-1") -> str:
    return f"Bearer {keys.token(key, kid=kid, sub=sub)}"


async def test_a_token_verifies_with_the_key_its_kid_names(
    authenticator: Authenticator, jwks_server: JwksServer
) -> None:
    identity = await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a", sub="svc"))
    again = await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a", sub="svc"))
    assert identity.subject == again.subject == "svc"
    assert jwks_server.requests == 1  # cached


async def test_an_unknown_kid_refetches_once_then_is_refused(
    authenticator: Authenticator, jwks_server: JwksServer, clock: FakeClock
) -> None:
    await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a"))
    clock.now += 31

    with pytest.raises(AuthError) as first:
        await authenticator.authenticate(bearer(keys.rsa_key("stranger"), "zz"))
    with pytest.raises(AuthError) as second:
        await authenticator.authenticate(bearer(keys.rsa_key("stranger"), "zz"))

    assert first.value.reason == second.value.reason == "the token's key id is not known"
    assert jwks_server.requests == 2


async def test_a_key_added_upstream_is_accepted_after_one_refetch(
    authenticator: Authenticator, jwks_server: JwksServer, clock: FakeClock
) -> None:
    await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a"))
    jwks_server.document = keys.jwks((keys.rsa_key("jwks-a"), "a"), (keys.ec_key("jwks-b"), "b"))
    clock.now += 31
    identity = await authenticator.authenticate(bearer(keys.ec_key("jwks-b"), "b", sub="rotated"))
    assert identity.subject == "rotated" and jwks_server.requests == 2


async def test_a_flood_of_random_kids_fetches_at_most_once_per_interval(
    authenticator: Authenticator, jwks_server: JwksServer, clock: FakeClock
) -> None:
    await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a"))
    clock.now += 31
    flood = [bearer(keys.rsa_key("stranger"), uuid.uuid4().hex) for _ in range(200)]

    answers = await asyncio.gather(*(authenticator.authenticate(header) for header in flood), return_exceptions=True)
    assert all(isinstance(answer, AuthError) for answer in answers)
    assert jwks_server.requests == 2

    clock.now += 29  # still inside the interval after the flood's one fetch
    with pytest.raises(AuthError):
        await authenticator.authenticate(flood[0])
    assert jwks_server.requests == 2
    clock.now += 1
    with pytest.raises(AuthError):
        await authenticator.authenticate(flood[0])
    assert jwks_server.requests == 3


async def test_a_key_removed_upstream_is_refused_once_the_cache_expires(
    authenticator: Authenticator, jwks_server: JwksServer, clock: FakeClock
) -> None:
    old = bearer(keys.rsa_key("jwks-a"), "a")
    await authenticator.authenticate(old)
    jwks_server.document = keys.jwks((keys.ec_key("jwks-b"), "b"))

    clock.now += 299
    assert (await authenticator.authenticate(old)).subject == "user-1"  # cached set still trusted
    clock.now += 1
    with pytest.raises(AuthError) as refused:
        await authenticator.authenticate(old)
    assert refused.value.reason == "the token's key id is not known" and jwks_server.requests == 2


async def test_an_unreachable_jwks_is_unavailable_not_a_bad_token(clock: FakeClock) -> None:
    url = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"
    authenticator = Authenticator(AuthSettings(jwks_url=url, jwks_timeout_seconds=2), clock=clock)
    try:
        with pytest.raises(AuthUnavailable) as unavailable:
            await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a"))
        assert "fetched" in unavailable.value.reason
    finally:
        await authenticator.aclose()


async def test_an_outage_after_a_fetch_keeps_serving_the_cached_keys(
    authenticator: Authenticator, jwks_server: JwksServer, clock: FakeClock
) -> None:
    token = bearer(keys.rsa_key("jwks-a"), "a")
    await authenticator.authenticate(token)
    await jwks_server.stop()
    clock.now += 301  # the set is stale; the re-fetch fails

    assert (await authenticator.authenticate(token)).subject == "user-1"


@pytest.mark.parametrize(
    ("trusted", "server_max", "accepted"),
    [(False, None, False), (True, ssl.TLSVersion.TLSv1_2, False), (True, None, True)],
    ids=["untrusted-certificate", "tls-1.2-only-server", "trusted-tls-1.3"],
)
async def test_an_https_jwks_needs_a_trusted_certificate_and_tls_1_3(
    tmp_path: Path, clock: FakeClock, trusted: bool, server_max: ssl.TLSVersion | None, accepted: bool
) -> None:
    tls, certificate = keys.self_signed_tls(tmp_path, max_version=server_max)
    server = JwksServer(keys.jwks((keys.rsa_key("jwks-a"), "a")), tls=tls)
    await server.start()
    settings = AuthSettings(jwks_url=server.url, jwks_ca_bundle=str(certificate) if trusted else None)
    authenticator = Authenticator(settings, clock=clock)
    try:
        if accepted:
            assert (await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a"))).subject == "user-1"
        else:
            with pytest.raises(AuthUnavailable):
                await authenticator.authenticate(bearer(keys.rsa_key("jwks-a"), "a"))
    finally:
        await authenticator.aclose()
        await server.stop()
