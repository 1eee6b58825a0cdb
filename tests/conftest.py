"""Shared fixtures: real PostgreSQL databases and real tusingest servers on loopback."""

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.server"]
