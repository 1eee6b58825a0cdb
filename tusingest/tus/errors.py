"""Every failure a tus client can see, as a value with its code and status, mapped to a response in
one place (``TusServer.error_response``), in the manner of tusd's ``NewError(code, message, status)``.

The code is tusd's where tusd has one (ERR_MISMATCHED_OFFSET, ...). It is not on the wire of a plain
tus answer (text/plain, the message); ``UploadRefused`` carries the finaliser's code, which its face
(api/finaliser.py) also sends in ``ArtStore-Error``, and the REST facade puts in its JSON."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus


class TusError(Exception):
    status: int = 400
    code: str = "ERR_BAD_REQUEST"
    default_message: str = "bad request"

    def __init__(self, message: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.headers = dict(headers or {})
        super().__init__(self.message)


class BadRequest(TusError):
    status, default_message = 400, "bad request"


class Forbidden(TusError):
    code = "ERR_FORBIDDEN"
    status, default_message = 403, "forbidden"


class UploadNotFound(TusError):
    code = "ERR_UPLOAD_NOT_FOUND"
    status, default_message = 404, "upload not found"


class MethodNotAllowed(TusError):
    code = "ERR_METHOD_NOT_ALLOWED"
    status, default_message = 405, "method not allowed"


class OffsetMismatch(TusError):
    code = "ERR_MISMATCHED_OFFSET"
    status, default_message = 409, "Upload-Offset does not match the upload's offset"


class UploadGone(TusError):
    code = "ERR_UPLOAD_GONE"
    status, default_message = 410, "upload is gone"


class UploadInterrupted(TusError):
    """A newer request for the upload took it over before this one committed a byte (as tusd's
    ERR_UPLOAD_INTERRUPTED): never a 2xx, which would tell the client its bytes were taken."""

    code = "ERR_UPLOAD_INTERRUPTED"
    status, default_message = 400, "upload has been interrupted by another request for this upload resource"


class BodyTimeout(TusError):
    """The body arrived too slowly (BODY_IDLE_TIMEOUT_SECONDS, BODY_MIN_RATE_KBPS) and not a
    byte of it was committed; a body cut off after some bytes answers with the offset reached."""

    code = "ERR_READ_TIMEOUT"
    status, default_message = 408, "the request body arrived too slowly and was cut off"


class VersionNotSupported(TusError):
    code = "ERR_UNSUPPORTED_VERSION"
    status, default_message = 412, "Tus-Resumable version not supported"


class TooLarge(TusError):
    code = "ERR_MAX_SIZE_EXCEEDED"
    status, default_message = 413, "upload too large"


class UnsupportedMediaType(TusError):
    code = "ERR_INVALID_CONTENT_TYPE"
    status, default_message = 415, "Content-Type must be application/offset+octet-stream"


class UploadLocked(TusError):
    code = "ERR_UPLOAD_LOCKED"
    status, default_message = 423, "upload is locked by another request; retry shortly"


class ChecksumMismatch(TusError):
    code = "ERR_CHECKSUM_MISMATCH"
    status, default_message = 460, "checksum mismatch"


class RateLimited(TusError):
    """A rate limit refused the request before its body was read (tusingest/api/limits.py);
    Retry-After says when to try again."""

    code = "ERR_RATE_LIMITED"
    status, default_message = 429, "rate limited"


class RangeNotSatisfiable(TusError):
    code = "ERR_RANGE_NOT_SATISFIABLE"
    status, default_message = 416, "the range starts past the upload's bytes"


class NotYetReadable(TusError):
    """GET of an upload in progress whose committed bytes staging cannot read before the upload is
    complete (S3 staging holds them in the parts of an open multipart upload)."""

    code = "ERR_NOT_YET_READABLE"
    status, default_message = 409, "the bytes of this upload can be read once it is complete"


class ServerError(TusError):
    code = "ERR_INTERNAL_SERVER_ERROR"
    status, default_message = 500, "internal server error"


class ServiceUnavailable(TusError):
    code = "ERR_SERVICE_UNAVAILABLE"
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

    def document(self) -> dict[str, int | str]:
        """The RFC 9457 problem document. A registered type's title is its own (the draft's
        wording); ``about:blank`` takes the status phrase as title and the message as detail."""
        document: dict[str, int | str] = {"type": self.problem_type, "title": self.message}
        if self.problem_type == "about:blank":
            document |= {"title": HTTPStatus(self.status).phrase, "detail": self.message}
        return document | self.members


class MismatchingUploadOffset(UploadProblem):
    code = "ERR_MISMATCHED_OFFSET"
    status, default_message = 409, "offset from request does not match offset of resource"
    problem_type = "https://iana.org/assignments/http-problem-types#mismatching-upload-offset"


class CompletedUpload(UploadProblem):
    """An empty append to a completed upload: 410, as -11 suggests (a non-empty one is an
    InconsistentUploadLength)."""

    code = "ERR_UPLOAD_COMPLETED"
    status, default_message = 410, "upload is already completed"
    problem_type = "https://iana.org/assignments/http-problem-types#completed-upload"


class InconsistentUploadLength(UploadProblem):
    code = "ERR_INCONSISTENT_LENGTH"
    status, default_message = 400, "inconsistent length values for upload"
    problem_type = "https://iana.org/assignments/http-problem-types#inconsistent-upload-length"


class AppendTooSmall(UploadProblem):
    """An append below Upload-Limit's min-append-size that does not complete the upload (which
    -11 exempts). The draft registers no type for it."""

    code = "ERR_APPEND_TOO_SMALL"
    status, default_message = 400, "the append is smaller than min-append-size"


class InvalidatedUpload(UploadProblem):
    """Every request on an upload resource marked invalid: a body ran past its known length, and
    -11 says the server then rejects any further interaction with it. 410: the resource is known
    but not available any more. The draft registers no type for it (RFC 9457: about:blank, whose
    title is the status phrase; the reason is the detail)."""

    code = "ERR_UPLOAD_INVALID"
    status, default_message = 410, "the upload resource was invalidated: a request ran past its length"


class IdempotencyKeyInvalid(UploadProblem):
    """A malformed ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header: a String)."""

    code = "ERR_IDEMPOTENCY_KEY_INVALID"
    status, default_message = 400, "Idempotency-Key must be a Structured Field String"


class IdempotencyKeyReused(UploadProblem):
    """The key names an earlier creation that differs from this one (its fingerprint): 422, as
    the idempotency-key draft answers a key reused for another request."""

    code = "ERR_IDEMPOTENCY_KEY_REUSED"
    status, default_message = 422, "this Idempotency-Key was used for a different creation (its lengths differ)"


class IdempotencyKeyInUse(UploadProblem):
    """The first request with this key is still being processed: 409, as the idempotency-key draft says."""

    code = "ERR_IDEMPOTENCY_KEY_IN_USE"
    status, default_message = 409, "a request with this Idempotency-Key is still being processed; retry later"


class InterruptedUploadAppend(UploadProblem):
    """The draft's form of UploadInterrupted. 409, like its own mismatching-upload-offset: the
    request conflicts with another one for the resource, and the draft's answer to a conflict is
    offset retrieval, which is what this client must do. The draft registers no type for it."""

    code = "ERR_UPLOAD_INTERRUPTED"
    status, default_message = 409, "upload has been interrupted by another request for this upload resource"


class UploadRefused(TusError):
    """The upload was refused by what runs after the protocol (the finaliser): 415 for a type
    that is not accepted, 422 for a file that failed validation, 503 when storage failed; ``code``
    is the finaliser's (e.g. mime_type_not_allowed), for every audience to read as an attribute."""

    code = "file_refused"

    def __init__(
        self, status: int, message: str, headers: Mapping[str, str] | None = None, *, code: str | None = None
    ) -> None:
        super().__init__(message, headers)
        self.status = status
        if code is not None:
            self.code = code
