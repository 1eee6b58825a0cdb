"""Idempotency-Key on creation (draft-ietf-httpapi-idempotency-key-header; issue 17): a creation sent
again with the same key by the same caller gets the first upload back, also on another node; a key
reused for a different creation gets 422, one whose first request still runs gets 409.

Raw HTTP where the answer to a half-sent request matters; every store-bound test runs on SQLite and
PostgreSQL; the cross-node ones run two servers on one PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.jwt import rsa_key, token, write_pem
from tests.fixtures.rawhttp import eventually, open_request
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, _server_factory, upload_bytes

DRAFT = {"Upload-Draft-Interop-Version": "8"}
KEY = '"8e03978e-40d5-43e8-bc93-6894a57f9324"'


def keyed(key: str = KEY, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key} | headers


async def tus_create(client: httpx.AsyncClient, length: int, body: bytes = b"", **headers: str) -> httpx.Response:
    h = TUS | {"Upload-Length": str(length)} | ({"Content-Type": OCTETS} if body else {}) | headers
    return await client.post("/files/", headers=h, content=body)


async def upload_count(server: LiveServer) -> int:
    """How many uploads were created: the audit log records each in the creation's transaction."""
    from datetime import timedelta

    from tusingest.sessions.audit import Action
    from tusingest.sessions.model import utcnow

    events = await server.parts.store.list_audit(utcnow() - timedelta(hours=1))
    return sum(event.action == Action.UPLOAD_CREATED for event in events)


async def staging_count(server: LiveServer) -> int:
    return len(await server.parts.staging.list_upload_ids())


async def test_a_tus_creation_repeated_with_its_key_gets_the_first_upload(server: LiveServer) -> None:
    async with server.client() as client:
        first = await tus_create(client, 10, **keyed())
        again = await tus_create(client, 10, **keyed())
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Upload-Offset"] == "0"
    assert "Upload-Expires" in again.headers


async def test_a_repeated_creation_with_upload_appends_nothing_and_answers_the_stored_offset(
    server: LiveServer,
) -> None:
    async with server.client() as client:
        first = await tus_create(client, 10, b"hello", **keyed())
        again = await tus_create(client, 10, b"hello", **keyed())
    assert again.headers["Location"] == first.headers["Location"]
    assert (first.headers["Upload-Offset"], again.headers["Upload-Offset"]) == ("5", "5")
    upload_id = first.headers["Location"].rsplit("/", 1)[1]
    assert await upload_bytes(server, upload_id) == b"hello"
    assert await upload_count(server) == 1


async def test_a_draft_creation_repeated_with_its_key_gets_the_first_upload(server: LiveServer) -> None:
    h = DRAFT | keyed(**{"Upload-Complete": "?0", "Upload-Length": "8"})
    async with server.client() as client:
        first = await client.post("/files/", headers=h, content=b"abc")
        again = await client.post("/files/", headers=h, content=b"abc")
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Upload-Offset"] == "3"
    assert "Upload-Limit" in again.headers
    assert await upload_count(server) == 1


async def test_a_key_reused_with_a_different_length_gets_422_and_creates_nothing(server: LiveServer) -> None:
    async with server.client() as client:
        await tus_create(client, 10, **keyed())
        other_length = await tus_create(client, 11, **keyed())
        other_body = await tus_create(client, 10, b"hello!", **keyed())
    for refused in (other_length, other_body):
        assert refused.status_code == 422
        assert refused.headers["Content-Type"] == "application/problem+json"
    assert await upload_count(server) == 1


async def test_different_keys_make_different_uploads(server: LiveServer) -> None:
    async with server.client() as client:
        first = await tus_create(client, 10, **keyed('"one"'))
        second = await tus_create(client, 10, **keyed('"two"'))
        unkeyed = [await tus_create(client, 10) for _ in range(2)]
    locations = {first.headers["Location"], second.headers["Location"]} | {r.headers["Location"] for r in unkeyed}
    assert len(locations) == 4


@pytest.mark.parametrize("value", ["8e03978e", '""', '"unterminated', '"a\\nb"', '"caf\u00e9"', '"' + "k" * 256 + '"'])
async def test_a_malformed_key_gets_400_and_creates_nothing(server: LiveServer, value: str) -> None:
    async with server.client() as client:
        headers: dict[str, str | bytes] = TUS | {"Upload-Length": "10", "Idempotency-Key": value.encode()}
        response = await client.post("/files/", headers=headers)
    assert response.status_code == 400, response.text
    assert await upload_count(server) == 0


async def test_a_key_with_escapes_and_parameters_is_one_key(server: LiveServer) -> None:
    async with server.client() as client:
        first = await tus_create(client, 10, **keyed('"a\\"b\\\\c"'))
        again = await tus_create(client, 10, **keyed('"a\\"b\\\\c";p=1'))
    assert again.headers["Location"] == first.headers["Location"]


async def test_a_key_whose_upload_was_terminated_makes_a_new_upload(server: LiveServer) -> None:
    async with server.client() as client:
        first = await tus_create(client, 10, **keyed())
        assert (await client.delete(first.headers["Location"], headers=TUS)).status_code == 204
        again = await tus_create(client, 10, **keyed())
    assert again.status_code == 201
    assert again.headers["Location"] != first.headers["Location"]


