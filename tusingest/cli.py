"""The `tusingest` command: serve, migrate, cleanup, elements, audit, upload."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import re
import signal
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
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
    from tusingest.observability.logs import LogSettings, configure

    configure(LogSettings(level=settings.log_level, format=settings.log_format))


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (PORT).")] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Serve without authentication beyond loopback.")
    ] = False,
) -> None:
    """Serve the tus endpoint, health probes and API."""
    settings = _settings(host=host, port=port)
    _configure_logging(settings)
    import uvloop

    from tusingest.app import auth_settings
    from tusingest.auth import refuse_unauthenticated_bind

    # No key means everybody is the anonymous admin: only this machine may be everybody.
    refusal = refuse_unauthenticated_bind(settings.host, auth_settings(settings), insecure_no_auth=insecure_no_auth)
    if refusal is not None:
        typer.echo(f"tusingest: {refusal}", err=True)
        raise typer.Exit(2)

    try:
        listener = _listen(settings.host, settings.port)
    except OSError as exc:
        # One line, exit 2 (a setting the operator must change), before anything says it listens.
        reason = "the address is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        typer.echo(f"tusingest cannot listen on {settings.host}:{settings.port}: {reason}", err=True)
        raise typer.Exit(2) from None
    try:
        uvloop.run(_serve(settings, listener))
    except StartupError as exc:
        typer.echo(f"tusingest cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if listener.fileno() != -1:  # not handed to Hypercorn (the start failed before it)
            listener.close()


class StartupError(Exception):
    pass


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts, so that a port in use is one clear error
    instead of Hypercorn's traceback after the service said it listens. Hypercorn serves it (fd://)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=1024)
    listener.set_inheritable(True)
    return listener


async def _migrate_sqlite_in_child(database_url: str) -> None:
    """A SQLite file that is new or behind is migrated by a child Python before the server opens it, so the
    server never loads alembic. If the child fails, the store's own open migrates here and says why not."""
    from tusingest.config import database_engine
    from tusingest.sessions import migrations

    if database_engine(database_url) != "sqlite" or migrations.sqlite_at_head(database_url):
        return
    await asyncio.to_thread(Path(migrations.sqlite_path(database_url)).parent.mkdir, parents=True, exist_ok=True)
    if (problem := await migrations.upgrade_in_child(database_url)) is not None:
        logging.getLogger("tusingest").warning("migrating the SQLite file in a child process failed: %s", problem)


