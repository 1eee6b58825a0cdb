"""Authentication and ownership on a live server with a key file (JWT_PUBLIC_KEY_PATH): every tus and
/api route wants a good Bearer token, and an upload or a file is its owner's or an admin's only, so
another user's token gets 404 and changes nothing. Store-independent: run on SQLite."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.fixtures.jwt import rsa_key, token, unsigned_token, write_pem
from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tests.integration.test_delete import directory_element
from tests.integration.test_finalise import element_file, upload
from tusingest.sessions import UploadState

ALICE = {"sub": "alice", "name": "Alice", "role": "USER", "scope": "files:transfer"}
BOB = {"sub": "bob", "name": "Bob", "role": "USER", "scope": "files:transfer"}
ADMIN = {"sub": "root", "name": "Root", "role": "ADMIN"}


def bearer(**identity: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(rsa_key(), **identity)}"}


@pytest.fixture
def server(keyed_server: LiveServer) -> LiveServer:
    return keyed_server


def client(server: LiveServer, **identity: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=30, headers=bearer(**identity) if identity else None)


# -- 401 ------------------------------------------------------------------------------------------


BAD_TOKENS = {
    "missing": None,
    "malformed": "Bearer not.a.jwt",
    "expired": "Bearer " + token(rsa_key(), exp=1_000_000, iat=999_000, nbf=999_000),
    "another-key": "Bearer " + token(rsa_key("another"), **ALICE),
    "alg-none": "Bearer " + unsigned_token(**ALICE),
}


@pytest.mark.parametrize("authorization", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_a_tus_creation_without_a_good_token_is_refused_401_with_tus_and_cors_headers(
    server: LiveServer, authorization: str | None
) -> None:
    headers = TUS | {"Upload-Length": "5", "Origin": "https://app.example"}
    if authorization is not None:
        headers["Authorization"] = authorization
    async with server.client() as http:
        response = await http.post("/files/", headers=headers)
    assert response.status_code == 401, response.text
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="artstore"')
    assert ('error="invalid_token"' in challenge) is (authorization is not None)
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Location" not in response.headers
    assert not list((Path(server.settings.staging_dir)).glob("*"))  # nothing staged, no upload made


@pytest.mark.parametrize("authorization", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_an_api_request_without_a_good_token_is_refused_401_in_json(
    server: LiveServer, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with server.client() as http:
        response = await http.get("/api/files/upload/session/0123456789abcdef", headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="artstore"')
    body = response.json()
    assert body["error"] == "invalid_token" and body["message"]
    if authorization is not None:
        assert authorization.removeprefix("Bearer ") not in response.text  # the token is never echoed


async def test_health_openapi_and_cors_preflight_need_no_token(server: LiveServer) -> None:
    async with server.client() as http:
        assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/openapi.json")).status_code == 200
        preflight = await http.options(
            "/files/",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_readonly_token_may_not_create_and_gets_403_naming_the_scope(server: LiveServer) -> None:
    async with client(server, sub="reader", role="READONLY") as http:
        response = await http.post("/files/", headers=TUS | {"Upload-Length": "5"})
    assert response.status_code == 403, response.text
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert 'scope="files:write"' in response.headers["WWW-Authenticate"]


# -- ownership of uploads -------------------------------------------------------------------------


async def alices_half_upload(server: LiveServer) -> str:
    """Alice's upload of 10 bytes holding its first 5; returns its URL."""
    async with client(server, **ALICE) as http:
        created = await http.post(
            "/files/", headers=TUS | {"Upload-Length": "10", "Content-Type": OCTETS}, content=b"hello"
        )
    assert created.status_code == 201, created.text
    return created.headers["Location"]


async def state_of(server: LiveServer, url: str) -> tuple[int, UploadState]:
    upload = await server.parts.store.get(url.rsplit("/", 1)[1])
    assert upload is not None
    return upload.offset, upload.state


