"""Every failure a tus client can see, as a value with its status code, mapped in one place."""

from __future__ import annotations

from collections.abc import Mapping


class TusError(Exception):
    status: int = 400
    default_message: str = "bad request"

    def __init__(self, message: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.headers = dict(headers or {})
        super().__init__(self.message)


class BadRequest(TusError):
    status, default_message = 400, "bad request"


class Forbidden(TusError):
    status, default_message = 403, "forbidden"


class UploadNotFound(TusError):
    status, default_message = 404, "upload not found"


class MethodNotAllowed(TusError):
    status, default_message = 405, "method not allowed"


class OffsetMismatch(TusError):
    status, default_message = 409, "Upload-Offset does not match the upload's offset"


class UploadGone(TusError):
    status, default_message = 410, "upload is gone"


class UploadInterrupted(TusError):
    """A newer request for the upload took it over before this one committed a byte (as tusd's
    ERR_UPLOAD_INTERRUPTED): never a 2xx, which would tell the client its bytes were taken."""

    status, default_message = 400, "upload has been interrupted by another request for this upload resource"


class BodyTimeout(TusError):
    """The body arrived too slowly (BODY_IDLE_TIMEOUT_SECONDS, BODY_MIN_RATE_KBPS) and not a
    byte of it was committed; a body cut off after some bytes answers with the offset reached."""

    status, default_message = 408, "the request body arrived too slowly and was cut off"


class VersionNotSupported(TusError):
    status, default_message = 412, "Tus-Resumable version not supported"


class TooLarge(TusError):
    status, default_message = 413, "upload too large"


class UnsupportedMediaType(TusError):
    status, default_message = 415, "Content-Type must be application/offset+octet-stream"


class UploadLocked(TusError):
    status, default_message = 423, "upload is locked by another request; retry shortly"


class ChecksumMismatch(TusError):
    status, default_message = 460, "checksum mismatch"


class ServerError(TusError):
    status, default_message = 500, "internal server error"


class ServiceUnavailable(TusError):
    status, default_message = 503, "service unavailable"


class UploadProblem(TusError):
    """A failure of the IETF resumable-upload draft, answered as an RFC 9457 problem document."""

    problem_type = "about:blank"

    def __init__(
        self,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
        members: Mapping[str, int | str] | None = None,
    ) -> None:
        super().__init__(message, headers)
        self.members = dict(members or {})


class MismatchingUploadOffset(UploadProblem):
    status, default_message = 409, "offset from request does not match offset of resource"
    problem_type = "https://iana.org/assignments/http-problem-types#mismatching-upload-offset"


class CompletedUpload(UploadProblem):
    status, default_message = 400, "upload is already completed"
    problem_type = "https://iana.org/assignments/http-problem-types#completed-upload"


class InconsistentUploadLength(UploadProblem):
    status, default_message = 400, "inconsistent length values for upload"
    problem_type = "https://iana.org/assignments/http-problem-types#inconsistent-upload-length"


class InterruptedUploadAppend(UploadProblem):
    """The draft's form of UploadInterrupted. 409, like its own mismatching-upload-offset: the
    request conflicts with another one for the resource, and the draft's answer to a conflict is
    offset retrieval, which is what this client must do. The draft registers no type for it."""

    status, default_message = 409, "upload has been interrupted by another request for this upload resource"


class UploadRefused(TusError):
    """The upload was refused by what runs after the protocol (the finaliser): 415 for a type
    that is not accepted, 422 for a file that failed validation, 503 when storage failed."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, headers)
        self.status = status
