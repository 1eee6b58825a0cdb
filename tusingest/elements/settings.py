"""ElementSettings: what the Storage Element parts need from the configuration, and nothing else.

Built once by app.py (``element_settings``) from the Settings and the process environment, so
that nothing under ``elements/`` reads the configuration or ``os.environ`` itself.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from tusingest.elements.breaker import BreakerSettings


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """Where the element list comes from: Redis, else the fallback file, else one directory element."""

    redis_url: str | None
    key: str
    channel: str
    fallback_path: str | None
    cache_path: str
    default_element_dir: str
    reconnect_max_seconds: float


@dataclass(frozen=True, slots=True)
class S3Settings:
    """How S3 elements are reached. ``element_variables`` holds the ``ELEMENT_<ID>_AWS_ACCESS_KEY_ID``,
    ``..._AWS_SECRET_ACCESS_KEY`` and ``..._CA_BUNDLE`` variables, read by app.py at start: elements
    arrive through discovery at any time, so their ids are not known when the settings are read."""

    verify_tls: bool
    ca_bundle: str | None
    connect_timeout: float
    read_timeout: float
    part_size: int
    element_variables: Mapping[str, str] = field(repr=False)  # holds secret keys: never shown
    tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3  # ELEMENT_TLS_MIN_VERSION


@dataclass(frozen=True, slots=True)
class ElementSettings:
    discovery: DiscoverySettings
    s3: S3Settings
    breaker: BreakerSettings
    selection_strategy: str  # a selection.Strategy value
    datacenter: str | None
    retry_attempts: int
    retry_base_delay: float
    probe_timeout: float
    health_interval: float
    put_lifetime: float  # no put runs longer than this: what one left that is older is garbage
