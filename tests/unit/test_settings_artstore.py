"""Configuration follows the ArtStore Ingester card (../shared/ARTSTORE.md): every variable it lists is
recognised by its name, with the card's default unless the README's table names a deviation."""

from __future__ import annotations

import pytest

from tusingest.config import SettingsError, load_settings

# (variable, the card's default as our Settings holds it, another value to show the name is read)
CARD = [
    ("MAX_FILE_SIZE_MB", 1024, "7"),
    ("MAX_BATCH_FILES", 100, "7"),
    ("MAX_BATCH_SIZE_MB", 1024, "7"),
    ("CHUNK_SIZE_MB", 10, "7"),
    ("COMPRESSION_ENABLED", True, "false"),
    ("COMPRESSION_MIN_SIZE_MB", 10.0, "7"),
    ("COMPRESSION_ALGORITHM", "brotli", "gzip"),
    ("STORAGE_SELECTION_STRATEGY", "least_used", "round_robin"),
    ("STORAGE_HEALTH_CHECK_INTERVAL_SECONDS", 30.0, "7"),
    ("SERVICE_DISCOVERY_CHANNEL", "artstore:storage-elements", "elsewhere"),
    ("RESUMABLE_UPLOADS_ENABLED", True, "false"),
    ("UPLOAD_SESSION_TTL_HOURS", 2.0, "7"),
    ("UPLOAD_SESSION_CLEANUP_INTERVAL_HOURS", 1.0, "7"),
    ("CIRCUIT_BREAKER_ENABLED", True, "false"),
    ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", 5, "7"),
    ("CIRCUIT_BREAKER_SUCCESS_THRESHOLD", 2, "7"),
    ("CIRCUIT_BREAKER_TIMEOUT_SECONDS", 60.0, "7"),
    ("SAGA_ENABLED", True, "true"),  # false is refused: see below
    ("SAGA_TIMEOUT_SECONDS", 300.0, "7"),
    ("SAGA_RETRY_MAX_ATTEMPTS", 3, "7"),
    ("VIRUS_SCAN_ENABLED", False, "true"),
    ("MIME_TYPE_VALIDATION", True, "false"),
]
# Deviations the README's configuration table gives a reason for.
DEVIATIONS = [
    ("REDIS_URL", None, "redis://127.0.0.1:6379/0"),
    ("SERVICE_DISCOVERY_FALLBACK_CONFIG", None, "/config/storage-elements.json"),
    ("ALLOWED_MIME_TYPES", (), "application/pdf"),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, _, _ in CARD + DEVIATIONS:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize(("variable", "default", "other"), CARD + DEVIATIONS)
def test_every_card_variable_has_the_card_default_or_a_documented_one(
    variable: str, default: object, other: str
) -> None:
    assert getattr(load_settings(), variable.lower()) == default


@pytest.mark.parametrize(("variable", "default", "other"), CARD + DEVIATIONS)
def test_every_card_variable_is_read_from_the_environment_by_its_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, default: object, other: str
) -> None:
    monkeypatch.setenv(variable, other)
    value = getattr(load_settings(), variable.lower())
    expected = {"true": True, "false": False}.get(other, other)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        expected = type(default)(other)
    if isinstance(default, tuple):
        expected = (other,)
    assert value == expected


def test_saga_enabled_false_is_refused_at_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_ENABLED", "false")
    with pytest.raises(SettingsError, match=r"SAGA_ENABLED='false'.*only path from an upload"):
        load_settings()
