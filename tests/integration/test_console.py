"""/console over HTTP: the page and its two assets with their types, cache rules and security headers,
the packaged build (what a wheel ships), and CONSOLE_ENABLED=false leaving no route. The page in a
browser is tests/e2e/test_console.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.server import LiveServer, base_settings, live_server
from tusingest.console import Console, ConsoleSettings, asset

POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def asset_urls(page: str) -> dict[str, str]:
    return {match[1]: match[0] for match in re.findall(r'"(/console/assets/(console\.(?:js|css))\?v=\w+)"', page)}


@pytest.mark.parametrize("name", ["index.html", "console.js", "console.css"])
def test_the_package_carries_the_built_console(name: str) -> None:
    assert len(asset(name)) > (500 if name == "index.html" else 10_000)


async def test_console_page_is_html_with_a_self_only_policy_and_names_the_tus_endpoint(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with live_server(base_settings(tmp_path, sqlite_url, tus_base_path="/uploads/")) as server:
        async with server.client() as client:
            page = await client.get("/console")

    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == POLICY
    assert page.headers["cache-control"] == "no-cache"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert 'data-tus-endpoint="/uploads/"' in page.text
    assert set(asset_urls(page.text)) == {"console.js", "console.css"}


@pytest.mark.parametrize(
    ("name", "media_type"),
    [("console.js", "text/javascript; charset=utf-8"), ("console.css", "text/css; charset=utf-8")],
)
async def test_console_assets_named_by_version_are_immutable_and_revalidate_by_etag(
    sqlite_server: LiveServer, name: str, media_type: str
) -> None:
    async with sqlite_server.client() as client:
        url = asset_urls((await client.get("/console")).text)[name]
        first = await client.get(url)
        again = await client.get(url, headers={"If-None-Match": first.headers["etag"]})
        unversioned = await client.get(f"/console/assets/{name}")

    assert first.status_code == 200 and first.content == asset(name)
    assert first.headers["content-type"] == media_type
    assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert first.headers["content-security-policy"] == POLICY
    assert again.status_code == 304 and again.content == b""
    assert unversioned.status_code == 200 and unversioned.headers["cache-control"] == "no-cache"


async def test_an_unknown_console_asset_is_404(sqlite_server: LiveServer) -> None:
    async with sqlite_server.client() as client:
        missing = await client.get("/console/assets/..%2Fconsole%2F__init__.py")
        other = await client.get("/console/assets/index.html")

    assert (missing.status_code, other.status_code) == (404, 404)


async def test_the_console_page_needs_no_token_on_a_keyed_server(keyed_server: LiveServer) -> None:
    # The page holds nothing; every request it makes carries the token typed into it.
    async with keyed_server.client() as client:
        page = await client.get("/console")
        api = await client.get("/api/files/upload/session/0123456789abcdef0123456789abcdef")

    assert page.status_code == 200
    assert api.status_code == 401


async def test_console_disabled_has_no_route(tmp_path: Path, sqlite_url: str) -> None:
    async with live_server(base_settings(tmp_path, sqlite_url, console_enabled=False)) as server:
        async with server.client() as client:
            page = await client.get("/console")
            script = await client.get("/console/assets/console.js")

    assert (page.status_code, script.status_code) == (404, 404)


def test_the_page_version_follows_the_assets() -> None:
    console = Console(ConsoleSettings(tus_base_path="/files/", chunk_size=10 << 20))

    assert f"console.js?v={console.version}".encode() in console.page
    assert b'data-chunk-size="10485760"' in console.page
