"""JWT verification, the 401 header and the authorization policy: every refusal has a safe
reason, the algorithm comes from the key, key files rotate while running, roles and scopes map
to operations with least privilege for what is unknown."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import jwt as keys
from tusingest.auth import (
    AuthConfigError,
    Authenticator,
    AuthError,
    AuthSettings,
    Identity,
    JwksKeySet,
    Operation,
    allowed_operations,
    anonymous_identity,
    is_owner_or_admin,
    may,
    refuse_unauthenticated_bind,
    www_authenticate,
    www_authenticate_insufficient_scope,
)
from tusingest.config import SettingsError, load_settings


class FakeClock:
    """Monotonic time the test moves by hand, so 'at most once a second' needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return keys.write_pem(tmp_path / "jwt.pem", keys.rsa_key())


def pem_auth(*paths: Path, clock: FakeClock | None = None, **settings: Any) -> Authenticator:
    return Authenticator(AuthSettings(public_key_paths=paths, **settings), clock=clock or FakeClock())


async def refusal(authenticator: Authenticator, header: str | None) -> AuthError:
    with pytest.raises(AuthError) as refused:
        await authenticator.authenticate(header)
    return refused.value


def bearer(token: str) -> str:
    return f"Bearer {token}"


# --- accepted tokens --------------------------------------------------------------------------


async def test_an_rs256_token_from_the_key_file_gives_its_identity(key_file: Path) -> None:
    token = keys.token(keys.rsa_key(), sub="svc-7", type="service_account", role="user", name="Ingest", jti="j-1")
    identity = await pem_auth(key_file).authenticate(bearer(token))
    assert identity == Identity(
        subject="svc-7", kind="service_account", role="USER", name="Ingest", scopes=frozenset(), token_id="j-1"
    )


async def test_an_es256_token_verifies_with_an_ec_key_file(tmp_path: Path) -> None:
    path = keys.write_pem(tmp_path / "ec.pem", keys.ec_key())
    identity = await pem_auth(path).authenticate(bearer(keys.token(keys.ec_key(), sub="ec-user")))
    assert identity.subject == "ec-user"


async def test_scopes_are_read_from_scope_text_and_scopes_lists(key_file: Path) -> None:
    token = keys.token(keys.rsa_key(), scope="files:read files:write", scopes=["files:delete"])
    identity = await pem_auth(key_file).authenticate(bearer(token))
    assert identity.scopes == {"files:read", "files:write", "files:delete"}


async def test_a_token_expired_within_the_leeway_is_still_accepted(key_file: Path) -> None:
    token = keys.token(keys.rsa_key(), exp=int(time.time()) - 10)
    identity = await pem_auth(key_file, leeway_seconds=30).authenticate(bearer(token))
    assert identity.subject == "user-1"


async def test_issuer_and_audience_are_accepted_when_they_match(key_file: Path) -> None:
    token = keys.token(keys.rsa_key(), iss="artstore-admin", aud="ingester")
    identity = await pem_auth(key_file, issuer="artstore-admin", audience="ingester").authenticate(bearer(token))
    assert identity.subject == "user-1"


async def test_hs256_with_a_secret_is_accepted_and_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tusingest.auth"):
        authenticator = Authenticator(AuthSettings(secret=keys.DEV_SECRET))
    identity = await authenticator.authenticate(bearer(keys.token(keys.DEV_SECRET, sub="dev")))
    assert identity.subject == "dev"
    assert "development only" in caplog.text
    assert keys.DEV_SECRET not in caplog.text


# --- every 401 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Digest x"])
async def test_no_bearer_token_is_refused_as_missing(key_file: Path, header: str | None) -> None:
    refused = await refusal(pem_auth(key_file), header)
    assert refused.missing
    assert www_authenticate(refused) == 'Bearer realm="artstore"'


