"""Turns a Storage Element description into the Backend that reaches it.

Credentials and CA bundles never come from the element list: they come from the environment,
per element (``ELEMENT_<ID>_AWS_ACCESS_KEY_ID``, ``..._AWS_SECRET_ACCESS_KEY``, ``..._CA_BUNDLE``,
read by app.py into ``S3Settings.element_variables``) or, without those, from botocore's default
chain (AWS_ACCESS_KEY_ID, profiles, instance roles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tusingest.elements.backend import Backend, BackendError
from tusingest.elements.directory import DirectoryBackend
from tusingest.elements.model import BackendKind, StorageElement
from tusingest.elements.settings import S3Settings

if TYPE_CHECKING:
    # aiobotocore adds about 0.15 s to start-up; a node with directory elements only never loads it.
    from tusingest.elements.s3 import S3Access, S3ClientPool


def s3_access(element: StorageElement, settings: S3Settings) -> S3Access:
    """Endpoint, identity and TLS verification for an S3 element."""
    from tusingest.elements.s3 import S3Access

    environ = settings.element_variables
    variable = f"ELEMENT_{element.env_name}_"
    access_key_id = environ.get(variable + "AWS_ACCESS_KEY_ID") or None
    secret_access_key = environ.get(variable + "AWS_SECRET_ACCESS_KEY") or None
    if (access_key_id is None) != (secret_access_key is None):
        # Half a key pair would silently fall back to the default identity: refuse instead.
        missing = "AWS_SECRET_ACCESS_KEY" if secret_access_key is None else "AWS_ACCESS_KEY_ID"
        raise BackendError(f"element {element.element_id}: {variable}{missing} is not set", transient=False)
    verify: bool | str | None = environ.get(variable + "CA_BUNDLE") or settings.ca_bundle
    if verify is None:
        # None, not True: botocore then honours AWS_CA_BUNDLE before the system CAs.
        verify = None if settings.verify_tls else False
    return S3Access(
        endpoint_url=element.endpoint,
        region=element.region,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        verify=verify,
    )


def open_backend(
    element: StorageElement,
    settings: S3Settings,
    s3_clients: S3ClientPool | Callable[[], S3ClientPool],
) -> Backend:
    """The Backend for element; S3 elements borrow their client from s3_clients (the pool, or a
    function that makes it when the first S3 element asks)."""
    if element.backend is BackendKind.DIRECTORY:
        assert element.path is not None  # StorageElement validates it
        return DirectoryBackend(element.element_id, element.path)
    assert element.bucket is not None
    from tusingest.elements.s3 import S3Backend, S3ClientPool

    clients = s3_clients if isinstance(s3_clients, S3ClientPool) else s3_clients()
    return S3Backend(
        element.element_id,
        bucket=element.bucket,
        prefix=element.prefix,
        access=s3_access(element, settings),
        clients=clients,
        part_size=settings.part_size,
    )
