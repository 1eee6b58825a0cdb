"""tus-js-client (the reference JavaScript client, in Node) end to end against a live server.

Each test runs ``tests/e2e/js/upload.mjs`` as a child process (asyncio subprocess, so the
in-process server keeps serving) and checks what the server staged, byte for byte. Node and the
npm packages are part of the test environment (``npm ci`` in tests/e2e/js, done by .ci/run):
when they are missing the tests fail, they are not skipped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.server import TUS, LiveServer, upload_bytes
from tusingest.sessions import UploadState
from tusingest.sessions.model import Upload

JS_DIR = Path(__file__).parent / "js"
SCRIPT = JS_DIR / "upload.mjs"
RUN_TIMEOUT = 20.0
MIB = 1 << 20


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: tus-js-client tests need Node >= 18 (apt-get install nodejs npm)")
    if not (JS_DIR / "node_modules" / "tus-js-client" / "package.json").is_file():
        pytest.fail(f"tus-js-client is not installed: run `npm ci` in {JS_DIR}")
    return node


async def tus_js(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one tus-js-client upload and return its JSON result line."""
    process = await asyncio.create_subprocess_exec(
        node_executable(),
        str(SCRIPT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=JS_DIR,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(spec).encode()), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"tus-js-client did not finish within {RUN_TIMEOUT} s: {spec}")
    lines = stdout.decode().strip().splitlines()
    if not lines:
        pytest.fail(f"upload.mjs printed nothing (exit {process.returncode}); stderr:\n{stderr.decode()}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["exitCode"] = process.returncode
    result["stderr"] = stderr.decode()
    return result


def failure(result: dict[str, Any]) -> str:
    """What went wrong, with the server's answers, for an assertion message."""
    shown = {key: result.get(key) for key in ("exitCode", "errors", "bytesUploaded", "url", "stderr")}
    return json.dumps(shown | {"requests": result.get("requests", [])[-8:]}, indent=1)


def write_payload(tmp_path: Path, size: int, name: str = "scan.bin") -> tuple[Path, bytes]:
    payload = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(payload)
    return path, payload


def upload_id_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


async def content(server: LiveServer, upload: Upload) -> bytes:
    """The upload's bytes: the stored file once finalised, else what is staged."""
    return await upload_bytes(server, upload.id)


def all_uploads(server: LiveServer) -> list[tuple[str, str, str]]:
    """Every row of the SQLite session store: (id, kind, state)."""
    path = server.settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return [(str(i), str(k), str(s)) for i, k, s in db.execute("SELECT id, kind, state FROM uploads")]


async def test_tus_js_client_uploads_a_file_in_chunks_with_metadata(sqlite_server: LiveServer, tmp_path: Path) -> None:
    server = sqlite_server
    path, payload = write_payload(tmp_path, 3 * MIB + 4099)

    result = await tus_js(
        {
            "endpoint": server.files_url,
            "file": str(path),
            "chunkSize": MIB,
            "metadata": {"filename": "scan 01.tiff", "filetype": "image/tiff"},
        }
    )

    assert result["ok"] and result["exitCode"] == 0, failure(result)
    assert result["bytesUploaded"] == result["bytesTotal"] == len(payload)
    patches = [r for r in result["requests"] if r["method"] == "PATCH"]
    assert [r["status"] for r in patches] == [204] * 4, failure(result)
    assert [int(r["uploadOffset"]) for r in patches] == [MIB, 2 * MIB, 3 * MIB, len(payload)]
    upload = await server.parts.store.get(upload_id_of(result["url"]))
    assert upload is not None and upload.state is UploadState.COMPLETE
    assert await content(server, upload) == payload
    async with server.client() as client:
        head = await client.head(result["url"], headers=TUS)
    pairs = dict(item.split(" ") for item in head.headers["Upload-Metadata"].split(","))
    assert base64.b64decode(pairs["filename"]) == b"scan 01.tiff"
    assert base64.b64decode(pairs["filetype"]) == b"image/tiff"
    # The upload became a file in the default directory element: object, attr.json, registry row.
    record = await server.parts.saga_store.file_for_upload(upload.id)
    assert record is not None and record.original_filename == "scan 01.tiff"
    assert head.headers["ArtStore-File-Id"] == record.file_id
    element = Path(server.settings.default_element_dir)
    assert (element / record.storage_key).read_bytes() == payload
    attr = json.loads((element / (record.storage_key + ".attr.json")).read_bytes())
    assert attr["sha256"] == record.sha256 == hashlib.sha256(payload).hexdigest()


async def test_tus_js_client_uploads_with_a_bearer_token_in_its_headers(
    keyed_server: LiveServer, tmp_path: Path
) -> None:
    from tests.fixtures.jwt import rsa_key, token

    server = keyed_server
    path, payload = write_payload(tmp_path, 2 * MIB + 11)
    authorization = f"Bearer {token(rsa_key(), sub='js-user', name='Jay', role='USER')}"

    result = await tus_js(
        {
            "endpoint": server.files_url,
            "file": str(path),
            "chunkSize": MIB,
            "metadata": {"filename": "scan.bin"},
            "headers": {"Authorization": authorization},
        }
    )

    assert result["ok"] and result["exitCode"] == 0, failure(result)
    upload = await server.parts.store.get(upload_id_of(result["url"]))
    assert upload is not None and upload.state is UploadState.COMPLETE and upload.owner_id == "js-user"
    assert await content(server, upload) == payload
    record = await server.parts.saga_store.file_for_upload(upload.id)
    assert record is not None and (record.created_by_id, record.created_by_username) == ("js-user", "Jay")
    # Without the token the same client is refused at its creation.
    refused = await tus_js({"endpoint": server.files_url, "file": str(path), "retryDelays": []})
    assert not refused["ok"] and [r["status"] for r in refused["requests"]] == [401], failure(refused)


@pytest.mark.parametrize("resume_by", ["uploadUrl", "findPreviousUploads"])
async def test_tus_js_client_resumes_an_aborted_upload_from_the_server_offset(
    sqlite_server: LiveServer, tmp_path: Path, resume_by: str
) -> None:
    server = sqlite_server
    path, payload = write_payload(tmp_path, 3 * MIB + 123)
    url_storage = str(tmp_path / "tus-urls.json")
    # 512 KiB chunks, abort from onProgress once 1.25 MiB were sent: the first two PATCHes were
    # answered 204 before the third began, so at least 1 MiB is committed, whatever became of the
    # third (on loopback it has usually been answered too by the time onProgress fires).
    spec = {
        "endpoint": server.files_url,
        "file": str(path),
        "chunkSize": 512 << 10,
        "urlStorage": url_storage,
        "metadata": {"filename": "resume.bin"},
    }

    first = await tus_js(spec | {"abortAfterBytes": MIB + (256 << 10)})
    assert first["aborted"] and not first["ok"] and first["exitCode"] == 0, failure(first)
    url = first["url"]
    assert url and url.startswith(server.files_url), failure(first)
    async with server.client() as client:
        head = await client.head(url, headers=TUS)
    assert head.status_code == 200, head.text
    offset = int(head.headers["Upload-Offset"])
    assert MIB <= offset < len(payload)

    resume = {"uploadUrl": url} if resume_by == "uploadUrl" else {"findPreviousUploads": True}
    second = await tus_js(spec | resume)

    assert second["ok"] and second["exitCode"] == 0, failure(second)
    if resume_by == "findPreviousUploads":
        assert second["previousUploads"] == 1, failure(second)
    assert second["url"] == url
    assert not [r for r in second["requests"] if r["method"] == "POST"], "resuming must not create an upload"
    assert second["requests"][0]["method"] == "HEAD" and second["resumedFrom"] == offset, failure(second)
    first_patch = next(r for r in second["requests"] if r["method"] == "PATCH")
    assert int(first_patch["requestOffset"]) == offset
    upload = await server.parts.store.get(upload_id_of(url))
    assert upload is not None and upload.state is UploadState.COMPLETE
    assert await content(server, upload) == payload
    assert all_uploads(server) == [(upload.id, "single", "complete")]


async def test_tus_js_client_parallel_uploads_concatenate_into_one_final_upload(
    sqlite_server: LiveServer, tmp_path: Path
) -> None:
    server = sqlite_server
    path, payload = write_payload(tmp_path, 3 * MIB + 1001)

    result = await tus_js(
        {
            "endpoint": server.files_url,
            "file": str(path),
            "parallelUploads": 3,
            "chunkSize": 512 << 10,
            "metadata": {"filename": "parallel.bin", "filetype": "application/octet-stream"},
        }
    )

    assert result["ok"] and result["exitCode"] == 0, failure(result)
    posts = [r for r in result["requests"] if r["method"] == "POST"]
    assert sorted(r["requestConcat"].split(";")[0] for r in posts) == ["final", "partial", "partial", "partial"]
    final = await server.parts.store.get(upload_id_of(result["url"]))
    assert final is not None, failure(result)
    assert final.kind.value == "final" and final.state is UploadState.COMPLETE
    assert len(final.parts) == 3 and final.length == len(payload)
    partials = await server.parts.store.get_many(list(final.parts))
    assert sorted(p.kind.value for p in partials.values()) == ["partial"] * 3
    assert all(p.is_complete for p in partials.values())
    assert sum(p.length or 0 for p in partials.values()) == len(payload)

    assert await content(server, final) == payload

    rows = all_uploads(server)
    assert [row for row in rows if row[1] == "final"] == [(final.id, "final", "complete")]
    assert sorted(row[0] for row in rows if row[1] == "partial") == sorted(final.parts)
    assert len(rows) == 4, rows
    async with server.client() as client:
        head = await client.head(result["url"], headers=TUS)
    assert head.status_code == 200 and int(head.headers["Upload-Offset"]) == len(payload)
    assert head.headers["Upload-Concat"].startswith("final;")


async def test_tus_js_client_against_tusingest_serve_on_embedded_defaults_ends_as_a_registered_file(
    tmp_path: Path,
) -> None:
    from tests.e2e.test_serve_cli import clean_env, free_port, running

    workdir = tmp_path / "node"
    workdir.mkdir()
    path, payload = write_payload(tmp_path, 2 * MIB + 77, name="Annual Report 2026.pdf")
    port = free_port()
    async with running(workdir, clean_env(), port):
        result = await tus_js(
            {
                "endpoint": f"http://127.0.0.1:{port}/files/",
                "file": str(path),
                "chunkSize": MIB,
                "metadata": {"filename": "Annual Report 2026.pdf", "username": "carol"},
            }
        )
    assert result["ok"] and result["exitCode"] == 0, failure(result)
    upload_id = upload_id_of(result["url"])
    element = workdir / "data" / "elements" / "local"
    stored = sorted(p for p in element.rglob("*") if p.is_file())
    assert [p.name.endswith(".attr.json") for p in stored] == [False, True]
    assert stored[0].read_bytes() == payload
    assert stored[0].name.startswith("Annual_Report_2026_carol_") and stored[0].suffix == ".pdf"
    attr = json.loads(stored[1].read_bytes())
    assert attr["original_filename"] == "Annual Report 2026.pdf" and attr["file_size"] == len(payload)
    with sqlite3.connect(workdir / "data" / "tusingest.db") as db:
        rows = db.execute("SELECT file_id, sha256 FROM files WHERE upload_id = ?", (upload_id,)).fetchall()
    assert rows == [(attr["file_id"], hashlib.sha256(payload).hexdigest())]