def _tampered(token: str) -> str:
    head, body, signature = token.split(".")
    return f"{head}.{body}.{signature[:-4]}AAAA"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: "Bearer ", "the Authorization header is malformed"),
        (lambda: "Bearer two words", "the Authorization header is malformed"),
        (lambda: "Bearer not-a-jwt", "the token is malformed"),
        (lambda: "Bearer a.b.c", "the token is malformed"),
        (lambda: bearer(keys.token(keys.rsa_key(), exp=int(time.time()) - 120)), "the token has expired"),
        (lambda: bearer(keys.token(keys.rsa_key(), nbf=int(time.time()) + 600)), "the token is not valid yet"),
        (lambda: bearer(keys.token(keys.rsa_key(), iat=int(time.time()) + 600)), "the token is not valid yet"),
        (lambda: bearer(keys.token(keys.rsa_key("other"))), "the token's signature does not verify"),
        (lambda: bearer(_tampered(keys.token(keys.rsa_key()))), "the token's signature does not verify"),
        (lambda: bearer(keys.unsigned_token()), "the token's algorithm is not accepted"),
        (lambda: bearer(keys.token(keys.rsa_key(), algorithm="PS256")), "the token's algorithm is not accepted"),
        (lambda: bearer(keys.token(keys.rsa_key(), algorithm="RS512")), "the token's algorithm is not accepted"),
        (lambda: bearer(keys.hmac_token(keys.public_pem(keys.rsa_key()))), "no accepted key matches the token"),
        (lambda: bearer(keys.token(keys.ec_key())), "no accepted key matches the token"),
        (lambda: bearer(keys.token(keys.rsa_key(), sub=None)), "the token lacks the sub claim"),
        (lambda: bearer(keys.token(keys.rsa_key(), exp=None)), "the token lacks the exp claim"),
        (lambda: bearer(keys.token(keys.rsa_key(), type="robot")), "the token's type is not service_account or admin_user"),  # noqa: E501
    ],
    ids=[
        "empty-bearer", "spaces", "not-a-jwt", "garbage-segments", "expired", "nbf-future", "iat-future",
        "another-key", "tampered", "alg-none", "ps256", "rs512", "hs-rs-confusion", "es256-without-ec-key",
        "no-sub", "no-exp", "unknown-type",
    ],
)  # fmt: skip
async def test_a_bad_token_is_refused_with_a_safe_reason(key_file: Path, make: Any, reason: str) -> None:
    header = make()
    refused = await refusal(pem_auth(key_file), header)
    assert refused.reason == reason and not refused.missing
    token = header.partition(" ")[2]
    assert (not token.strip()) or token not in www_authenticate(refused)
    assert www_authenticate(refused) == f'Bearer realm="artstore", error="invalid_token", error_description="{reason}"'


async def test_hs_rs_confusion_is_refused_even_when_a_secret_is_also_configured(key_file: Path) -> None:
    confused = keys.hmac_token(keys.public_pem(keys.rsa_key()))
    refused = await refusal(pem_auth(key_file, secret=keys.DEV_SECRET), bearer(confused))
    assert refused.reason == "the token's signature does not verify"


@pytest.mark.parametrize(
    ("claim", "settings", "reason"),
    [
        ({"iss": "someone-else"}, {"issuer": "artstore-admin"}, "the token's issuer is not accepted"),
        ({}, {"issuer": "artstore-admin"}, "the token lacks the iss claim"),
        ({"aud": "another-service"}, {"audience": "ingester"}, "the token's audience is not accepted"),
        ({}, {"audience": "ingester"}, "the token lacks the aud claim"),
    ],
    ids=["wrong-issuer", "no-issuer", "wrong-audience", "no-audience"],
)
async def test_wrong_or_missing_issuer_and_audience_are_refused(
    key_file: Path, claim: dict[str, str], settings: dict[str, str], reason: str
) -> None:
    refused = await refusal(pem_auth(key_file, **settings), bearer(keys.token(keys.rsa_key(), **claim)))
    assert refused.reason == reason


def test_the_401_description_cannot_break_out_of_its_quotes() -> None:
    header = www_authenticate(AuthError('bad "quoted"\\ \r\nInjected: 1'))
    assert header == 'Bearer realm="artstore", error="invalid_token", error_description="bad ?quoted?? ??Injected: 1"'


def test_the_403_header_names_the_missing_scope() -> None:
    assert www_authenticate_insufficient_scope(Operation.DELETE) == (
        'Bearer realm="artstore", error="insufficient_scope", scope="files:delete"'
    )


# --- key files rotate while running -------------------------------------------------------------


async def test_a_rotated_key_file_accepts_the_new_key_after_the_next_check(key_file: Path) -> None:
    clock = FakeClock()
    authenticator = pem_auth(key_file, clock=clock)
    new_token = keys.token(keys.rsa_key("next"))
    keys.write_pem(key_file, keys.rsa_key(), keys.rsa_key("next"))  # rotation: both keys for a while

    refused_before_check = await refusal(authenticator, bearer(new_token))
    clock.advance(1.0)
    accepted = await authenticator.authenticate(bearer(new_token))

    assert refused_before_check.reason == "the token's signature does not verify"
    assert accepted.subject == "user-1"
    assert (await authenticator.authenticate(bearer(keys.token(keys.rsa_key())))).subject == "user-1"


