"""The durable saga log, files registry and transactional outbox, and the one saga runner (saga.runner) that the
upload, delete and transfer sagas (in finalise/) run on."""

from tusingest.saga.records import FileRecord, NewOutboxMessage, OutboxMessage, Saga, SagaState
from tusingest.saga.store import (
    DuplicateFile,
    DuplicateSaga,
    SagaNotFound,
    SagaOwnershipLost,
    SagaStore,
    SagaStoreError,
)

__all__ = [
    "DuplicateFile",
    "DuplicateSaga",
    "FileRecord",
    "NewOutboxMessage",
    "OutboxMessage",
    "Saga",
    "SagaNotFound",
    "SagaOwnershipLost",
    "SagaState",
    "SagaStore",
    "SagaStoreError",
]
