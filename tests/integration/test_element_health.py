"""What a node says about its Storage Elements: /health/ready, /health/elements and `tusingest elements`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fixtures.server import ServerFactory


def element_list(tmp_path: Path, *elements: dict[str, object], version: int = 1, name: str = "elements.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"version": version, "storage_elements": list(elements)}))
    return path


def directory_element(tmp_path: Path, element_id: str, mode: str, **fields: object) -> dict[str, object]:
    return {
        "element_id": element_id,
        "mode": mode,
        "backend": "directory",
        "path": str(tmp_path / element_id),
        **fields,
    }


async def test_ready_with_the_default_directory_element(start_server: ServerFactory) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["checks"]["writable_storage_element"]["ok"] is True


async def test_not_ready_when_every_element_is_read_only(start_server: ServerFactory, tmp_path: Path) -> None:
    fallback = element_list(
        tmp_path, directory_element(tmp_path, "ro-1", "ro"), directory_element(tmp_path, "ar-1", "ar")
    )
    server = await start_server(service_discovery_fallback_config=str(fallback))
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["writable_storage_element"]["ok"] is False


async def test_not_ready_when_the_only_writable_element_is_full(start_server: ServerFactory, tmp_path: Path) -> None:
    full = directory_element(tmp_path, "full", "rw", capacity_bytes=100, used_bytes=100)
    server = await start_server(service_discovery_fallback_config=str(element_list(tmp_path, full)))
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/health/ready")
    assert response.status_code == 503


async def test_health_elements_lists_every_element_with_its_breaker(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    fallback = element_list(
        tmp_path,
        directory_element(tmp_path, "edit-1", "edit", priority=10, capacity_bytes=1000, used_bytes=250),
        directory_element(tmp_path, "ro-1", "ro", priority=20),
        version=42,
    )
    server = await start_server(service_discovery_fallback_config=str(fallback))
    async with httpx.AsyncClient(base_url=server.url) as client:
        report = (await client.get("/health/elements")).json()
    assert report["version"] == 42
    assert report["source"] == "fallback"
    rows = {row["element_id"]: row for row in report["storage_elements"]}
    assert set(rows) == {"edit-1", "ro-1"}
    assert (rows["edit-1"]["mode"], rows["edit-1"]["used_bytes"], rows["edit-1"]["breaker"]) == ("edit", 250, "closed")


def run_elements_command(tmp_path: Path, fallback: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "SERVICE_DISCOVERY_FALLBACK_CONFIG": str(fallback),
        "SERVICE_DISCOVERY_CACHE_FILE": str(tmp_path / "cache.json"),
        "PORT": "1",  # nothing listens there: the command must fall back to probing itself
    }
    return subprocess.run(
        [sys.executable, "-m", "tusingest", "elements", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_elements_command_probes_each_element_when_no_node_runs(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where a directory should be")
    fallback = element_list(
        tmp_path, directory_element(tmp_path, "good", "rw"), directory_element(tmp_path, "blocked", "rw")
    )
    result = run_elements_command(tmp_path, fallback, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["element_id"]: row for row in json.loads(result.stdout)["storage_elements"]}
    assert rows["good"]["healthy"] is True and rows["good"]["latency_ms"] is not None
    assert rows["blocked"]["healthy"] is False and rows["blocked"]["last_error"]


def test_elements_command_prints_a_table(tmp_path: Path) -> None:
    fallback = element_list(tmp_path, directory_element(tmp_path, "se-table", "edit", capacity_bytes=1 << 30))
    result = run_elements_command(tmp_path, fallback)
    assert result.returncode == 0, result.stderr
    assert "se-table" in result.stdout and "edit" in result.stdout and "closed" in result.stdout


async def test_elements_command_asks_the_running_node(start_server: ServerFactory, tmp_path: Path) -> None:
    fallback = element_list(tmp_path, directory_element(tmp_path, "served", "rw"))
    server = await start_server(service_discovery_fallback_config=str(fallback))
    other = element_list(tmp_path, directory_element(tmp_path, "not-served", "rw"), name="other.json")
    result = await asyncio_run_command(tmp_path, other, "--json", "--url", server.url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["from"] == server.url
    assert [row["element_id"] for row in report["storage_elements"]] == ["served"]


async def asyncio_run_command(tmp_path: Path, fallback: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import asyncio

    # The server runs in this process's event loop: the command must run in a thread.
    return await asyncio.to_thread(run_elements_command, tmp_path, fallback, *args)