async def test_expired_keys_are_forgotten_by_the_expiry_sweep(server: LiveServer) -> None:
    from datetime import timedelta

    from tusingest.sessions.expiry import expire_uploads
    from tusingest.sessions.model import utcnow

    async with server.client() as client:
        await tus_create(client, 10, **keyed())
    parts = server.parts
    assert await parts.store.forget_expired_idempotency_keys(utcnow()) == 0  # still valid: kept
    later = utcnow() + timedelta(hours=25)  # past UPLOAD_SESSION_TTL_HOURS (24 in the tests)

    await expire_uploads(parts.store, parts.staging, parts.locker, later)

    assert await parts.store.forget_expired_idempotency_keys(later) == 0  # the sweep deleted it


@contextlib.asynccontextmanager
async def stalled_creation(server: LiveServer, headers: dict[str, str]) -> AsyncIterator[asyncio.StreamReader]:
    """A keyed creation-with-upload that sends 3 of its 10 bytes and goes quiet, its key claimed."""
    h = TUS | {"Upload-Length": "10", "Content-Type": OCTETS, "Content-Length": "10"} | headers
    reader, writer = await open_request(server.files_url, "POST", h)
    try:
        writer.write(b"abc")
        await writer.drain()

        async def staged() -> int:  # the body is staged only once the key is claimed
            return await staging_count(server)

        await eventually(staged, bool)
        yield reader
    finally:
        writer.close()


async def test_a_repeat_while_the_first_request_runs_gets_409(server: LiveServer) -> None:
    async with stalled_creation(server, keyed()), server.client() as client:
        repeat = await tus_create(client, 10, b"abcdefghij", **keyed())
    assert repeat.status_code == 409, repeat.text
    assert repeat.headers["Content-Type"] == "application/problem+json"


# -- across nodes: two servers on one PostgreSQL ----------------------------------------------------


@pytest.fixture
async def start_node(tmp_path: Path, postgres_url: str) -> AsyncIterator[ServerFactory]:
    async with _server_factory(tmp_path, postgres_url) as factory:
        yield factory


async def test_a_creation_retried_on_another_node_gets_the_same_upload(start_node: ServerFactory) -> None:
    a, b = await start_node(), await start_node()
    async with a.client() as client_a, b.client() as client_b:
        first = await tus_create(client_a, 10, b"hello", **keyed())
        again = await tus_create(client_b, 10, b"hello", **keyed())
        other_length = await tus_create(client_b, 12, b"hello", **keyed())
        draft = DRAFT | keyed('"draft"', **{"Upload-Complete": "?0"})
        draft_first = await client_a.post("/files/", headers=draft, content=b"xy")
        draft_again = await client_b.post("/files/", headers=draft, content=b"xy")
    assert again.status_code == 201
    assert again.headers["Location"].rsplit("/", 1)[1] == first.headers["Location"].rsplit("/", 1)[1]
    assert again.headers["Upload-Offset"] == "5"
    assert other_length.status_code == 422
    assert draft_again.headers["Location"].rsplit("/", 1)[1] == draft_first.headers["Location"].rsplit("/", 1)[1]
    assert await upload_count(a) == 2  # one database for both nodes


async def test_a_repeat_on_another_node_while_the_first_runs_gets_409(start_node: ServerFactory) -> None:
    a, b = await start_node(), await start_node()
    async with stalled_creation(a, keyed()), b.client() as client_b:
        repeat = await tus_create(client_b, 10, b"abcdefghij", **keyed())
    assert repeat.status_code == 409, repeat.text


# -- per caller ---------------------------------------------------------------------------------------


async def test_the_same_key_from_different_subjects_makes_independent_uploads(tmp_path: Path, store_url: str) -> None:
    keys = write_pem(tmp_path / "jwt-public.pem", rsa_key())
    async with _server_factory(tmp_path, store_url) as factory:
        server = await factory(jwt_public_key_path=str(keys))
        ada, bob = ({"Authorization": f"Bearer {token(rsa_key(), sub=sub)}"} for sub in ("ada", "bob"))
        async with server.client() as client:
            by_ada = await tus_create(client, 10, **keyed(**ada))
            by_bob = await tus_create(client, 10, **keyed(**bob))
            ada_again = await tus_create(client, 10, **keyed(**ada))
            bob_sees_ada = await client.head(by_ada.headers["Location"], headers=TUS | bob)
    assert by_ada.headers["Location"] != by_bob.headers["Location"]
    assert ada_again.headers["Location"] == by_ada.headers["Location"]
    assert bob_sees_ada.status_code == 404


async def test_the_first_answer_was_lost_mid_body_and_the_retry_gets_the_upload_to_resume(server: LiveServer) -> None:
    """A client whose connection broke while sending: the retry learns the upload and its offset."""
    async with stalled_creation(server, keyed()):
        pass  # the connection breaks after 3 bytes: the server commits what it received

    async def retried() -> httpx.Response:
        async with server.client() as client:
            return await tus_create(client, 10, b"abcdefghij", **keyed())

    retry = await eventually(retried, lambda response: response.status_code == 201)
    assert retry.headers["Upload-Offset"] == "3"
    upload_id = retry.headers["Location"].rsplit("/", 1)[1]
    assert await upload_bytes(server, upload_id) == b"abc"
    assert await upload_count(server) == 1
