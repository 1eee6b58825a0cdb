"""Hostile file names and metadata at the edge: every name is stored under a safe name (bounded in
bytes for a file system and for S3 keys) or refused with 400 at creation; NUL and oversized
identity fields are refused before anything is created; and none of it ever counts against a
Storage Element (its breaker stays closed, the next plain upload succeeds)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.s3 import MOTO_CREDENTIALS, MotoServer, create_bucket, remove_bucket
from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory
from tusingest.elements.backend import ObjectRefused
from tusingest.elements.breaker import BreakerState
from tusingest.finalise.naming import (
    MAX_NAME_COMPONENT_BYTES,
    MAX_SIDECAR_BYTES,
    MAX_STORED_NAME,
    sidecar_key,
    sidecar_worst_case_size,
)
from tusingest.saga.records import FileRecord

PAYLOAD = b"hostile names, plain bytes\n" * 200

# Each is stored under a safe name; NUL is the one refused at creation (see the NUL tests).
STORED_CORPUS = [
    "東京都の書類" * 12 + ".txt",  # 72 CJK characters: 216 bytes of stem
    "Отчёт" * 21 + ".pdf",  # 105 Cyrillic characters: 210 bytes
    "😀🎉" * 35 + ".png",  # 70 emoji: 280 bytes
    "a" * 300 + ".txt",
    "line\r\nbreak\n.txt",
    "../x.txt",
    "..",
    "CON",
    "nul.txt",
    ".hidden",
    ".pdf",
    "C:\\Users\\me\\..\\scan.tiff",
    "trailing dots...",
    "\u202eexe.txt",
]


def encode_metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items())


@pytest.fixture
def s3_element(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    bucket = create_bucket(moto_server.url)
    monkeypatch.setenv("ELEMENT_SE_S3_AWS_ACCESS_KEY_ID", MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("ELEMENT_SE_S3_AWS_SECRET_ACCESS_KEY", MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    try:
        yield {
            "element_id": "se-s3",
            "mode": "rw",
            "backend": "s3",
            "endpoint": moto_server.url,
            "bucket": bucket,
            "prefix": "files",
            "priority": 10,
        }
    finally:
        remove_bucket(moto_server.url, bucket)


def element_file(tmp_path: Path, element: dict[str, Any]) -> str:
    path = tmp_path / "elements.json"
    path.write_text(json.dumps({"version": 1, "storage_elements": [element]}))
    return str(path)


@pytest.fixture(params=["directory", "s3"])
def element(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "s3":
        s3: dict[str, Any] = request.getfixturevalue("s3_element")
        return s3
    return {"element_id": "se-dir", "mode": "rw", "backend": "directory", "path": str(tmp_path / "dir"), "priority": 10}


async def tus_upload(client: httpx.AsyncClient, payload: bytes, metadata: str) -> tuple[httpx.Response, str | None]:
    """Create and send the whole payload in one PATCH; the creation response when refused."""
    created = await client.post(
        "/files/", headers=TUS | {"Upload-Length": str(len(payload)), "Upload-Metadata": metadata}
    )
    if created.status_code != 201:
        return created, None
    url = created.headers["Location"]
    patched = await client.patch(url, headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS}, content=payload)
    return patched, url.rsplit("/", 1)[1]


async def stored_object(server: LiveServer, record: FileRecord, key: str) -> bytes:
    backend = server.parts.sagas.pool.backend(record.storage_element_id)
    return b"".join([chunk async for chunk in backend.get(key)])


def assert_breaker_closed(server: LiveServer, element_id: str) -> None:
    breaker = server.parts.sagas.pool.state(element_id).breaker
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0, breaker.last_failure


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)  # names do not depend on the store
async def test_every_hostile_name_is_stored_under_a_safe_name_and_never_opens_the_breaker(
    tmp_path: Path, element: dict[str, Any], start_server: ServerFactory
) -> None:
    server = await start_server(service_discovery_fallback_config=element_file(tmp_path, element))
    async with server.client() as client:
        for name in STORED_CORPUS:
            response, upload_id = await tus_upload(client, PAYLOAD, encode_metadata(filename=name, username="alice"))
            assert response.status_code == 204, (name, response.status_code, response.text)
            assert response.headers["ArtStore-Upload-Status"] == "completed", name
            assert upload_id is not None
            record = await server.parts.saga_store.file_for_upload(upload_id)
            assert record is not None, name
            stored = record.storage_filename
            assert len(stored) <= MAX_STORED_NAME, name
            assert len((stored + ".attr.json").encode()) <= MAX_NAME_COMPONENT_BYTES, name
            assert len(sidecar_key(record.storage_key).encode()) <= 1024
            assert not stored.startswith(".") and not set(stored) & {"/", "\\", "\0", "\r", "\n"}, name
            assert record.original_filename == name
            assert await stored_object(server, record, record.storage_key) == PAYLOAD
            sidecar = json.loads(await stored_object(server, record, sidecar_key(record.storage_key)))
            assert sidecar["original_filename"] == name and sidecar["storage_filename"] == stored
            if element["backend"] == "directory":
                on_disk = Path(element["path"], *record.storage_key.split("/"))
                assert on_disk.is_file() and on_disk.with_name(stored + ".attr.json").is_file()
            assert_breaker_closed(server, element["element_id"])

        response, upload_id = await tus_upload(client, PAYLOAD, encode_metadata(filename="plain.txt"))
    assert response.status_code == 204 and response.headers["ArtStore-Upload-Status"] == "completed"
    assert await server.parts.saga_store.count_files() == len(STORED_CORPUS) + 1
    assert_breaker_closed(server, element["element_id"])


@pytest.mark.parametrize("key", ["filename", "description", "project"])
async def test_a_nul_in_a_metadata_value_is_refused_at_creation_and_nothing_is_created(
    server: LiveServer, key: str
) -> None:
    metadata = encode_metadata(**({"filename": "ok.txt"} | {key: "before\0after"}))
    async with server.client() as client:
        refused = await client.post("/files/", headers=TUS | {"Upload-Length": "10", "Upload-Metadata": metadata})
        later = datetime.now(UTC) + timedelta(days=3650)
        assert await server.parts.store.list_expired(later) == []
        accepted = await client.post(
            "/files/", headers=TUS | {"Upload-Length": "10", "Upload-Metadata": encode_metadata(filename="ok.txt")}
        )
    assert refused.status_code == 400
    assert "NUL" in refused.text and repr(key) in refused.text
    assert refused.headers["ArtStore-Error"] == "invalid_metadata"
    assert accepted.status_code == 201
    assert len(await server.parts.store.list_expired(later)) == 1  # the query does see created uploads


async def test_a_nul_in_creation_with_upload_is_refused_before_the_body_is_staged(
    sqlite_server: LiveServer, tmp_path: Path
) -> None:
    headers = TUS | {
        "Upload-Length": str(len(PAYLOAD)),
        "Upload-Metadata": encode_metadata(filename="a\0b.txt"),
        "Content-Type": OCTETS,
    }
    async with sqlite_server.client() as client:
        refused = await client.post("/files/", headers=headers, content=PAYLOAD)
    assert refused.status_code == 400
    staging = tmp_path / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert await sqlite_server.parts.saga_store.count_files() == 0


async def test_binary_metadata_values_are_kept_out_of_the_text_metadata_not_refused(
    sqlite_server: LiveServer,
) -> None:
    # Not UTF-8 (an encoded lone surrogate, then a stray continuation byte): binary, left out.
    binary = base64.b64encode(b"\xed\xa0\x80\x80").decode()
    metadata = encode_metadata(filename="bin.txt") + f",blob {binary}"
    async with sqlite_server.client() as client:
        response, upload_id = await tus_upload(client, PAYLOAD, metadata)
    assert response.status_code == 204 and upload_id is not None
    record = await sqlite_server.parts.saga_store.file_for_upload(upload_id)
    assert record is not None and "blob" not in record.metadata and record.metadata["filename"] == "bin.txt"


@pytest.mark.parametrize(
    ("field", "size"),
    [("username", 4096), ("user_id", 4096), ("username", 65), ("user_id", 129)],
)
async def test_an_oversized_identity_field_is_refused_at_creation(
    sqlite_server: LiveServer, field: str, size: int
) -> None:
    metadata = encode_metadata(**{"filename": "id.txt", field: "x" * size})
    async with sqlite_server.client() as client:
        refused = await client.post("/files/", headers=TUS | {"Upload-Length": "10", "Upload-Metadata": metadata})
    assert refused.status_code == 400 and field in refused.text
    assert refused.headers["ArtStore-Error"] == "invalid_metadata"


def largest_admissible_description(filename: str, username: str, user_id: str) -> int:
    """The longest description whose worst-case attr.json still fits 4 KiB."""
    fixed = {"filename": filename, "username": username, "user_id": user_id}
    size = 0
    while True:
        metadata = fixed | {"description": "d" * (size + 1)}
        worst = sidecar_worst_case_size(
            original_filename=filename, username=username, user_id=user_id, metadata=metadata
        )
        if worst > MAX_SIDECAR_BYTES:
            return size
        size += 1


async def test_metadata_at_the_limit_is_stored_whole_and_one_byte_more_is_refused(
    sqlite_server: LiveServer,
) -> None:
    filename, username, user_id = "Отчёт" * 20 + ".pdf", "ü" * 64, "i" * 128
    longest = largest_admissible_description(filename, username, user_id)
    assert longest > 1000  # a generous room is left for user metadata
    base = {"filename": filename, "username": username, "user_id": user_id}
    async with sqlite_server.client() as client:
        response, upload_id = await tus_upload(client, PAYLOAD, encode_metadata(**base, description="d" * longest))
        refused = await client.post(
            "/files/",
            headers=TUS
            | {"Upload-Length": "10", "Upload-Metadata": encode_metadata(**base, description="d" * (longest + 1))},
        )
    assert response.status_code == 204, response.text
    assert upload_id is not None
    record = await sqlite_server.parts.saga_store.file_for_upload(upload_id)
    assert record is not None
    raw = await stored_object(sqlite_server, record, sidecar_key(record.storage_key))
    assert len(raw) <= MAX_SIDECAR_BYTES
    sidecar = json.loads(raw)
    assert sidecar["metadata"]["description"] == "d" * longest and "_truncated" not in sidecar["metadata"]
    assert sidecar["created_by"] == {"id": user_id, "username": username}
    assert refused.status_code == 400 and "description" in refused.text


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [
        ('{"description": "a\\u0000b"}', "NUL"),
        ('{"username": "' + "u" * 4096 + '"}', "username"),
        ('{"description": "\\ud800"}', "description"),
    ],
)
async def test_the_rest_facade_refuses_the_same_metadata_before_staging(
    sqlite_server: LiveServer, tmp_path: Path, metadata: str, needle: str
) -> None:
    async with sqlite_server.client() as client:
        response = await client.post(
            "/api/files/upload", files={"file": ("f.txt", PAYLOAD)}, data={"metadata": metadata}
        )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_metadata" and needle in body["message"]
    staging = tmp_path / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    later = datetime.now(UTC) + timedelta(days=3650)
    assert await sqlite_server.parts.store.list_expired(later) == []


async def test_an_ietf_draft_creation_still_works_through_the_creation_check(sqlite_server: LiveServer) -> None:
    headers = {"Upload-Draft-Interop-Version": "8", "Upload-Complete": "?1", "Content-Type": "application/octet-stream"}
    async with sqlite_server.client() as client:
        response = await client.post("/files/", headers=headers, content=os.urandom(1000))
    assert response.status_code == 201
    assert response.headers["ArtStore-Upload-Status"] == "completed"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_an_object_the_element_refuses_fails_the_upload_with_422_without_failover(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    # A real element cannot be made to refuse a sanitised name here (it would need a file system
    # with a small NAME_MAX), so the first element's backend refuses names with a marker in them,
    # as a directory backend does on ENAMETOOLONG: everything else is the real server and saga.
    first = {"element_id": "se-a", "mode": "rw", "backend": "directory", "path": str(tmp_path / "a"), "priority": 1}
    second = {"element_id": "se-b", "mode": "rw", "backend": "directory", "path": str(tmp_path / "b"), "priority": 2}
    path = tmp_path / "two-elements.json"
    path.write_text(json.dumps({"version": 1, "storage_elements": [first, second]}))
    server = await start_server(service_discovery_fallback_config=str(path))
    pool = server.parts.sagas.pool
    backend = pool.backend("se-a")
    real_put = backend.put

    async def put(key: str, chunks: Any, **options: Any) -> Any:
        if "refuse-me" in key:
            raise ObjectRefused(f"element se-a: put of {key!r} refused: File name too long", key=key)
        return await real_put(key, chunks, **options)

    backend.put = put  # type: ignore[method-assign]
    async with server.client() as client:
        refused, refused_id = await tus_upload(client, PAYLOAD, encode_metadata(filename="refuse-me.txt"))
        for _ in range(5):  # more than the breaker's threshold
            await tus_upload(client, PAYLOAD, encode_metadata(filename="refuse-me.txt"))
        plain, _ = await tus_upload(client, PAYLOAD, encode_metadata(filename="plain.txt"))
    assert refused.status_code == 422 and refused.headers["ArtStore-Error"] == "object_refused"
    assert "File name too long" in refused.text
    assert refused_id is not None and await server.parts.saga_store.file_for_upload(refused_id) is None
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").rglob("*.txt"))  # no failover
    assert plain.status_code == 204 and plain.headers["ArtStore-Storage-Element-Id"] == "se-a"
    assert_breaker_closed(server, "se-a")
