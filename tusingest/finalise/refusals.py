"""The refusals a client is given before a delete or transfer saga starts (the sagas run on saga.runner)."""

from __future__ import annotations


class Refused(Exception):
    """A request the saga will not start; ``status`` and ``code`` are what the client is told."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FileNotFound(Refused):
    status = 404
    code = "file_not_found"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"no file {file_id} in the registry")


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