async def test_the_old_key_is_refused_once_removed_from_the_file(key_file: Path) -> None:
    clock = FakeClock()
    keys.write_pem(key_file, keys.rsa_key(), keys.rsa_key("next"))
    authenticator = pem_auth(key_file, clock=clock)
    old_token = keys.token(keys.rsa_key())
    assert (await authenticator.authenticate(bearer(old_token))).subject == "user-1"

    keys.write_pem(key_file, keys.rsa_key("next"))
    os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a rewrite within one mtime tick
    clock.advance(1.5)

    assert (await refusal(authenticator, bearer(old_token))).reason == "the token's signature does not verify"
    assert (await authenticator.authenticate(bearer(keys.token(keys.rsa_key("next"))))).subject == "user-1"


async def test_several_key_files_are_all_accepted_and_a_deleted_one_retires_its_key(tmp_path: Path) -> None:
    clock = FakeClock()
    first = keys.write_pem(tmp_path / "a.pem", keys.rsa_key())
    second = keys.write_pem(tmp_path / "b.pem", keys.ec_key())
    authenticator = pem_auth(first, second, clock=clock)
    assert (await authenticator.authenticate(bearer(keys.token(keys.ec_key(), sub="ec")))).subject == "ec"

    first.unlink()
    clock.advance(1.0)

    assert (await refusal(authenticator, bearer(keys.token(keys.rsa_key())))).reason == (
        "no accepted key matches the token"
    )
    assert (await authenticator.authenticate(bearer(keys.token(keys.ec_key(), sub="ec")))).subject == "ec"


async def test_a_key_file_being_rewritten_keeps_its_previous_keys(key_file: Path) -> None:
    clock = FakeClock()
    authenticator = pem_auth(key_file, clock=clock)
    key_file.write_bytes(b"-----BEGIN PUBLIC KEY-----\nhalf wri")  # a writer caught mid-way
    clock.advance(1.0)
    assert (await authenticator.authenticate(bearer(keys.token(keys.rsa_key())))).subject == "user-1"


async def test_key_files_are_looked_at_no_more_than_once_per_interval(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    authenticator = pem_auth(key_file, clock=clock)
    stats: list[Path] = []
    real_stat = Path.stat

    def counting_stat(self: Path, **kwargs: Any) -> os.stat_result:
        stats.append(self)
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", counting_stat)
    token = bearer(keys.token(keys.rsa_key()))
    for _ in range(50):
        await authenticator.authenticate(token)
    clock.advance(1.0)
    for _ in range(50):
        await authenticator.authenticate(token)
    assert stats.count(key_file) == 1


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"", "no PEM public key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "only public keys or certificates"),
    ],
)
def test_an_unusable_key_file_stops_start_up_with_its_path(tmp_path: Path, content: bytes, said: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(AuthConfigError) as refused:
        pem_auth(path)
    assert said in str(refused.value) and str(path) in str(refused.value)


def test_a_short_rsa_key_is_refused_at_start_up(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(AuthConfigError, match="at least 2048"):
        pem_auth(keys.write_pem(tmp_path / "small.pem", small))


# --- JWKS from a file ---------------------------------------------------------------------------


async def test_a_jwks_file_verifies_by_kid(tmp_path: Path) -> None:
    import json

    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(keys.jwks((keys.rsa_key("k1"), "k1"), (keys.ec_key("k2"), "k2"))))
    authenticator = Authenticator(AuthSettings(jwks_url=str(path)), clock=FakeClock())
    identity = await authenticator.authenticate(bearer(keys.token(keys.ec_key("k2"), kid="k2", sub="by-ec")))
    assert identity.subject == "by-ec"
    refused = await refusal(authenticator, bearer(keys.token(keys.ec_key("k2"), kid="k1")))
    assert refused.reason == "no accepted key matches the token"


async def test_a_jwk_declaring_another_algorithm_or_a_symmetric_key_is_not_used(tmp_path: Path) -> None:
    import json

    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    keys.jwk(keys.rsa_key("k1"), "k1", alg="RS512"),
                    {"kty": "oct", "kid": "sym", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"},
                ]
            }
        )
    )
    key_set = JwksKeySet(str(path), clock=FakeClock())
    assert await key_set.keys(None) == []


# --- anonymous and secure defaults ----------------------------------------------------------------


async def test_with_no_key_configured_every_request_is_the_anonymous_admin() -> None:
    identity = await Authenticator(AuthSettings()).authenticate("Bearer garbage")
    assert identity == anonymous_identity()
    assert is_owner_or_admin(identity, "someone") and may(identity, Operation.TRANSFER)


