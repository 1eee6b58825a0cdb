"""Observability: Prometheus metrics, OpenTelemetry traces and structured logs (docs/operations.md).

A layer beside elements, sessions and auth: every layer above may record into it; it imports
nothing of theirs and receives its settings from app.py."""
