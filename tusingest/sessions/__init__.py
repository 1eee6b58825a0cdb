"""Upload state: the Upload model, the SessionStore protocol and its implementations."""

from tusingest.sessions.model import Upload, UploadKind, UploadState
from tusingest.sessions.store import SessionStore

__all__ = ["SessionStore", "Upload", "UploadKind", "UploadState"]
