"""A server's grpc.health.v1 status that follows its database.

Shared by the participant SDK's servers and the orchestrator. A server that
cannot reach its database cannot do its work, so a load balancer or a
readiness probe should stop sending it calls: `DatabaseHealth` answers
NOT_SERVING from the first failed database wait (a real call's or a probe's)
and SERVING again from the first one that succeeds. It logs the loss once and
the return once, however many calls fail in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from grpc_health.v1 import health, health_pb2

from compensa.common.database import database_error_text

__all__ = ["DEFAULT_PROBE_SECONDS", "DatabaseHealth"]

#: How often the database is probed when no real work has reached it lately.
DEFAULT_PROBE_SECONDS = 1.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseHealth:
    """Keeps `services` of a health servicer in step with whether the database
    answers, once `ready` was called (NOT_SERVING before: still starting).

    `failed` and `succeeded` are cheap and synchronous, for every database
    wait to report its outcome; only a change of state costs anything.
    """

    def __init__(
        self, servicer: health.aio.HealthServicer, services: Sequence[str], *, name: str, logger: logging.Logger
    ) -> None:
        self._servicer = servicer
        self._services = tuple(services)
        self._name = name
        self._log = logger
        self._ready = False
        self._reachable = True
        self._lost_at = 0.0
        self._last_success = 0.0
        self._changed = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        """Whether the last database wait succeeded."""
        return self._reachable

    async def ready(self) -> None:
        """The server is started: from now on its status follows the database."""
        self._ready = True
        await self._publish()
        self._publisher = asyncio.create_task(self._publish_changes(), name=f"{self._name}-health")

    def failed(self, error: BaseException) -> None:
        """A database wait failed because the database could not be reached."""
        if not self._reachable:
            return
        self._reachable = False
        self._lost_at = time.monotonic()
        self._log.warning("%s lost its database: %s", self._name, database_error_text(error))
        self._changed.set()

    def succeeded(self) -> None:
        """A database wait succeeded."""
        self._last_success = time.monotonic()
        if self._reachable:
            return
        self._reachable = True
        self._log.info("%s reached its database again after %.1fs", self._name, self._last_success - self._lost_at)
        self._changed.set()

    def probe_every(self, interval: float, ping: Callable[[], Awaitable[None]]) -> None:
        """Runs `ping` (which reports its own outcome) whenever `interval`
        seconds passed without any database wait succeeding."""
        self._prober = asyncio.create_task(self._probe(interval, ping), name=f"{self._name}-probe")

    async def stop(self) -> None:
        """Stops probing and publishing (the caller reports shutdown itself)."""
        tasks = [task for task in (self._prober, self._publisher) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _probe(self, interval: float, ping: Callable[[], Awaitable[None]]) -> None:
        while True:
            quiet = time.monotonic() - self._last_success
            if quiet < interval:
                await asyncio.sleep(interval - quiet)
                continue
            try:
                await ping()
            except Exception as error:  # reported by the ping itself; never stop probing
                self._log.debug("%s: database probe failed: %s", self._name, database_error_text(error))
                await asyncio.sleep(interval)

    async def _publish_changes(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._publish()

    async def _publish(self) -> None:
        if not self._ready:
            return
        status = _SERVING if self._reachable else _NOT_SERVING
        for service in self._services:
            await self._servicer.set(service, status)
