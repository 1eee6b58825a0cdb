"""Settings: one object read from the environment and validated at start-up.

The variable names are the ArtStore Ingester's (MAX_FILE_SIZE_MB, UPLOAD_SESSION_TTL_HOURS,
...). With nothing set, the service runs on embedded defaults: SQLite and staging under
./data, listening on 127.0.0.1:8020.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TUS_EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "expiration",
    "termination",
    "checksum",
    "concatenation",
    "concatenation-unfinished",
)
# Advertised and served only once implemented: the default list is what works today.
# checksum-trailer is not offered: Hypercorn does not pass request trailers to ASGI apps.
IMPLEMENTED_EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "expiration",
    "termination",
    "checksum",
    "concatenation",
    "concatenation-unfinished",
)


class SettingsError(Exception):
    """A setting has a bad value; the message names the variable and says what is wrong."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8020, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    database_url: str = "sqlite:///./data/tusingest.db"
    staging_dir: str = "./data/staging"
    redis_url: str | None = None

    tus_base_path: str = "/files/"
    tus_extensions: Annotated[tuple[str, ...], NoDecode] = IMPLEMENTED_EXTENSIONS
    max_file_size_mb: int = Field(5120, ge=1)
    chunk_size_mb: int = Field(16, ge=5, le=5120)  # also the S3 multipart part size (>= 5 MiB)
    staging_chunk_max_mb: int = Field(256, ge=1)
    staging_write_buffer_kb: int = Field(4096, ge=64, le=262144)

    upload_session_ttl_hours: float = Field(24.0, gt=0)
    upload_session_cleanup_interval_hours: float = Field(1.0, gt=0)
    lock_timeout_seconds: float = Field(10.0, gt=0)
    shutdown_grace_seconds: float = Field(30.0, ge=0)

    cors_allowed_origins: Annotated[tuple[str, ...], NoDecode] = ("*",)
    trust_proxy_headers: bool = False

    @field_validator("tus_extensions", "cors_allowed_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("tus_extensions")
    @classmethod
    def _known_extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(IMPLEMENTED_EXTENSIONS))
        if unknown:
            known = ", ".join(IMPLEMENTED_EXTENSIONS)
            raise ValueError(f"unknown tus extension(s) {', '.join(unknown)}; known: {known}")
        if "creation" not in value and ({"creation-with-upload", "creation-defer-length"} & set(value)):
            raise ValueError("creation-with-upload and creation-defer-length need creation")
        if "creation" not in value and "concatenation" in value:
            raise ValueError("concatenation needs creation")
        if "concatenation-unfinished" in value and "concatenation" not in value:
            raise ValueError("concatenation-unfinished needs concatenation")
        return value

    @field_validator("tus_base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError("must be an absolute URL path such as /files/")
        return value.rstrip("/") + "/"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @property
    def max_file_size(self) -> int:
        return self.max_file_size_mb << 20


def load_settings(**overrides: object) -> Settings:
    """Read the environment (overrides win); raise SettingsError naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
            value = error.get("input")
            problems.append(f"{name}={value!r}: {error['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems)) from None
