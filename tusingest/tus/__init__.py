"""The tus 1.0 protocol: headers, errors and one handler per method. Knows nothing of ArtStore."""

from tusingest.tus.server import PlainHooks, TusOptions, TusServer, UploadHooks

__all__ = ["PlainHooks", "TusOptions", "TusServer", "UploadHooks"]