async def _serve(settings: Settings, listener: socket.socket) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve

    from tusingest.app import build_app, open_database
    from tusingest.auth import AuthConfigError
    from tusingest.serving import hypercorn_config, runtime_warning, tune_malloc
    from tusingest.sessions.store import StoreError

    await _migrate_sqlite_in_child(settings.database_url)
    # Refuse to start on a store we cannot use, with the store's own words (e.g. "run tusingest migrate").
    probe = open_database(settings.database_url).sessions
    try:
        await probe.open()
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    finally:
        await probe.close()

    try:
        app = build_app(settings)
    except AuthConfigError as exc:
        raise StartupError(str(exc)) from None
    config = hypercorn_config(settings, bind=f"fd://{listener.fileno()}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        logging.getLogger("tusingest").info("shutting down: in-flight uploads commit what they received")
        app.state.parts.locker.request_release_all()
        app.state.parts.progress.end_streams()  # live-progress streams end; their clients reconnect

    if (advice := runtime_warning()) is not None:
        logging.getLogger("tusingest").warning(advice)
    logging.getLogger("tusingest").info("tusingest listening on http://%s:%d", settings.host, settings.port)
    # What start-up built (modules, the app, ~150,000 objects) lives as long as the process: out of the
    # collector's sight, a full collection while serving walks only what requests made (~140 ms fewer
    # each, about one per 800 small uploads). Here, not in the app's lifespan: tests build many apps.
    gc.freeze()
    tune_malloc()
    try:
        await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    finally:
        listener.detach()  # Hypercorn owns the descriptor and has closed it


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (alembic upgrade head), PostgreSQL or SQLite.

    `tusingest serve` upgrades an SQLite file by itself; PostgreSQL nodes refuse to start until this ran.
    """
    settings = _settings()
    from tusingest.sessions.migrations import MigrationsNotFound, upgrade

    try:
        upgrade(settings.database_url)
    except MigrationsNotFound as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo("database is at the latest schema revision")


@cli.command()
def cleanup() -> None:
    """Expire uploads idle for longer than UPLOAD_SESSION_TTL_HOURS and delete their staged bytes; purge
    outbox messages delivered more than OUTBOX_RETENTION_DAYS ago."""
    settings = _settings()
    _configure_logging(settings)

    async def run() -> None:
        from tusingest.app import build_parts, free_partials, purge_outbox
        from tusingest.sessions.expiry import expire_uploads

        parts = build_parts(settings)
        await parts.store.open()
        try:
            # The saga store tells whether a final upload's saga still reads its partials' bytes.
            await parts.saga_store.open()
            try:
                # On PostgreSQL the locker sees the serving nodes' locks, so uploads being written are skipped.
                await parts.locker.open()
                try:
                    report = await expire_uploads(parts.store, parts.staging, parts.locker)
                    partials = await free_partials(parts)
                finally:
                    await parts.locker.close()
                purged = await purge_outbox(parts)
            finally:
                await parts.saga_store.close()
        finally:
            await parts.store.close()
        typer.echo(
            f"expired {report.expired} upload(s); {report.skipped_busy} busy; freed {partials} partial upload(s); "
            f"purged {purged} delivered message(s)"
        )

    asyncio.run(run())


@cli.command()
def elements(
    url: Annotated[
        str | None, typer.Option(help="A running node's base URL (default: http://HOST:PORT of the settings).")
    ] = None,
    local: Annotated[bool, typer.Option("--local", help="Do not ask a running node; probe the elements here.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the Storage Elements: mode, fill, health and circuit-breaker state."""
    import json

    settings = _settings()
    report = None if local else _node_elements(url or f"http://{settings.host}:{settings.port}")
    if report is None:
        report = asyncio.run(_probe_elements_here(settings))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_elements(report)


def _node_elements(base_url: str) -> dict[str, object] | None:
    """The running node's view (with its breaker states), or None when no node answers."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/health/elements", timeout=5) as response:
            report: dict[str, object] = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    report["from"] = base_url
    return report


async def _probe_elements_here(settings: Settings) -> dict[str, object]:
    from dataclasses import asdict

    from tusingest.app import element_settings
    from tusingest.elements.runtime import StorageElements

    storage = StorageElements.from_settings(element_settings(settings))
    await storage.open(health_checks=False)
    try:
        await storage.pool.probe_all()
        return {
            "from": "this process (no running node answered; breaker states are this probe's only)",
            "version": storage.pool.version,
            "source": storage.discovery.source,
            "discovery_connected": storage.discovery.connected,
            "storage_elements": [asdict(row) for row in storage.pool.statuses()],
        }
    finally:
        await storage.close()


@cli.command()
def audit(
    since: Annotated[
        str, typer.Option(help="From when: an ISO 8601 time (UTC unless it says otherwise) or an age: 30m, 1h, 2d.")
    ],
    until: Annotated[str | None, typer.Option(help="Up to when (excluded), in the same forms.")] = None,
    subject: Annotated[str | None, typer.Option(help="Only this subject's events (the token's sub).")] = None,
    upload: Annotated[str | None, typer.Option(help="Only the events of this upload id.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many events, oldest first.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object a line instead of a table.")] = False,
) -> None:
    """Show the audit log: every upload created, completed, failed or terminated, every file deleted or
    transferred, and every refused authorization, read from DATABASE_URL's audit_events table."""
    import json

    settings = _settings()
    try:
        start, end = _when(since), None if until is None else _when(until)
    except ValueError as exc:
        typer.echo(f"tusingest audit: {exc}", err=True)
        raise typer.Exit(2) from None

    async def run() -> list[dict[str, object]]:
        from tusingest.app import open_database

        store = open_database(settings.database_url).sessions
        await store.open()
        try:
            events = await store.list_audit(start, end, limit, subject=subject, upload_id=upload)
        finally:
            await store.close()
        return [event.fields() for event in events]

    try:
        rows = asyncio.run(run())
    except Exception as exc:  # the store's errors say what is wrong with the database
        typer.echo(f"tusingest audit: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False, sort_keys=True))
    else:
        _print_audit(rows)


_AGE = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _when(text: str, now: datetime | None = None) -> datetime:
    """A point in time from the command line: ``30m``/``1h``/``2d`` ago, or ISO 8601 (naive means UTC)."""
    value = text.strip()
    if (age := _AGE.fullmatch(value)) is not None:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[age[2]]: int(age[1])})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO 8601 time (2026-12-01T00:00) nor an age (30m, 1h, 2d)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _print_audit(rows: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Audit log ({len(rows)} event(s))")
    columns = ("at", "action", "outcome", "subject", "client_address", "upload_id", "file_id", "element_ids", "reason")
    for column in columns:
        table.add_column(column)
    for row in rows:
        cells = [row.get(column) for column in columns]
        table.add_row(*("" if c is None else ",".join(c) if isinstance(c, list) else str(c) for c in cells))
    Console().print(table)


def _print_elements(report: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = report.get("storage_elements")
    table = Table(title=f"Storage Elements (list version {report.get('version')}, from {report.get('source')})")
    for column in ("id", "backend", "mode", "status", "priority", "fill", "health", "breaker"):
        table.add_column(column)
    for row in rows if isinstance(rows, list) else []:
        table.add_row(
            str(row["element_id"]),
            str(row["backend"]),
            str(row["mode"]),
            str(row["status"]),
            str(row["priority"]),
            _fill(row["used_bytes"], row["capacity_bytes"]),
            _health(row),
            str(row["breaker"]),
        )
    console = Console()
    console.print(table)
    console.print(f"[dim]asked: {report.get('from')}[/dim]")


def _fill(used: int, capacity: int | None) -> str:
    gib = 1 << 30
    if capacity is None:
        return f"{used / gib:.1f} GiB / unbounded"
    percent = 100 * used / capacity if capacity else 100.0
    return f"{used / gib:.1f} / {capacity / gib:.1f} GiB ({percent:.0f}%)"


def _health(row: dict[str, object]) -> str:
    if row.get("healthy") is None:
        return "not probed yet"
    if row["healthy"]:
        return f"ok {row['latency_ms']} ms"
    return f"failing: {row.get('last_error')}"


@cli.command()
def upload(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders (folders recursively).", show_default=False)],
    endpoint: Annotated[str, typer.Option(help="The tus endpoint, e.g. http://host:8000/files/.", show_default=False)],
    token: Annotated[
        str | None, typer.Option(envvar="TUSINGEST_TOKEN", help="Bearer token (TUSINGEST_TOKEN).", show_default=False)
    ] = None,
    chunk_size: Annotated[str, typer.Option(help="Bytes per PATCH, e.g. 8MiB, 512KiB.")] = "8MiB",
    jobs: Annotated[int, typer.Option(min=1, help="Files uploaded at once.")] = 2,
    parallel: Annotated[
        int, typer.Option(min=1, help="Parts of one file sent at once (when the server offers concatenation).")
    ] = 1,
    include: Annotated[list[str] | None, typer.Option(help="Glob a file in a folder must match (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of files in folders to skip (repeatable).")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="Upload-Metadata key=value (repeatable).")] = None,
    retries: Annotated[int, typer.Option(min=0, help="Further attempts of a failed step before a file fails.")] = 8,
    state_file: Annotated[
        Path, typer.Option(help="Where unfinished uploads are remembered, to resume them on the next run.")
    ] = Path("~/.cache/tusingest/uploads.json"),
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per line, no progress bars.")] = False,
) -> None:
    """Upload files to a tus 1.0 server, resumably; exit 1 when any file failed (one line per file says why)."""
    from tusingest.client.command import parse_metadata, parse_size, run
    from tusingest.client.uploader import UploadSettings

    try:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint {endpoint!r} is not an http:// or https:// URL")
        settings = UploadSettings(
            endpoint=endpoint,
            chunk_size=parse_size(chunk_size),
            token=token or None,
            metadata=parse_metadata(metadata or []),
            retries=retries,
            parallel=parallel,
        )
    except ValueError as exc:
        typer.echo(f"tusingest upload: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        code = asyncio.run(
            run(
                paths,
                settings,
                include=include or [],
                exclude=exclude or [],
                jobs=jobs,
                state_file=state_file,
                json_lines=json_lines,
            )
        )
    except KeyboardInterrupt:
        typer.echo("tusingest upload: interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def main() -> None:
    cli()
