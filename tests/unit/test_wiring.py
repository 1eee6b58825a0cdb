"""app.py is the one place that wires: one DATABASE_URL becomes the session store, the saga store and
the locker together, and elements/ receives an ElementSettings that carries only its own variables."""

from __future__ import annotations

import pytest

from tusingest.app import element_settings, open_database
from tusingest.config import SettingsError, load_settings
from tusingest.saga.postgres import PostgresSagaStore
from tusingest.saga.sqlite import SQLiteSagaStore
from tusingest.sessions.locks import MemoryLocker
from tusingest.sessions.pglocks import PostgresLocker
from tusingest.sessions.postgres import PostgresSessionStore
from tusingest.sessions.sqlite import SQLiteSessionStore


def test_a_sqlite_url_opens_sqlite_stores_and_an_in_process_locker() -> None:
    database = open_database("sqlite:///./data/tusingest.db", lock_timeout=3.0)
    assert isinstance(database.sessions, SQLiteSessionStore)
    assert isinstance(database.sagas, SQLiteSagaStore)
    assert isinstance(database.locker, MemoryLocker)


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h/db"])
def test_a_postgresql_url_opens_postgresql_stores_and_advisory_locks(url: str) -> None:
    database = open_database(url)
    assert isinstance(database.sessions, PostgresSessionStore)
    assert isinstance(database.sagas, PostgresSagaStore)
    assert isinstance(database.locker, PostgresLocker)


def test_an_unknown_scheme_is_refused_naming_the_scheme_but_not_the_password() -> None:
    with pytest.raises(ValueError, match="mysql:") as raised:
        open_database("mysql://u:s3cr3t@h/db")
    assert "s3cr3t" not in str(raised.value)
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        load_settings(database_url="sqlite:relative.db")


def test_elements_receive_only_the_per_element_variables_of_the_environment() -> None:
    environ = {
        "ELEMENT_SE_1_AWS_ACCESS_KEY_ID": "id",
        "ELEMENT_SE_1_AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SECRET_ACCESS_KEY": "the node's own",
        "DATABASE_URL": "postgresql://u:pw@h/db",
    }
    settings = element_settings(load_settings(chunk_size_mb=12, circuit_breaker_enabled=False), environ)
    assert dict(settings.s3.element_variables) == {
        "ELEMENT_SE_1_AWS_ACCESS_KEY_ID": "id",
        "ELEMENT_SE_1_AWS_SECRET_ACCESS_KEY": "secret",
    }
    assert settings.s3.part_size == 12 << 20
    assert settings.breaker.enabled is False
