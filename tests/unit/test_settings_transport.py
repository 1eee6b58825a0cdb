"""Settings bounding a request (head size, field count, head and body timing): bad values stop
the service with a message naming the variable; good ones reach Hypercorn and the tus options."""

from __future__ import annotations

from pathlib import Path

import pytest

from tusingest.app import build_parts
from tusingest.config import SettingsError, load_settings
from tusingest.serving import hypercorn_config, runtime_warning
from tusingest.tus.body import BodyPace


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("request_head_max_kb", 2, "REQUEST_HEAD_MAX_KB"),
        ("request_head_max_kb", 4096, "REQUEST_HEAD_MAX_KB"),
        ("request_headers_max", 5, "REQUEST_HEADERS_MAX"),
        ("request_head_timeout_seconds", 0, "REQUEST_HEAD_TIMEOUT_SECONDS"),
        ("body_idle_timeout_seconds", 0.5, "BODY_IDLE_TIMEOUT_SECONDS"),
        ("body_idle_timeout_seconds", "soon", "BODY_IDLE_TIMEOUT_SECONDS"),
        ("body_min_rate_kbps", -1, "BODY_MIN_RATE_KBPS"),
        ("body_min_rate_window_seconds", 0, "BODY_MIN_RATE_WINDOW_SECONDS"),
    ],
)
def test_a_bad_transport_value_is_refused_naming_its_variable(name: str, value: object, said: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(**{name: value})
    assert said in str(refused.value)


def test_the_head_limits_reach_hypercorn() -> None:
    config = hypercorn_config(load_settings(request_head_max_kb=48, request_head_timeout_seconds=7))
    assert config.h11_max_incomplete_size == 48 << 10
    assert config.keep_alive_timeout == 7


def test_the_body_pace_reaches_the_tus_options_in_bytes_per_second(tmp_path: Path) -> None:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 's.db'}",
        staging_dir=str(tmp_path / "staging"),
        default_element_dir=str(tmp_path / "elements"),
        service_discovery_cache_file=str(tmp_path / "elements.json"),
        body_idle_timeout_seconds=20,
        body_min_rate_kbps=0.5,
        body_min_rate_window_seconds=10,
    )
    assert build_parts(settings).tus.ctx.options.body_pace == BodyPace(idle_timeout=20, min_rate=512, window=10)


@pytest.mark.parametrize(
    ("version", "warned"),
    [((3, 12, 0), True), ((3, 12, 1), True), ((3, 12, 5), True), ((3, 12, 6), False), ((3, 13, 0), False)],
)
def test_a_python_that_never_frees_parsed_path_names_is_named_at_start(
    version: tuple[int, int, int], warned: bool
) -> None:
    advice = runtime_warning(version)
    assert (advice is not None) is warned
    if advice is not None:
        assert ".".join(map(str, version)) in advice and "3.12.6" in advice
