"""The browser upload console (/console) in a real browser: Debian's /usr/bin/chromium, headless,
driven by playwright (the Python package, no browser download) against a live server.

A 5 MiB file goes through the Dashboard with the upload throttled in the browser (DevTools network
conditions) so that pausing lands mid-upload; the page must show the file id the server's registry
holds. Another test serves a page from a second loopback origin and uploads with tus-js-client
through CORS. When chromium or playwright is missing the tests fail saying so; they are not skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.responses import FileResponse, HTMLResponse
from starlette.routing import Route

from tests.fixtures.jwt import rsa_key, token
from tests.fixtures.rawhttp import eventually
from tests.fixtures.relay import CountingProxy
from tests.fixtures.server import LiveServer, base_settings, live_server

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CONSOLE_DIR = Path(__file__).resolve().parents[2] / "tusingest" / "console"
TUS_JS = Path(__file__).parent / "js" / "node_modules" / "tus-js-client" / "dist" / "tus.min.js"
SCREENSHOT_DOC = Path(__file__).resolve().parents[2] / "docs" / "img" / "console.png"
MIB = 1 << 20
UI_TIMEOUT_MS = 30_000


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (it drives /usr/bin/chromium)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"chromium is not installed at {CHROMIUM}: apt-get install chromium (or set CHROMIUM=...)")
    async with async_playwright() as playwright:
        # As root in a container chromium's sandbox cannot start; the test pages are our own.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, chromium_sandbox=False)
        try:
            yield launched
        finally:
            await launched.close()


async def open_console(browser: Any, server: LiveServer, *, upload_bytes_per_second: int | None = None) -> Any:
    page = await browser.new_page(viewport={"width": 1200, "height": 1100})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.extend(unexpected(message)))
    page.problems = problems
    if upload_bytes_per_second is not None:
        devtools = await page.context.new_cdp_session(page)
        await devtools.send("Network.enable")
        conditions = {"offline": False, "latency": 0, "downloadThroughput": -1}
        conditions["uploadThroughput"] = upload_bytes_per_second
        await devtools.send("Network.emulateNetworkConditions", conditions)
    await page.goto(server.url + "/console")
    await page.wait_for_selector("#elements tbody tr", timeout=UI_TIMEOUT_MS)
    return page


def unexpected(message: Any) -> list[str]:
    """An error the console logged, except the 404 of the event stream, which it answers by polling."""
    if message.type != "error" or message.location.get("url", "").endswith("/events"):
        return []
    return [f"{message.text} ({message.location.get('url')})"]


async def add_file(page: Any, path: Path) -> None:
    # The Dashboard's own file input (the one without webkitdirectory; the other picks folders).
    await page.locator("input.uppy-Dashboard-input:not([webkitdirectory])").first.set_input_files(str(path))
    await page.wait_for_selector(f'#results tr[data-file="{path.name}"]', timeout=UI_TIMEOUT_MS)


async def start_upload(page: Any, path: Path) -> None:
    await add_file(page, path)
    await page.locator(".uppy-StatusBar-actionBtn--upload").click()


async def registered_row(page: Any, name: str) -> Any:
    row = page.locator(f'#results tr[data-file="{name}"][data-file-id]')
    await row.wait_for(timeout=UI_TIMEOUT_MS)
    return row


async def offset(server: LiveServer, upload_id: str) -> int:
    upload = await server.parts.store.get(upload_id)
    return -1 if upload is None else upload.offset


def payload(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def test_console_uploads_a_file_with_pause_and_resume_and_shows_the_registered_file(
    browser: Any, sqlite_server: LiveServer, tmp_path: Path
) -> None:
    server = sqlite_server
    source = tmp_path / "photo.bin"
    data = payload(source, 5 * MIB)
    page = await open_console(browser, server, upload_bytes_per_second=MIB)
    await start_upload(page, source)
    row = page.locator('#results tr[data-file="photo.bin"]')
    await page.locator('#results tr[data-file="photo.bin"][data-session]').wait_for(timeout=UI_TIMEOUT_MS)
    upload_id = await row.get_attribute("data-session")
    await page.locator('button[title="Pause upload"]').click()
    # Paused mid-file: the bytes the aborted PATCH delivered are committed, the rest not sent.
    paused_at = await eventually(lambda: offset(server, upload_id), lambda at: 0 < at < len(data), timeout=30)
    await page.locator('button[title="Resume upload"]').wait_for(timeout=UI_TIMEOUT_MS)
    await page.locator('#results tr[data-file="photo.bin"][data-stage="paused"]').wait_for(timeout=UI_TIMEOUT_MS)
    assert await offset(server, upload_id) < len(data)
    await page.locator('button[title="Resume upload"]').click()
    shown = await registered_row(page, "photo.bin")

    record = await server.parts.saga_store.file_for_upload(upload_id)
    assert record is not None
    assert await shown.get_attribute("data-file-id") == record.file_id
    cells = {name: await shown.locator(f'[data-field="{name}"]').inner_text() for name in ("sha256_hash", "file_id")}
    assert cells == {"sha256_hash": hashlib.sha256(data).hexdigest(), "file_id": record.file_id}
    assert await shown.locator('[data-field="storage_filename"]').inner_text() == record.storage_filename
    assert await shown.locator('[data-field="storage_element_id"]').inner_text() == record.storage_element_id
    assert record.sha256 == hashlib.sha256(data).hexdigest() and 0 < paused_at < len(data)
    elements = await page.locator("#elements tbody tr").all_inner_texts()
    assert any("local" in text and "closed" in text for text in elements), elements
    assert not page.problems, page.problems
    shot = tmp_path / "console.png"
    await page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("UPDATE_CONSOLE_SCREENSHOT"):  # refreshes docs/img/console.png, then commit it
        SCREENSHOT_DOC.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT_DOC)
    assert shot.stat().st_size > 10_000


async def test_console_retries_over_a_line_that_drops_every_mib_and_completes_the_same_upload(
    browser: Any, sqlite_server: LiveServer, tmp_path: Path
) -> None:
    server = sqlite_server
    source = tmp_path / "flaky.bin"
    data = payload(source, 5 * MIB)
    # The page and its uploads go through a relay that cuts every connection after 1 MiB from the browser.
    async with CountingProxy(int(server.url.rsplit(":", 1)[1]), drop_every=MIB).running("") as line:
        relayed = LiveServer(line.url, server.app, server.settings)
        page = await open_console(browser, relayed)
        await start_upload(page, source)
        shown = await registered_row(page, "flaky.bin")
        upload_id = await shown.get_attribute("data-session")
        file_id = await shown.get_attribute("data-file-id")
        await page.close()  # and with it the browser's keep-alive connections, which the relay waits for

    record = await server.parts.saga_store.file_for_upload(upload_id)
    assert record is not None and file_id == record.file_id
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    # 5 MiB through connections of at most 1 MiB: at least 4 drops, each retried by resuming the upload the
    # page first created (a fresh upload would have a session the registry does not know a file for).
    assert line.drops >= 4


async def test_console_uploads_a_folder_with_its_subfolders(
    browser: Any, sqlite_server: LiveServer, tmp_path: Path
) -> None:
    folder = tmp_path / "album"
    (folder / "day 2").mkdir(parents=True)
    contents = {
        "cover.txt": payload(folder / "cover.txt", 2000),
        "page.txt": payload(folder / "day 2" / "page.txt", 3000),
    }
    page = await open_console(browser, sqlite_server)
    await page.locator("input.uppy-Dashboard-input[webkitdirectory]").first.set_input_files(str(folder))
    for name in contents:
        await page.wait_for_selector(f'#results tr[data-file="{name}"]', timeout=UI_TIMEOUT_MS)

    await page.locator(".uppy-StatusBar-actionBtn--upload").click()
    for name, data in contents.items():
        shown = await registered_row(page, name)
        record = await sqlite_server.parts.saga_store.file_for_upload(await shown.get_attribute("data-session"))
        assert record is not None and record.sha256 == hashlib.sha256(data).hexdigest()
        assert record.original_filename == name
    names = await page.locator('#results [data-field="name"]').all_inner_texts()
    assert sorted(names) == ["album/cover.txt", "album/day 2/page.txt"]


async def test_console_elements_panel_shows_an_opened_breaker_after_a_refresh(
    browser: Any, sqlite_server: LiveServer
) -> None:
    page = await open_console(browser, sqlite_server)
    local = page.locator('#elements tr[data-element="local"]')
    assert (await local.locator("td").all_inner_texts())[1:3] == ["edit", "online"]
    breaker = sqlite_server.parts.elements.pool.state("local").breaker
    for _ in range(sqlite_server.settings.circuit_breaker_failure_threshold):
        breaker.record_failure("put failed: disk full")  # what failed puts on the element record

    await page.locator("#elements-refresh").click()

    await page.locator('#elements tr[data-element="local"] td.bad:text-is("open")').wait_for(timeout=UI_TIMEOUT_MS)


async def test_console_sends_the_token_field_as_bearer_to_a_keyed_server(
    browser: Any, keyed_server: LiveServer, tmp_path: Path
) -> None:
    source = tmp_path / "notes.txt"
    data = payload(source, 256 << 10)
    page = await open_console(browser, keyed_server)
    await page.fill("#token", token(rsa_key(), sub="console-user", name="Grace"))
    await start_upload(page, source)
    shown = await registered_row(page, "notes.txt")

    record = await keyed_server.parts.saga_store.file_for_upload(await shown.get_attribute("data-session"))
    assert record is not None and record.file_id == await shown.get_attribute("data-file-id")
    assert record.created_by_id == "console-user" and record.sha256 == hashlib.sha256(data).hexdigest()
    assert await page.evaluate("sessionStorage.getItem('tusingest.token')") == await page.input_value("#token")


async def test_console_without_a_token_on_a_keyed_server_shows_the_refusal(
    browser: Any, keyed_server: LiveServer, tmp_path: Path
) -> None:
    source = tmp_path / "refused.txt"
    payload(source, 1024)
    page = await open_console(browser, keyed_server)
    await start_upload(page, source)
    refused = page.locator('#results tr[data-file="refused.txt"][data-error="401"]')
    await refused.wait_for(timeout=UI_TIMEOUT_MS)

    assert "401" in await refused.locator('[data-field="stage"]').inner_text()
    assert await refused.get_attribute("data-session") is None  # nothing was created


EVENTS_ROUTE = "/api/files/upload/session/{session_id}/events"


def sse(event: str, body: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(body)}\n\n"


async def test_console_follows_the_event_stream_with_the_token_to_the_registered_file(
    browser: Any, keyed_server: LiveServer, tmp_path: Path
) -> None:
    """The page reads the session's event stream with fetch() and its token, and settles from its final
    `registered` event without polling. Until the events route exists on this branch (it is built in
    parallel, issue 14), a stand-in answers it in the route's contract, with the real registered file."""
    server = keyed_server
    bearer = token(rsa_key(), sub="stream-user")
    source = tmp_path / "streamed.bin"
    data = payload(source, 300 << 10)
    page = await open_console(browser, server)
    streamed: list[str] = []
    polled: list[str] = []
    page.on("request", lambda request: polled.append(request.url) if re.search(r"/session/\w+$", request.url) else None)
    if not any(getattr(route, "path", None) == EVENTS_ROUTE for route in server.app.routes):

        async def stand_in(route: Any) -> None:
            assert route.request.headers.get("authorization") == f"Bearer {bearer}"
            session_id = route.request.url.rsplit("/", 2)[-2]
            streamed.append(session_id)
            record = await eventually(lambda: server.parts.saga_store.file_for_upload(session_id), bool, timeout=30)
            async with server.client() as client:
                status = await client.get(
                    f"/api/files/upload/session/{session_id}", headers={"Authorization": f"Bearer {bearer}"}
                )
            file = status.json()["file"]
            assert file["file_id"] == record.file_id
            body = sse("progress", {"session_id": session_id, "bytes_uploaded": len(data), "bytes_total": len(data)})
            for stage in ("inspecting", "placing"):
                body += sse("stage", {"session_id": session_id, "stage": stage})
            body += ": a comment line, ignored\n\n" + sse("registered", file)
            await route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

        await page.route("**/api/files/upload/session/*/events", stand_in)
    await page.fill("#token", bearer)
    await start_upload(page, source)
    shown = await registered_row(page, "streamed.bin")

    session_id = await shown.get_attribute("data-session")
    record = await server.parts.saga_store.file_for_upload(session_id)
    assert record is not None and await shown.get_attribute("data-file-id") == record.file_id
    assert await shown.locator('[data-field="storage_filename"]').inner_text() == record.storage_filename
    assert streamed in ([session_id], [])  # the stand-in, when it was needed, served this session
    assert polled == [], "the page polled the session status although the event stream answered"


