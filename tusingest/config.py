"""Settings: one object read from the environment and validated at start-up.

The variable names and defaults are the ArtStore Ingester card's (MAX_FILE_SIZE_MB,
UPLOAD_SESSION_TTL_HOURS, ...; the README's configuration table says where and why we deviate).
With nothing set, the service runs on embedded defaults: SQLite and staging under ./data,
listening on 127.0.0.1:8020.
"""

from __future__ import annotations

import os
import ssl
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The tus extensions this server implements, in the protocol's order (the order Tus-Extension lists
# them in; app.py hands the enabled ones to tus/ in TusOptions, so the protocol layer needs no config).
# checksum-trailer is not offered: Hypercorn does not pass request trailers to ASGI apps.
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


DatabaseEngine = Literal["sqlite", "postgresql"]


def database_engine(database_url: str) -> DatabaseEngine:
    """Which database a DATABASE_URL names: the one place its scheme is read (app.py opens the
    stores and the locker by it). Raises ValueError naming only the scheme: the URL may carry a password."""
    if database_url.startswith("sqlite:///"):
        return "sqlite"
    if database_url.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    scheme = database_url.partition(":")[0]
    raise ValueError(f"must start with sqlite:/// or postgresql://, not {scheme}:")


SECRET_SETTINGS = frozenset({"jwt_secret", "webhook_secret"})