@pytest.mark.parametrize(
    ("host", "enabled", "insecure", "refused"),
    [
        ("127.0.0.1", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
        ("0.0.0.0", False, False, True),
        ("10.1.2.3", False, False, True),
        ("0.0.0.0", False, True, False),
        ("0.0.0.0", True, False, False),
    ],
)
def test_serving_beyond_loopback_without_a_key_is_refused_unless_insecure(
    host: str, enabled: bool, insecure: bool, refused: bool, key_file: Path
) -> None:
    settings = AuthSettings(public_key_paths=(key_file,)) if enabled else AuthSettings()
    reason = refuse_unauthenticated_bind(host, settings, insecure_no_auth=insecure)
    assert (reason is not None) == refused
    assert reason is None or "--insecure-no-auth" in reason


# --- authorization policy -------------------------------------------------------------------------

ALL = frozenset(Operation)
WRITER = {Operation.CREATE, Operation.APPEND, Operation.READ, Operation.TERMINATE, Operation.DELETE}


def who(role: str | None = None, scopes: set[str] | None = None, subject: str = "u1") -> Identity:
    return Identity(subject=subject, kind="admin_user", role=role, name=subject, scopes=frozenset(scopes or ()))


@pytest.mark.parametrize(
    ("role", "scopes", "operations"),
    [
        ("ADMIN", None, ALL),
        ("USER", None, WRITER),
        ("AUDITOR", None, {Operation.READ, Operation.AUDIT, Operation.METRICS}),
        ("READONLY", None, {Operation.READ}),
        ("SUPERUSER", None, {Operation.READ}),
        (None, None, {Operation.READ}),
        (None, {"files:write"}, {Operation.READ, Operation.CREATE, Operation.APPEND, Operation.TERMINATE}),
        (None, {"files:delete"}, {Operation.READ, Operation.DELETE}),
        (None, {"files:transfer"}, {Operation.READ, Operation.TRANSFER}),
        (None, {"files:everything", "admin"}, {Operation.READ}),
        (None, {"metrics:read"}, {Operation.READ, Operation.METRICS}),
        ("READONLY", {"files:write"}, {Operation.READ, Operation.CREATE, Operation.APPEND, Operation.TERMINATE}),
    ],
    ids=[
        "admin", "user", "auditor", "readonly", "unknown-role", "no-role", "write-scope", "delete-scope",
        "transfer-scope", "unknown-scopes", "metrics-scope", "readonly-plus-write-scope",
    ],
)  # fmt: skip
def test_roles_and_scopes_map_to_operations(
    role: str | None, scopes: set[str] | None, operations: set[Operation]
) -> None:
    assert allowed_operations(who(role, scopes)) == operations


def test_only_the_owner_or_an_admin_may_touch_an_upload() -> None:
    owner, stranger, admin = who("USER", subject="alice"), who("USER", subject="bob"), who("ADMIN", subject="root")
    assert is_owner_or_admin(owner, "alice")
    assert not is_owner_or_admin(stranger, "alice")
    assert is_owner_or_admin(admin, "alice")
    assert not is_owner_or_admin(owner, None) and is_owner_or_admin(admin, None)


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("jwt_public_key_path", "/nonexistent/key.pem", "JWT_PUBLIC_KEY_PATH"),
        ("jwt_jwks_url", "ftp://keys.example/jwks", "JWT_JWKS_URL"),
        ("jwt_secret", "short", "JWT_SECRET"),
        ("jwt_leeway_seconds", -1, "JWT_LEEWAY_SECONDS"),
        ("jwt_leeway_seconds", 3600, "JWT_LEEWAY_SECONDS"),
        ("jwt_jwks_refetch_min_seconds", 0, "JWT_JWKS_REFETCH_MIN_SECONDS"),
        ("jwt_jwks_ca_bundle", "/nonexistent/ca.pem", "JWT_JWKS_CA_BUNDLE"),
        ("metrics_auth", "maybe", "METRICS_AUTH"),
    ],
)
def test_a_bad_auth_value_is_refused_naming_its_variable(name: str, value: object, said: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(**{name: value})
    assert said in str(refused.value)


def test_the_secret_never_shows_in_the_settings_repr_nor_in_an_error() -> None:
    settings = load_settings(jwt_secret=keys.DEV_SECRET)
    assert keys.DEV_SECRET not in repr(settings) and keys.DEV_SECRET not in str(settings)
    assert keys.DEV_SECRET not in repr(AuthSettings(secret=keys.DEV_SECRET))
    with pytest.raises(SettingsError) as refused:
        load_settings(jwt_secret="too-short-secret")
    assert "too-short-secret" not in str(refused.value)


def test_key_paths_are_read_from_comma_separated_text(tmp_path: Path) -> None:
    first = keys.write_pem(tmp_path / "a.pem", keys.rsa_key())
    second = keys.write_pem(tmp_path / "b.pem", keys.ec_key())
    settings = load_settings(jwt_public_key_path=f"{first}, {second}")
    assert settings.jwt_public_key_path == (str(first), str(second))
    assert settings.jwt_secret is None and settings.metrics_auth is None
