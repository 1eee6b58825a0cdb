"""Upload state: the Upload model, the SessionStore protocol and its implementations."""

from tusingest.sessions.model import Upload, UploadKind, UploadState
from tusingest.sessions.store import SessionStore, open_session_store

__all__ = ["SessionStore", "Upload", "UploadKind", "UploadState", "open_session_store"]
