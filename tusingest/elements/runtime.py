"""The Storage Elements of a running node: the list as discovery reports it, the pool that
places files on them, and the timers that probe their health and sweep them of what killed
puts left. Built from an ElementSettings by ``StorageElements.from_settings``; app.py and the CLI
open and close it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from tusingest.elements.backend import Backend
from tusingest.elements.backends import open_backend
from tusingest.elements.discovery import ElementDiscovery
from tusingest.elements.model import StorageElement
from tusingest.elements.pool import ElementPool
from tusingest.elements.selection import Selector
from tusingest.elements.settings import ElementSettings, S3Settings

if TYPE_CHECKING:
    from tusingest.elements.s3 import S3ClientPool

log = logging.getLogger(__name__)


class StorageElements:
    def __init__(
        self,
        discovery: ElementDiscovery,
        pool: ElementPool,
        s3_clients: _S3Clients,
        health_interval: float,
        put_lifetime: float = 3600.0,
    ) -> None:
        self.discovery = discovery
        self.pool = pool
        self._s3_clients = s3_clients
        self._health_interval = health_interval
        # No put runs longer than its saga's timeout, and a taken-over saga waited a lease first:
        # what a put left that is older than both is garbage, also for other nodes' puts.
        self._put_lifetime = put_lifetime
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(cls, settings: ElementSettings) -> StorageElements:
        s3_clients = _S3Clients(settings.s3)

        def backend_for(element: StorageElement) -> Backend:
            return open_backend(element, settings.s3, s3_clients.get)

        pool = ElementPool(
            backend_for,
            selector=Selector(settings.selection_strategy),
            breaker_settings=settings.breaker,
            retry_attempts=settings.retry_attempts,
            retry_base_delay=settings.retry_base_delay,
            probe_timeout=settings.probe_timeout,
            datacenter=settings.datacenter,
        )
        discovery = ElementDiscovery.from_settings(settings.discovery, on_change=pool.apply)
        return cls(discovery, pool, s3_clients, settings.health_interval, put_lifetime=settings.put_lifetime)

    async def open(self, *, health_checks: bool = True) -> None:
        """Follow discovery; with health_checks (a serving node), also probe the elements and
        sweep them of unfinished puts, at start and then every put lifetime."""
        await self.discovery.start()
        self.pool.apply(self.discovery.current)
        if health_checks:
            self._tasks = [
                asyncio.create_task(self.pool.run_health_checks(self._health_interval), name="storage-element-health"),
                asyncio.create_task(
                    self.pool.run_sweeps(self._put_lifetime, interval=self._put_lifetime), name="storage-element-sweep"
                ),
            ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.discovery.close()
        await self.pool.close()
        await self._s3_clients.close()


class _S3Clients:
    """The S3 client pool, made when the first S3 element needs it: importing aiobotocore adds
    about 0.15 s to start-up (0.56 to 0.42 s for tusingest.app), which a node with directory
    elements only never pays."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        self._pool: S3ClientPool | None = None

    def get(self) -> S3ClientPool:
        if self._pool is None:
            from tusingest.elements.s3 import S3ClientPool

            self._pool = S3ClientPool.from_settings(self._settings)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
