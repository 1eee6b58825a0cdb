"""The `tusingest` command: serve, migrate, cleanup."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Annotated

import typer

from tusingest.config import Settings, SettingsError, load_settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="tusingest: the ArtStore Ingester (tus 1.0).")


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (PORT).")] = None,
) -> None:
    """Serve the tus endpoint, health probes and API."""
    settings = _settings(host=host, port=port)
    _configure_logging(settings)
    import uvloop

    try:
        uvloop.run(_serve(settings))
    except StartupError as exc:
        typer.echo(f"tusingest cannot start: {exc}", err=True)
        raise typer.Exit(1) from None


class StartupError(Exception):
    pass


async def _serve(settings: Settings) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve

    from tusingest.app import build_app
    from tusingest.serving import hypercorn_config
    from tusingest.sessions import open_session_store
    from tusingest.sessions.store import StoreError

    # Refuse to start on a store we cannot use, with the store's own words (e.g. "run tusingest migrate").
    probe = open_session_store(settings.database_url)
    try:
        await probe.open()
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    finally:
        await probe.close()

    app = build_app(settings)
    config = hypercorn_config(settings)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        logging.getLogger("tusingest").info("shutting down: in-flight uploads commit what they received")
        app.state.parts.locker.request_release_all()

    logging.getLogger("tusingest").info("tusingest listening on http://%s:%d", settings.host, settings.port)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]


@cli.command()
def migrate() -> None:
    """Create or upgrade the PostgreSQL schema (alembic upgrade head)."""
    settings = _settings()
    if settings.database_url.startswith("sqlite:"):
        typer.echo("SQLite needs no migration: its schema is created when the service starts.")
        return
    from tusingest.sessions.migrations import upgrade

    upgrade(settings.database_url)
    typer.echo("database is at the latest schema revision")


@cli.command()
def cleanup() -> None:
    """Expire uploads idle for longer than UPLOAD_SESSION_TTL_HOURS and delete their staged bytes."""
    settings = _settings()
    _configure_logging(settings)

    async def run() -> None:
        from tusingest.app import build_parts
        from tusingest.sessions.expiry import expire_uploads

        parts = build_parts(settings)
        await parts.store.open()
        try:
            # On PostgreSQL the locker sees the serving nodes' locks, so uploads being written are skipped.
            await parts.locker.open()
            try:
                report = await expire_uploads(parts.store, parts.staging, parts.locker)
            finally:
                await parts.locker.close()
        finally:
            await parts.store.close()
        typer.echo(f"expired {report.expired} upload(s); {report.skipped_busy} busy")

    asyncio.run(run())


def main() -> None:
    cli()