async def test_the_creator_is_recorded_as_the_owner_of_an_upload(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    upload = await server.parts.store.get(url.rsplit("/", 1)[1])
    assert upload is not None and (upload.owner_id, upload.owner_name) == ("alice", "Alice")


async def test_another_users_head_on_an_upload_is_404(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    async with client(server, **BOB) as http:
        response = await http.head(url, headers=TUS)
    assert response.status_code == 404
    assert "Upload-Metadata" not in response.headers and "Upload-Offset" not in response.headers


async def test_another_users_patch_is_404_and_writes_nothing(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    async with client(server, **BOB) as http:
        response = await http.patch(url, headers=TUS | {"Upload-Offset": "5", "Content-Type": OCTETS}, content=b"EVIL!")
    assert response.status_code == 404
    assert await state_of(server, url) == (5, UploadState.ACTIVE)


async def test_another_users_ietf_draft_append_is_404_and_writes_nothing(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    draft = {
        "Upload-Draft-Interop-Version": "8",
        "Upload-Offset": "5",
        "Upload-Complete": "?1",
        "Content-Type": "application/partial-upload",
    }
    async with client(server, **BOB) as http:
        response = await http.patch(url, headers=draft, content=b"EVIL!")
    assert response.status_code == 404
    assert await state_of(server, url) == (5, UploadState.ACTIVE)


async def test_another_users_delete_is_404_and_the_upload_lives_on(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    async with client(server, **BOB) as http:
        response = await http.delete(url, headers=TUS)
    assert response.status_code == 404
    assert await state_of(server, url) == (5, UploadState.ACTIVE)


async def test_another_users_session_status_is_404(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    session = url.rsplit("/", 1)[1]
    async with client(server, **BOB) as http:
        response = await http.get(f"/api/files/upload/session/{session}")
    assert response.status_code == 404 and response.json()["error"] == "session_not_found"
    async with client(server, **ALICE) as http:
        own = await http.get(f"/api/files/upload/session/{session}")
    assert own.status_code == 200 and own.json()["bytes_uploaded"] == 5


async def test_another_users_partial_cannot_be_concatenated(server: LiveServer) -> None:
    async with client(server, **ALICE) as http:
        partial = await http.post(
            "/files/",
            headers=TUS | {"Upload-Length": "5", "Upload-Concat": "partial", "Content-Type": OCTETS},
            content=b"hello",
        )
    assert partial.status_code == 201
    async with client(server, **BOB) as http:
        final = await http.post("/files/", headers=TUS | {"Upload-Concat": f"final;{partial.headers['Location']}"})
    # Answered as for an upload that does not exist: the same 400 tells nothing about alice's.
    assert final.status_code == 400 and "is not a known upload" in final.text
    async with client(server, **ALICE) as http:
        own = await http.post("/files/", headers=TUS | {"Upload-Concat": f"final;{partial.headers['Location']}"})
    assert own.status_code == 201, own.text


async def test_another_users_facade_resume_of_a_session_is_404_and_writes_nothing(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    session = url.rsplit("/", 1)[1]
    async with client(server, **BOB) as http:
        response = await http.post(
            "/api/files/upload",
            headers={"X-Upload-Session-ID": session, "Content-Range": "bytes 5-9/10"},
            files={"file": ("x.bin", b"EVIL!", "application/octet-stream")},
        )
    assert response.status_code == 404, response.text
    assert await state_of(server, url) == (5, UploadState.ACTIVE)


async def test_an_admin_may_head_patch_and_read_anyones_upload(server: LiveServer) -> None:
    url = await alices_half_upload(server)
    async with client(server, **ADMIN) as http:
        head = await http.head(url, headers=TUS)
        session = await http.get(f"/api/files/upload/session/{url.rsplit('/', 1)[1]}")
        patch = await http.patch(url, headers=TUS | {"Upload-Offset": "5", "Content-Type": OCTETS}, content=b"world")
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "5"
    assert session.status_code == 200
    assert patch.status_code == 204 and patch.headers["Upload-Offset"] == "10"


# -- ownership of files ---------------------------------------------------------------------------


async def alices_file(server: LiveServer) -> str:
    """A file alice uploaded over tus, with metadata claiming somebody else made it; returns its id."""
    async with client(server, **ALICE) as http:
        _, last = await upload(http, b"alice's report", "report.txt", username="mallory", user_id="mallory")
    assert last.status_code == 204 and last.headers["ArtStore-Upload-Status"] == "completed", last.headers
    return last.headers["ArtStore-File-Id"]


async def test_a_file_is_registered_as_created_by_the_token_not_the_metadata(server: LiveServer) -> None:
    record = await server.parts.saga_store.get_file(await alices_file(server))
    assert record is not None
    assert (record.created_by_id, record.created_by_username) == ("alice", "Alice")
    assert "_Alice_" in record.storage_filename and "mallory" not in record.storage_filename


async def test_another_users_delete_of_a_file_is_404_and_the_file_stays(server: LiveServer) -> None:
    file_id = await alices_file(server)
    async with client(server, **BOB) as http:
        response = await http.delete(f"/api/files/{file_id}")
    assert response.status_code == 404 and response.json()["error"] == "file_not_found"
    assert await server.parts.saga_store.get_file(file_id) is not None
    assert await server.parts.saga_store.latest_saga("delete", file_id) is None


async def test_another_users_transfer_of_a_file_is_404_and_starts_nothing(server: LiveServer) -> None:
    file_id = await alices_file(server)
    body = {"destination_storage_element_id": "elsewhere"}
    async with client(server, **BOB) as http:
        refused = await http.post(f"/api/files/{file_id}/transfer", json=body)
    assert refused.status_code == 404 and refused.json()["error"] == "file_not_found"
    assert await server.parts.saga_store.latest_saga("transfer", file_id) is None
    async with client(server, **ALICE) as http:
        own = await http.post(f"/api/files/{file_id}/transfer", json=body)
    # The owner gets past the ownership check, to the next refusal: there is no such element.
    assert own.status_code == 400 and own.json()["error"] == "unknown_storage_element", own.text


async def test_another_users_transfer_status_is_404_and_the_owner_and_an_admin_see_it(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    elements = [
        directory_element(tmp_path, "se-1", "edit") | {"priority": 1},
        directory_element(tmp_path, "se-2", "edit"),
    ]
    server = await start_server(
        jwt_public_key_path=str(write_pem(tmp_path / "jwt-public.pem", rsa_key())),
        service_discovery_fallback_config=element_file(tmp_path, *elements),
    )
    file_id = await alices_file(server)
    async with client(server, **ALICE) as http:
        accepted = await http.post(f"/api/files/{file_id}/transfer", json={"destination_storage_element_id": "se-2"})
    assert accepted.status_code == 202, accepted.text
    status_url = f"/api/files/transfer/{accepted.json()['transfer_id']}"

    async with client(server, **BOB) as http:
        probed = await http.get(status_url)
    assert (probed.status_code, probed.json()["error"]) == (404, "transfer_not_found")
    async with client(server, **ALICE) as http:
        own = await eventually(lambda: http.get(status_url), lambda r: r.json().get("status") == "completed")
    assert own.status_code == 200
    async with client(server, **ADMIN) as http:
        seen = await http.get(status_url)
    assert seen.status_code == 200 and seen.json()["destination_storage_element_id"] == "se-2", seen.text


async def test_an_admin_may_delete_anyones_file_and_is_the_recorded_actor(server: LiveServer) -> None:
    file_id = await alices_file(server)
    async with client(server, **ADMIN) as http:
        response = await http.delete(f"/api/files/{file_id}", headers={"X-ArtStore-User": "mallory"})
    assert response.status_code == 204, response.text
    assert await server.parts.saga_store.get_file(file_id) is None
    saga = await server.parts.saga_store.latest_saga("delete", file_id)
    assert saga is not None and saga.data["actor"] == "root"


async def test_the_owner_may_delete_their_file(server: LiveServer) -> None:
    file_id = await alices_file(server)
    async with client(server, **ALICE) as http:
        response = await http.delete(f"/api/files/{file_id}")
    assert response.status_code == 204, response.text
    assert await server.parts.saga_store.get_file(file_id) is None


async def test_an_unreachable_key_set_answers_503_with_retry_after_not_401(tmp_path: Path, sqlite_url: str) -> None:
    import socket

    from tests.fixtures.server import base_settings, live_server

    with socket.socket() as closed:  # a loopback port nobody listens on: the JWKS endpoint is down
        closed.bind(("127.0.0.1", 0))
        jwks_url = f"http://127.0.0.1:{closed.getsockname()[1]}/jwks.json"
        settings = base_settings(tmp_path, sqlite_url, jwt_jwks_url=jwks_url)
        async with live_server(settings) as down, client(down, **ALICE) as http:
            tus = await http.post("/files/", headers=TUS | {"Upload-Length": "5"})
            api = await http.get("/api/files/upload/session/0123456789abcdef")
    assert tus.status_code == 503 and tus.headers["Retry-After"] and tus.headers["Tus-Resumable"] == "1.0.0"
    assert api.status_code == 503 and api.json()["error"] == "auth_unavailable"