OTHER_ORIGIN_PAGE = """<!doctype html><meta charset="utf-8"><script src="/tus.min.js"></script>
<script>
window.upload = (endpoint, size) => new Promise((resolve, reject) => {
  const bytes = new Uint8Array(size)
  for (let at = 0; at < size; at += 65536) crypto.getRandomValues(bytes.subarray(at, at + 65536))
  const upload = new tus.Upload(new Blob([bytes]), {
    endpoint, chunkSize: 1048576, metadata: { filename: 'cors.bin' },
    onError: (error) => reject(String(error)),
    onSuccess: ({ lastResponse }) => resolve({ url: upload.url, fileId: lastResponse.getHeader('ArtStore-File-Id') }),
  })
  upload.start()
})
</script>"""


@asynccontextmanager
async def other_origin() -> AsyncIterator[str]:
    """A page on another loopback port, so another origin, that uploads with tus-js-client (browser build)."""
    if not TUS_JS.is_file():
        pytest.fail(f"tus-js-client is not installed: run `npm ci` in {TUS_JS.parents[2]}")

    async def index(request: Any) -> HTMLResponse:
        return HTMLResponse(OTHER_ORIGIN_PAGE)

    async def script(request: Any) -> FileResponse:
        return FileResponse(TUS_JS, media_type="text/javascript")

    app = Starlette(routes=[Route("/", index), Route("/tus.min.js", script)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        await task
        sock.detach()


async def test_a_page_from_another_origin_uploads_through_cors(browser: Any, tmp_path: Path, sqlite_url: str) -> None:
    size = 3 * MIB + 17
    async with other_origin() as origin:
        # The server allows exactly that origin (CORS_ALLOWED_ORIGINS), as a deployment would.
        settings = base_settings(tmp_path, sqlite_url, cors_allowed_origins=(origin,))
        async with live_server(settings) as server:
            page = await browser.new_page()
            await page.goto(origin + "/")
            result = await page.evaluate("([endpoint, size]) => upload(endpoint, size)", [server.files_url, size])
            async with httpx.AsyncClient() as client:
                preflight = await client.options(
                    server.files_url,
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": "PATCH",
                        "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type",
                    },
                )
            upload_id = result["url"].rstrip("/").rsplit("/", 1)[-1]
            record = await server.parts.saga_store.file_for_upload(upload_id)

    assert record is not None and record.size_bytes == size
    assert result["fileId"] == record.file_id  # an exposed header, readable across origins
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "PATCH" in preflight.headers["access-control-allow-methods"]
    assert "upload-offset" in preflight.headers["access-control-allow-headers"].lower()


def test_the_committed_console_build_is_what_the_lock_file_builds(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed: the console build check needs Node >= 18 with npm")
    if not (CONSOLE_DIR / "node_modules" / "esbuild").is_dir():
        pytest.fail(f"the console's npm packages are not installed: run `npm ci` in {CONSOLE_DIR}")
    subprocess.run(["node", "build.mjs", str(tmp_path)], cwd=CONSOLE_DIR, check=True, timeout=120)

    for name in ("console.js", "console.css"):
        built, committed = (tmp_path / name).read_bytes(), (CONSOLE_DIR / "static" / name).read_bytes()
        assert built == committed, f"static/{name} is not the build of package-lock.json: run `npm run build`"
