"""How tusingest runs on Hypercorn: one Config for the CLI and the tests alike."""

from __future__ import annotations

from hypercorn.config import Config

from tusingest.config import Settings

# Hypercorn reads a socket 64 KiB at a time and has no setting for it. Large PATCH bodies
# cost a loop iteration, a queue hand-off and an ASGI message per read: 512 KiB reads cut
# that eightfold. At most max_app_queue_size reads wait per connection, which bounds memory.
SOCKET_READ_BYTES = 512 << 10


def tune_hypercorn() -> None:
    import hypercorn.asyncio.tcp_server as tcp_server

    if not hasattr(tcp_server, "MAX_RECV"):
        raise RuntimeError("this Hypercorn has no tcp_server.MAX_RECV: check SOCKET_READ_BYTES in tusingest/serving.py")
    tcp_server.MAX_RECV = SOCKET_READ_BYTES


def hypercorn_config(settings: Settings, bind: str | None = None) -> Config:
    tune_hypercorn()
    config = Config()
    config.bind = [bind or f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None
    config.errorlog = "-"
    config.max_app_queue_size = 8
    return config
