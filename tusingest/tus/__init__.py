"""The tus 1.0 protocol: headers, errors and one handler per method. Knows nothing of ArtStore."""

from tusingest.tus.server import CompletionHook, TusOptions, TusServer

__all__ = ["CompletionHook", "TusOptions", "TusServer"]
