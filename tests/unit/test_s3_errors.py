"""S3 failures become BackendErrors that say whether a retry can help and name element and operation."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from tusingest.elements.backend import BackendError, ObjectNotFound, ObjectRefused
from tusingest.elements.s3 import s3_error


def client_error(status: int, code: str, message: str = "") -> ClientError:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "Operation")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, "InternalError"),
        (503, "SlowDown"),
        (503, "ServiceUnavailable"),
        (502, ""),
        (400, "RequestTimeout"),
        (429, "TooManyRequests"),
        (409, "OperationAborted"),
    ],
)
def test_server_errors_throttling_and_timeouts_are_transient(status: int, code: str) -> None:
    error = s3_error(client_error(status, code), element_id="se-1", operation="put_object", key="k")
    assert type(error) is BackendError
    assert error.transient is True


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, "NoSuchBucket"),
        (403, "AccessDenied"),
        (403, "InvalidAccessKeyId"),
        (403, "SignatureDoesNotMatch"),
        (400, "InvalidBucketName"),
        (404, "NoSuchUpload"),
        (400, "EntityTooSmall"),
    ],
)
def test_other_client_errors_are_permanent(status: int, code: str) -> None:
    error = s3_error(client_error(status, code), element_id="se-1", operation="put_object", key="k")
    assert type(error) is BackendError
    assert error.transient is False


@pytest.mark.parametrize("code", ["KeyTooLongError", "InvalidArgument", "InvalidObjectName", "MetadataTooLarge"])
def test_a_key_or_object_s3_refuses_is_the_request_s_fault(code: str) -> None:
    error = s3_error(client_error(400, code), element_id="se-1", operation="put_object", key="a/b")
    assert isinstance(error, ObjectRefused)
    assert error.key == "a/b" and error.transient is False and code in str(error)


def test_an_invalid_argument_without_a_key_is_an_element_failure() -> None:
    error = s3_error(client_error(400, "InvalidArgument"), element_id="se-1", operation="head_bucket")
    assert type(error) is BackendError


@pytest.mark.parametrize("code", ["NoSuchKey", "404", "NotFound"])
def test_a_missing_key_is_object_not_found(code: str) -> None:
    error = s3_error(client_error(404, code), element_id="se-1", operation="get_object", key="a/b")
    assert isinstance(error, ObjectNotFound)
    assert error.key == "a/b"


def test_a_404_of_an_operation_without_a_key_is_not_object_not_found() -> None:
    error = s3_error(client_error(404, "404"), element_id="se-1", operation="head_bucket")
    assert not isinstance(error, ObjectNotFound)
    assert error.transient is False


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://s3:9000"),
        ConnectionClosedError(endpoint_url="http://s3:9000"),
        ConnectTimeoutError(endpoint_url="http://s3:9000"),
        ReadTimeoutError(endpoint_url="http://s3:9000"),
        ResponseStreamingError(error="reset"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError("refused"),
        ConnectionResetError(104, "reset"),
        TimeoutError(),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_connection_failures_are_transient(exc: Exception) -> None:
    assert s3_error(exc, element_id="se-1", operation="upload_part", key="k").transient is True


@pytest.mark.parametrize(
    "exc",
    [
        SSLError(endpoint_url="https://s3", error=ssl.SSLError("certificate verify failed")),
        ssl.SSLCertVerificationError("certificate verify failed"),
        NoCredentialsError(),
        ParamValidationError(report="bad"),
        ValueError("a bug"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_tls_credential_parameter_and_unknown_failures_are_permanent(exc: Exception) -> None:
    assert s3_error(exc, element_id="se-1", operation="upload_part", key="k").transient is False


def test_the_message_names_the_element_the_operation_and_the_key() -> None:
    error = s3_error(
        client_error(403, "AccessDenied", "Access Denied"), element_id="se-7", operation="head_object", key="a/b"
    )
    assert str(error) == "element se-7: S3 head_object of 'a/b' failed: AccessDenied (HTTP 403) Access Denied"


def test_a_backend_error_passes_through_unchanged() -> None:
    original = BackendError("already mapped", transient=False)
    assert s3_error(original, element_id="se-1", operation="put_object") is original
