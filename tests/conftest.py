"""Shared fixtures: real PostgreSQL, Redis, S3 (moto) and clamd servers, and real tusingest servers on loopback."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.server",
    "tests.fixtures.s3",
    "tests.fixtures.redis",
    "tests.fixtures.clamd",
]
