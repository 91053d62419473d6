"""A server's grpc.health.v1 status that follows its database.

Shared by the participant SDK's servers and the orchestrator. A server that
cannot reach its database cannot do its work, so a load balancer or a
readiness probe should stop sending it calls: `DatabaseHealth` answers
NOT_SERVING from the first failed database wait (a real call's or a probe's)
and SERVING again from the first one that succeeds. It logs the loss once and
the return once, however many calls fail in between. A wait tells only of
the time after it began: one that began before the return and failed after
it belongs to the outage that ended (a call that queued for a connection
during it), and one that began before the loss and succeeded after it does
not end the outage.

A database can also answer reads and refuse every write, for a reason that
does not pass by itself (out of space, a read-only standby, a permission
taken away): `refused` starts an outage that reads succeeding do not end;
only a write that succeeds does (the probe writes while it lasts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2

from compensa.common.database import database_error_text

__all__ = ["DEFAULT_PROBE_SECONDS", "UNREACHABLE_REASON", "DatabaseHealth", "DatabaseLoss"]

#: How often the database is probed when no real work has reached it lately.
DEFAULT_PROBE_SECONDS = 1.0

#: The reason of an outage in which the database could not be reached.
UNREACHABLE_REASON = "DATABASE_UNAVAILABLE"

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class DatabaseLoss:
    """The start of an outage, or its turn into a refusal of writes."""

    #: A stable reason: UNREACHABLE_REASON, or why writes are refused (e.g. DATABASE_FULL).
    reason: str
    #: Whether only a write that succeeds ends it.
    refuses_writes: bool
    #: What the failed wait met, for a person.
    detail: str


class DatabaseHealth:
    """Keeps `services` of a health servicer in step with whether the database
    answers (and takes writes), once `ready` was called (NOT_SERVING before:
    still starting). `on_loss` hears of each outage's start, and of an
    outage's turn into a refusal of writes.

    `failed`, `refused` and `succeeded` are cheap and synchronous, for every
    database wait to report its outcome; only a change of state costs anything.
    """

    def __init__(
        self, servicer: health.aio.HealthServicer, services: Sequence[str], *, name: str, logger: logging.Logger,
        on_loss: Callable[[DatabaseLoss], None] | None = None,
    ) -> None:
        self._servicer = servicer
        self._services = tuple(services)
        self._name = name
        self._log = logger
        self._on_loss = on_loss
        self._ready = False
        # When the current outage began (None: no outage) and whether only a write ends it.
        self._lost_at: float | None = None
        self._refusing = False
        self._returned_at = 0.0
        self._last_success = 0.0
        self._changed = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        """Whether the database answers and takes writes (no outage now)."""
        return self._lost_at is None

    async def ready(self) -> None:
        """The server is started: from now on its status follows the database."""
        self._ready = True
        await self._publish()
        self._publisher = asyncio.create_task(self._publish_changes(), name=f"{self._name}-health")

    def failed(self, error: BaseException, *, began: float | None = None) -> None:
        """A database wait that began at `began` (time.monotonic()) failed
        because the database could not be reached."""
        if not self._stale(began):
            self._lose(DatabaseLoss(UNREACHABLE_REASON, False, database_error_text(error)))

    def refused(self, reason: str, detail: str, *, began: float | None = None) -> None:
        """The database answered a wait that began at `began` but refused to
        write, for `reason` (a stable name such as DATABASE_FULL)."""
        if not self._stale(began):
            self._lose(DatabaseLoss(reason, True, detail))

    def succeeded(self, *, began: float | None = None) -> None:
        """A database wait that began at `began` succeeded (a refusal of
        writes outlives it, and so does an outage that began after it)."""
        self._last_success = time.monotonic()
        if self._lost_at is None or self._refusing or (began is not None and began < self._lost_at):
            return
        self._return()

    def wrote(self) -> None:
        """A write succeeded: whatever the outage, it is over."""
        self._last_success = time.monotonic()
        if self._lost_at is not None:
            self._return()

    def probe_every(
        self, interval: float, ping: Callable[[], Awaitable[None]],
        write: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Runs `ping` (which reports its own outcome) whenever `interval`
        seconds passed without any database wait succeeding; while writes
        are refused, runs `write` every `interval` instead (a write that
        succeeds ends the outage)."""
        self._prober = asyncio.create_task(self._probe(interval, ping, write), name=f"{self._name}-probe")

    async def stop(self) -> None:
        """Stops probing and publishing (the caller reports shutdown itself)."""
        tasks = [task for task in (self._prober, self._publisher) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stale(self, began: float | None) -> bool:
        return began is not None and began < self._returned_at

    def _lose(self, loss: DatabaseLoss) -> None:
        if self._lost_at is not None:
            if loss.refuses_writes and not self._refusing:
                self._refusing = True
                self._log.warning("%s: its database refuses writes: %s (%s)", self._name, loss.detail, loss.reason)
                self._tell(loss)
            return
        self._lost_at = time.monotonic()
        self._refusing = loss.refuses_writes
        if self._ready:  # before, the start-up says it waits for the database, or why it stops
            self._log.warning("%s lost its database: %s (%s)", self._name, loss.detail, loss.reason)
        self._tell(loss)
        self._changed.set()

    def _tell(self, loss: DatabaseLoss) -> None:
        if self._on_loss is not None:
            self._on_loss(loss)

    def _return(self) -> None:
        assert self._lost_at is not None
        self._returned_at = time.monotonic()
        if self._ready:
            self._log.info(
                "%s reached its database again after %.1fs", self._name, self._returned_at - self._lost_at
            )
        self._lost_at = None
        self._refusing = False
        self._changed.set()

    async def _probe(
        self, interval: float, ping: Callable[[], Awaitable[None]], write: Callable[[], Awaitable[None]] | None
    ) -> None:
        while True:
            refusing = self._refusing
            quiet = time.monotonic() - self._last_success
            if not (refusing and write is not None) and quiet < interval:
                await asyncio.sleep(interval - quiet)
                continue
            try:
                if write is not None and refusing:
                    await write()
                    self.wrote()
                    continue
                await ping()
                continue
            except Exception as error:  # reported by the probe itself; never stop probing
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
        status = _SERVING if self._lost_at is None else _NOT_SERVING
        for service in self._services:
            await self._servicer.set(service, status)
