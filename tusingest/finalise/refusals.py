"""The one refusal type below the HTTP layers: what the domain will not do, with the code and the
status the client is told (as tusd's ``NewError("ERR_MISMATCHED_OFFSET", ..., http.StatusConflict)``).

The finaliser's rejections (``pipeline.FileRejected``) and the refusals given before a delete or
transfer saga starts (below, and in delete.py and transfer.py) are all ``Refused``. The HTTP faces
map it in one place each: api/errors.py for /api, api/finaliser.py (``UploadRefused`` with the
``ArtStore-Error`` header) for tus."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tusingest.sessions.audit import Action, AuditEvent, Outcome

AuditRecorder = Callable[[AuditEvent], Awaitable[None]]  # SessionStore.record_audit


class Refused(Exception):
    """A request refused, or a file rejected; ``status`` and ``code`` are what the client is told.
    Subclasses fix both as class attributes; a one-off refusal passes them."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class FileNotFound(Refused):
    status = 404
    code = "file_not_found"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"no file {file_id} in the registry")


async def not_owner(
    record_audit: AuditRecorder | None, subject: str, name: str, address: str | None, file_id: str
) -> FileNotFound:
    """Somebody else's file is answered as an unknown one (invariant 7); the refusal goes to the audit log."""
    if record_audit is not None:
        refusal = AuditEvent(
            Action.REFUSED, Outcome.REFUSED, subject, name or None, address, file_id=file_id, reason="not_owner"
        )
        await record_audit(refusal)
    return FileNotFound(file_id)


class StorageElementUnknown(Refused):
    """The file's element is not in the current element list, so nothing can be done with it now."""

    status = 409
    code = "storage_element_unknown"

    def __init__(self, file_id: str, element_id: str) -> None:
        super().__init__(f"file {file_id} is on storage element {element_id}, which is not in the element list")


class TransferInProgress(Refused):
    status = 409
    code = "transfer_in_progress"

    def __init__(self, file_id: str, transfer_id: str) -> None:
        super().__init__(f"transfer {transfer_id} of file {file_id} is still running")
        self.transfer_id = transfer_id


class DeleteInProgress(Refused):
    status = 409
    code = "delete_in_progress"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"file {file_id} is being deleted")