class SettingsError(Exception):
    """A setting has a bad value; the message names the variable and says what is wrong."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8020, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # json | console; unset: console when stderr is a terminal, else JSON lines.
    log_format: Literal["json", "console"] | None = None
    # Spans are made when true (logs carry trace ids); exported over OTLP/HTTP only with an endpoint.
    opentelemetry_enabled: bool = True
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "artstore-ingester"

    database_url: str = "sqlite:///./data/tusingest.db"
    staging_dir: str = "./data/staging"
    redis_url: str | None = None

    tus_base_path: str = "/files/"
    tus_extensions: Annotated[tuple[str, ...], NoDecode] = TUS_EXTENSIONS
    max_file_size_mb: int = Field(1024, ge=1)
    chunk_size_mb: int = Field(10, ge=5, le=5120)  # also the S3 multipart part size (>= 5 MiB)
    staging_chunk_max_mb: int = Field(8192, ge=1)  # one file per normal upload: a directory element links it
    staging_write_buffer_kb: int = Field(4096, ge=64, le=262144)
    # directory: chunk files under STAGING_DIR (a shared volume when several nodes run).
    # s3: parts of a multipart upload plus a short tail object in STAGING_S3_BUCKET, so nodes share
    # nothing but the database and the bucket; STAGING_DIR then holds only scratch files (spools).
    staging_backend: Literal["directory", "s3"] = "directory"
    staging_s3_bucket: str | None = None
    staging_s3_prefix: str = "staging/"
    staging_s3_endpoint_url: str | None = None  # unset: AWS
    staging_s3_region: str = "us-east-1"
    # Unset: botocore's default credential chain (AWS_* variables, instance roles).
    staging_s3_access_key_id: str | None = None
    staging_s3_secret_access_key: SecretStr | None = None

    # false: the tus endpoint is not routed and the facade refuses X-Upload-Session-ID; only whole-file
    # uploads (POST /api/files/upload, /batch/upload) remain.
    resumable_uploads_enabled: bool = True
    # The browser upload console at /console (tusingest/console); false: no such route (404).
    console_enabled: bool = True
    upload_session_ttl_hours: float = Field(2.0, gt=0)
    upload_session_cleanup_interval_hours: float = Field(1.0, gt=0)
    lock_timeout_seconds: float = Field(10.0, gt=0)
    # The IETF draft's Upload-Limit append sizes, announced and enforced on draft appends; 0: none.
    upload_min_append_size_kb: int = Field(0, ge=0)
    upload_max_append_size_mb: int = Field(0, ge=0)
    shutdown_grace_seconds: float = Field(30.0, ge=0)

    # Transport: how large a request head may be and how slowly a request may arrive.
    # 32 KiB: Upload-Metadata alone may take 16 KiB, plus a bearer token and a proxy's headers.
    request_head_max_kb: int = Field(32, ge=4, le=1024)
    request_headers_max: int = Field(100, ge=10, le=10000)
    request_head_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    body_idle_timeout_seconds: float = Field(60.0, ge=1, le=3600)
    body_min_rate_kbps: float = Field(1.0, ge=0, le=1 << 20)  # KiB/s; 0: no minimum rate
    body_min_rate_window_seconds: float = Field(30.0, ge=1, le=3600)

    cors_allowed_origins: Annotated[tuple[str, ...], NoDecode] = ("*",)
    trust_proxy_headers: bool = False

    # Storage Elements: where the list comes from (Redis, else the fallback file, else one
    # directory element under ./data), how one is chosen and how failures are contained.
    service_discovery_key: str = "artstore:storage_elements"
    service_discovery_channel: str = "artstore:storage-elements"
    service_discovery_fallback_config: str | None = None
    service_discovery_cache_file: str = "./data/storage_elements.json"
    service_discovery_reconnect_max_seconds: float = Field(30.0, gt=0)
    default_element_dir: str = "./data/elements/local"
    storage_selection_strategy: Literal["least_used", "round_robin", "random", "priority"] = "least_used"
    storage_preferred_datacenter: str | None = None
    storage_health_check_interval_seconds: float = Field(30.0, gt=0)
    storage_health_check_timeout_seconds: float = Field(5.0, gt=0)
    storage_retry_max_attempts: int = Field(3, ge=1, le=20)
    storage_retry_base_delay_seconds: float = Field(0.2, ge=0)
    circuit_breaker_enabled: bool = True  # false: failures are counted and shown, a breaker never opens
    circuit_breaker_failure_threshold: int = Field(5, ge=1)
    circuit_breaker_timeout_seconds: float = Field(60.0, gt=0)
    circuit_breaker_success_threshold: int = Field(2, ge=1)
    # S3 TLS: verification on by default; a CA bundle for private CAs (per element:
    # ELEMENT_<ID>_CA_BUNDLE). Keys come from AWS_* or ELEMENT_<ID>_AWS_ACCESS_KEY_ID / _SECRET_.
    s3_verify_tls: bool = True
    s3_ca_bundle: str | None = None
    # Outgoing TLS (S3 elements, webhooks, JWKS): the lowest protocol version accepted. The card's
    # production checklist asks for 1.3; 1.2 for endpoints that cannot do better. http:// URLs stay plain.
    element_tls_min_version: Literal["1.2", "1.3"] = "1.3"
    s3_connect_timeout_seconds: float = Field(5.0, gt=0)
    s3_read_timeout_seconds: float = Field(60.0, gt=0)

    # Finalisation: what a complete upload must pass before it becomes a file.
    mime_type_validation: bool = True
    allowed_mime_types: Annotated[tuple[str, ...], NoDecode] = ()  # empty: every type; else e.g. image/*,text/plain
    virus_scan_enabled: bool = False
    clamd_url: str = "tcp://127.0.0.1:3310"  # or unix:///run/clamav/clamd.ctl
    virus_scan_fail_open: bool = False
    virus_scan_timeout_seconds: float = Field(300.0, gt=0)
    compression_enabled: bool = True
    compression_algorithm: Literal["brotli", "gzip"] = "brotli"
    compression_level: int | None = Field(None, ge=0, le=11)  # None: brotli 4, gzip 6
    compression_min_size_mb: float = Field(10.0, ge=0)
    compression_min_saving: float = Field(0.10, ge=0, lt=1)
    finalise_wait_seconds: float = Field(30.0, ge=0)  # how long the final PATCH waits for the saga
    events_heartbeat_seconds: float = Field(15.0, gt=0)  # a ": ping" comment on a quiet progress stream
    # Sagas doing their heavy steps at once, per node: they are CPU-bound (hashing, compression).
    finalise_concurrency: int = Field(default_factory=lambda: max(2, os.cpu_count() or 2), ge=1, le=256)
    default_username: str = "anonymous"

    # The upload saga and its outbox. The saga is the only path from an upload to a file (placement,
    # attr.json, registry row and events in one durable log): SAGA_ENABLED=false is refused at start.
    saga_enabled: bool = True
    saga_retry_max_attempts: int = Field(3, ge=1, le=50)
    saga_retry_base_delay_seconds: float = Field(0.5, ge=0)
    saga_timeout_seconds: float = Field(300.0, gt=0)
    saga_lease_seconds: float = Field(60.0, gt=0)
    saga_recovery_interval_seconds: float = Field(30.0, gt=0)
    file_events_stream: str = "file-events"
    webhook_urls: Annotated[tuple[str, ...], NoDecode] = ()
    webhook_secret: str | None = Field(None, repr=False)  # never shown: SECRET_SETTINGS
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_retry_max_seconds: float = Field(300.0, gt=0)
    outbox_poll_interval_seconds: float = Field(5.0, gt=0)
    outbox_retention_days: float = Field(7.0, ge=0)  # delivered messages are kept this long, then purged
    saga_failpoints: str = ""  # testing only: see tusingest/saga/failpoints.py

    # The REST facade (/api/files).
    max_batch_files: int = Field(100, ge=1, le=1000)
    max_batch_size_mb: int = Field(1024, ge=1)
    batch_parallelism: int = Field(2, ge=1, le=32)
    transfer_verify_checksum_default: bool = True

    @field_validator("tus_extensions", "cors_allowed_origins", "allowed_mime_types", "webhook_urls", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("tus_extensions")
    @classmethod
    def _known_extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(TUS_EXTENSIONS))
        if unknown:
            known = ", ".join(TUS_EXTENSIONS)
            raise ValueError(f"unknown tus extension(s) {', '.join(unknown)}; known: {known}")
        if "creation" not in value and ({"creation-with-upload", "creation-defer-length"} & set(value)):
            raise ValueError("creation-with-upload and creation-defer-length need creation")
        if "creation" not in value and "concatenation" in value:
            raise ValueError("concatenation needs creation")
        if "concatenation-unfinished" in value and "concatenation" not in value:
            raise ValueError("concatenation-unfinished needs concatenation")
        return tuple(name for name in TUS_EXTENSIONS if name in value)  # the order Tus-Extension lists them in

    @field_validator("saga_enabled")
    @classmethod
    def _saga_required(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "cannot be false: the upload saga is the only path from an upload to a stored, registered file"
                " (without it nothing would be placed, recorded or recovered after a crash)"
            )
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
        database_engine(value)
        return value

    @property
    def max_file_size(self) -> int:
        return self.max_file_size_mb << 20

    @field_validator("webhook_urls")
    @classmethod
    def _webhook_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return value

    @field_validator("clamd_url")
    @classmethod
    def _clamd_url(cls, value: str) -> str:
        if not value.startswith(("tcp://", "unix://")):
            raise ValueError("must be tcp://host:port or unix:///path/to/clamd.ctl")
        return value

    @property
    def chunk_size(self) -> int:
        return self.chunk_size_mb << 20

    # Security (issue 12). Tokens: PEM public key file(s) (comma-separated; a file may hold several
    # keys for rotation), a JWKS document (http(s) URL or file), or an HS256 secret (development
    # only). None of them: anonymous, on loopback only. Rate limits: 0 turns each one off.
    jwt_public_key_path: Annotated[tuple[str, ...], NoDecode] = ()
    jwt_jwks_url: str | None = None
    jwt_secret: SecretStr | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = Field(30.0, ge=0, le=300)
    jwt_jwks_cache_seconds: float = Field(300.0, ge=1, le=86400)
    jwt_jwks_refetch_min_seconds: float = Field(30.0, ge=1, le=3600)  # unknown kids re-fetch at most this often
    jwt_jwks_ca_bundle: str | None = None  # a private CA for an https JWKS
    # Observability (issue 13). METRICS_AUTH unset: "token" when a JWT key is configured, else "open".
    prometheus_metrics_enabled: bool = True
    staging_min_free_mb: int = Field(1024, ge=0)  # /health/ready: not ready below this much free staging space
    metrics_auth: Literal["token", "open"] | None = None
    rate_limit_creations_per_minute: int = Field(0, ge=0, le=1_000_000)  # per token subject
    rate_limit_creations_per_minute_per_address: int = Field(0, ge=0, le=1_000_000)  # per client address
    rate_limit_bytes_per_second: int = Field(0, ge=0)  # per token subject, all its uploads together
    rate_limit_concurrent_uploads: int = Field(0, ge=0, le=100_000)  # requests writing at once, per subject

    @model_validator(mode="after")
    def _throttle_above_min_rate(self) -> Settings:
        # A throttled body arrives at the byte budget's rate: below BODY_MIN_RATE_KBPS it would be cut off.
        min_rate = int(self.body_min_rate_kbps * 1024)
        if self.rate_limit_bytes_per_second and self.rate_limit_bytes_per_second < min_rate:
            raise ValueError(
                f"RATE_LIMIT_BYTES_PER_SECOND={self.rate_limit_bytes_per_second} is below BODY_MIN_RATE_KBPS"
                f" ({min_rate} bytes/s): throttled uploads would be cut off as too slow"
            )
        return self

    @model_validator(mode="after")
    def _s3_staging_has_a_bucket(self) -> Settings:
        if self.staging_backend == "s3" and not self.staging_s3_bucket:
            raise ValueError("STAGING_BACKEND=s3 needs STAGING_S3_BUCKET")
        return self

    @property
    def tls_min_version(self) -> ssl.TLSVersion:
        return ssl.TLSVersion.TLSv1_2 if self.element_tls_min_version == "1.2" else ssl.TLSVersion.TLSv1_3

    @field_validator("jwt_public_key_path", mode="before")
    @classmethod
    def _key_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("jwt_jwks_ca_bundle")
    @classmethod
    def _ca_bundle_exists(cls, value: str | None) -> str | None:
        if value and not os.path.isfile(value):
            raise ValueError(f"no such file: {value}")
        return value or None

    @field_validator("jwt_public_key_path")
    @classmethod
    def _key_paths_exist(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        missing = [path for path in value if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"no such file: {', '.join(missing)}")
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")) and not os.path.isfile(value):
            raise ValueError("must be an http:// or https:// URL or the path of a JWKS file")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value().encode()) < 32:
            raise ValueError("an HS256 secret needs at least 32 bytes")  # load_settings hides the value
        return value

    @field_validator("jwt_issuer", "jwt_audience")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


def load_settings(**overrides: object) -> Settings:
    """Read the environment (overrides win); raise SettingsError naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a check across settings: its input is all of them, secrets included
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            name = ".".join(str(part) for part in error["loc"]).upper()
            # A secret's value never goes into the message (it ends up in logs and terminals).
            shown = "<hidden>" if error["loc"][0] in SECRET_SETTINGS else repr(error.get("input"))
            problems.append(f"{name}={shown}: {error['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems)) from None
