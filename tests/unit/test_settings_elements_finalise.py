"""Settings added for Storage Elements, finalisation and the facade: bad values stop the service
with a message naming the variable; lists are read from comma-separated text."""

from __future__ import annotations

import pytest

from tusingest.config import SettingsError, load_settings


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("webhook_urls", "ftp://hooks.example/a", "WEBHOOK_URLS"),
        ("clamd_url", "127.0.0.1:3310", "CLAMD_URL"),
        ("storage_selection_strategy", "fastest", "STORAGE_SELECTION_STRATEGY"),
        ("chunk_size_mb", 4, "CHUNK_SIZE_MB"),
        ("compression_algorithm", "zstd", "COMPRESSION_ALGORITHM"),
        ("compression_min_saving", 1.5, "COMPRESSION_MIN_SAVING"),
        ("circuit_breaker_failure_threshold", 0, "CIRCUIT_BREAKER_FAILURE_THRESHOLD"),
        ("max_batch_files", 0, "MAX_BATCH_FILES"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(name: str, value: object, said: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(**{name: value})
    assert said in str(refused.value)


def test_comma_lists_are_split_and_trimmed() -> None:
    settings = load_settings(
        webhook_urls="http://a.example/h, https://b.example/h", allowed_mime_types=" image/* ,application/pdf,"
    )
    assert settings.webhook_urls == ("http://a.example/h", "https://b.example/h")
    assert settings.allowed_mime_types == ("image/*", "application/pdf")


def test_the_defaults_need_no_redis_no_scanner_and_accept_every_type() -> None:
    settings = load_settings()
    assert settings.redis_url is None and settings.virus_scan_enabled is False
    assert settings.allowed_mime_types == () and settings.finalise_concurrency >= 2


def test_s3_staging_without_a_bucket_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGING_BACKEND", "s3")
    with pytest.raises(SettingsError, match="STAGING_BACKEND=s3 needs STAGING_S3_BUCKET"):
        load_settings()
    monkeypatch.setenv("STAGING_S3_BUCKET", "staging")
    assert (load_settings().staging_backend, load_settings().staging_s3_bucket) == ("s3", "staging")


def test_an_unknown_staging_backend_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGING_BACKEND", "nfs")
    with pytest.raises(SettingsError, match=r"(?i)staging_backend"):
        load_settings()
