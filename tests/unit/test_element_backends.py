"""open_backend: an element description plus the environment make its Backend; S3 credentials and CA
bundles come from the environment only, and S3 elements with one identity share one client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tusingest.app import element_settings
from tusingest.config import Settings, load_settings
from tusingest.elements.backend import BackendError
from tusingest.elements.backends import open_backend, s3_access
from tusingest.elements.directory import DirectoryBackend
from tusingest.elements.model import StorageElement
from tusingest.elements.s3 import S3Access, S3Backend, S3ClientPool


def element(**fields: object) -> StorageElement:
    return StorageElement.model_validate({"element_id": "se-1.a", "mode": "edit", **fields})


@pytest.fixture
def settings() -> Settings:
    return load_settings(chunk_size_mb=8, s3_ca_bundle=None, s3_verify_tls=True)


@pytest.fixture
async def pool() -> AsyncIterator[S3ClientPool]:
    clients = S3ClientPool()
    try:
        yield clients
    finally:
        await clients.close()


def test_a_directory_element_opens_a_directory_backend_on_its_path(
    settings: Settings, pool: S3ClientPool, tmp_path: Path
) -> None:
    backend = open_backend(element(backend="directory", path=str(tmp_path)), element_settings(settings, {}).s3, pool)
    assert isinstance(backend, DirectoryBackend)
    assert (backend.element_id, backend.root) == ("se-1.a", tmp_path)


def test_an_s3_element_opens_an_s3_backend_with_the_chunk_size_as_part_size(
    settings: Settings, pool: S3ClientPool
) -> None:
    described = element(backend="s3", endpoint="http://s3:9000", bucket="b", prefix="files", region="eu-west-1")
    backend = open_backend(described, element_settings(settings, {}).s3, pool)
    assert isinstance(backend, S3Backend)
    assert (backend.bucket, backend.prefix, backend.part_size) == ("b", "files/", 8 << 20)
    assert backend.access == S3Access("http://s3:9000", "eu-west-1", None, None, None)


def test_per_element_keys_and_ca_bundle_come_from_element_variables(settings: Settings) -> None:
    environ = {
        "ELEMENT_SE_1_A_AWS_ACCESS_KEY_ID": "id",
        "ELEMENT_SE_1_A_AWS_SECRET_ACCESS_KEY": "secret",
        "ELEMENT_SE_1_A_CA_BUNDLE": "/etc/element-ca.pem",
        "AWS_ACCESS_KEY_ID": "default-id",
    }
    access = s3_access(element(backend="s3", bucket="b"), element_settings(settings, environ).s3)
    assert (access.access_key_id, access.secret_access_key, access.verify) == ("id", "secret", "/etc/element-ca.pem")


def test_without_element_keys_botocore_s_default_chain_decides(settings: Settings) -> None:
    access = s3_access(
        element(backend="s3", bucket="b"), element_settings(settings, {"AWS_ACCESS_KEY_ID": "default-id"}).s3
    )
    assert (access.access_key_id, access.secret_access_key) == (None, None)


def test_half_a_key_pair_is_a_permanent_error_naming_the_missing_variable(settings: Settings) -> None:
    with pytest.raises(BackendError, match="ELEMENT_SE_1_A_AWS_SECRET_ACCESS_KEY") as raised:
        s3_access(
            element(backend="s3", bucket="b"), element_settings(settings, {"ELEMENT_SE_1_A_AWS_ACCESS_KEY_ID": "id"}).s3
        )
    assert raised.value.transient is False


@pytest.mark.parametrize(
    ("verify_tls", "ca_bundle", "element_bundle", "expected"),
    [
        (True, None, None, None),  # botocore's default: AWS_CA_BUNDLE, else the system CAs
        (False, None, None, False),
        (True, "/etc/ca.pem", None, "/etc/ca.pem"),
        (True, "/etc/ca.pem", "/etc/element.pem", "/etc/element.pem"),
    ],
)
def test_tls_verification_uses_the_element_bundle_then_the_global_bundle_then_the_flag(
    verify_tls: bool, ca_bundle: str | None, element_bundle: str | None, expected: bool | str | None
) -> None:
    settings = load_settings(s3_verify_tls=verify_tls, s3_ca_bundle=ca_bundle)
    environ = {"ELEMENT_SE_1_A_CA_BUNDLE": element_bundle} if element_bundle else {}
    assert s3_access(element(backend="s3", bucket="b"), element_settings(settings, environ).s3).verify == expected


async def test_the_pool_shares_one_client_per_access_and_refuses_after_close() -> None:
    pool = S3ClientPool()
    first = S3Access("http://127.0.0.1:9", access_key_id="id", secret_access_key="secret")
    same = S3Access("http://127.0.0.1:9", access_key_id="id", secret_access_key="secret")
    other = S3Access("http://127.0.0.1:9", access_key_id="other", secret_access_key="secret")
    client = await pool.client(first)
    assert await pool.client(same) is client
    assert await pool.client(other) is not client
    await pool.close()
    with pytest.raises(BackendError) as raised:
        await pool.client(first)
    assert raised.value.transient is False


async def test_a_malformed_endpoint_is_a_permanent_error(pool: S3ClientPool) -> None:
    with pytest.raises(BackendError) as raised:
        await pool.client(S3Access("not a url"))
    assert raised.value.transient is False
    assert "not a url" in str(raised.value)


@pytest.mark.parametrize("part_size", [(5 << 20) - 1, (5 << 30) + 1])
def test_a_part_size_outside_s3_limits_is_refused(pool: S3ClientPool, part_size: int) -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Backend("se", bucket="b", access=S3Access(None), clients=pool, part_size=part_size)


def test_a_node_with_directory_elements_only_never_imports_aiobotocore(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = f"""
import asyncio, sys
from tusingest.app import element_settings
from tusingest.config import load_settings
from tusingest.elements.runtime import StorageElements

async def main() -> None:
    settings = load_settings(
        default_element_dir={str(tmp_path / "local")!r}, service_discovery_cache_file={str(tmp_path / "c.json")!r}
    )
    storage = StorageElements.from_settings(element_settings(settings))
    await storage.open(health_checks=False)
    assert await storage.pool.probe("local")
    await storage.close()

asyncio.run(main())
print("aiobotocore" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_elements_read_keys_only_from_what_app_py_handed_in_never_from_os_environ(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed_in = element_settings(settings, {}).s3
    monkeypatch.setenv("ELEMENT_SE_1_A_AWS_ACCESS_KEY_ID", "set-later")
    monkeypatch.setenv("ELEMENT_SE_1_A_AWS_SECRET_ACCESS_KEY", "set-later")
    access = s3_access(element(backend="s3", bucket="b"), handed_in)
    assert (access.access_key_id, access.secret_access_key) == (None, None)
