"""tusingest: the ArtStore Ingester, a tus 1.0 resumable-upload server."""

__version__ = "0.1.0"
