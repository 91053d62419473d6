"""The read database (`serve --read-db`): a streaming standby of the primary
that answers the reads which tolerate a bounded lag, while it keeps up.

Its lag is measured in the background, not per read, and in a way that is
right when the primary is idle too: each check samples the primary's flushed
WAL position, then reads how far the standby has replayed. The standby shows
everything the primary had committed at the time of the latest sample whose
position it has replayed, so its lag is at most the time since that sample
(an idle primary's position does not move: the standby has it, lag about 0).
Past the bound, or when the standby fails, lag-tolerant reads go to the
primary (one WARNING), and come back once it is within half the bound again
(one INFO): half, so that a lag hovering at the bound does not flap.

Routing is by connection, not by statement: `lag_tolerant` marks the store's
methods that may read here, a caller opts in with the store's
`tolerating_lag()` block, and the store's `_transaction` opens the marked
method's transaction on the standby (context variables carry both), so no
query is written twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from compensa.common.database import (
    bounded_transaction,
    database_error_text,
    engine_options,
    parse_database_url,
)

log = logging.getLogger("compensa.store")

#: serve --read-db-max-lag's default, in seconds.
DEFAULT_MAX_LAG_SECONDS = 5.0
# The lag is checked this often (a quarter of the bound), but not more often
# than every 50 ms nor less often than every second.
_CHECKS_PER_BOUND = 4
_FASTEST_CHECK_SECONDS = 0.05
_SLOWEST_CHECK_SECONDS = 1.0

# Where the primary has flushed its WAL to: every acknowledged commit is
# before it, and a standby is sent nothing past it.
_PRIMARY_POSITION = "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint"
_STANDBY_POSITION = "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint"
# Recovery conflicts cancel a standby's query (serialization_failure,
# deadlock_detected): that read goes to the primary, the standby stays in use.
_RECOVERY_CONFLICTS = frozenset({"40001", "40P01"})


class ReadDatabase:
    """A streaming standby for lag-tolerant reads, with its health.

    `in_use` says whether such reads go to it now; `failed` takes it out of
    use after a read on it failed. The checks run from `start` to `close`."""

    def __init__(self, url: str, primary: AsyncEngine, *, max_lag: float, timeout: float) -> None:
        self.database = parse_database_url(url)
        if not self.database.is_postgres:
            raise ValueError("the read database is a PostgreSQL streaming standby: a postgresql+psycopg:// URL")
        self.max_lag = max_lag
        self.timeout = timeout
        self.engine: AsyncEngine = create_async_engine(
            self.database.engine_url, **engine_options(self.database, timeout), pool_size=5, max_overflow=5
        )
        self._primary = primary
        self.check_seconds = min(_SLOWEST_CHECK_SECONDS, max(_FASTEST_CHECK_SECONDS, max_lag / _CHECKS_PER_BOUND))
        #: Whether lag-tolerant reads go to the standby now.
        self.in_use = False
        #: The lag last measured, in seconds (NaN: unknown, it could not be measured).
        self.lag = math.nan
        # The first verdict is logged whichever it is; later ones only when they change.
        self._judged = False
        # (monotonic time, primary's flushed position), oldest first.
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts checking its lag in the background (once; from a running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._check_forever(), name="compensa-read-database-lag")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.engine.dispose()

    def failed(self, error: BaseException) -> None:
        """A read on it failed; it was retried on the primary. Out of use until
        a check finds it within the bound again, unless the read only lost a
        recovery conflict."""
        sqlstate = getattr(getattr(error, "orig", error), "sqlstate", None)
        if sqlstate in _RECOVERY_CONFLICTS:
            log.debug("read database cancelled a read (recovery conflict); read on the primary")
            return
        self._out_of_use(f"a read on it failed ({database_error_text(error)})")

    async def _check_forever(self) -> None:
        while True:
            began = time.monotonic()
            try:
                lag = await self._measure()
            except _NotAStandby as error:
                self.lag = math.nan
                self._out_of_use(str(error))
            except Exception as error:  # every way it can fail means the same: do not read there
                self.lag = math.nan
                self._out_of_use(f"its lag could not be measured ({database_error_text(error)})")
            else:
                if lag is None:
                    # Behind every sample, and they are younger than the bound
                    # (the first checks): how far behind is not known yet.
                    self.lag = math.nan
                elif lag > self.max_lag:
                    self.lag = lag
                    self._out_of_use(f"it lags {lag:.1f}s, past the bound of {self.max_lag:g}s (--read-db-max-lag)")
                else:
                    self.lag = lag
                    if lag <= self.max_lag / 2 or self.in_use:
                        self._into_use(lag)
            await asyncio.sleep(max(0.0, self.check_seconds - (time.monotonic() - began)))

    async def _measure(self) -> float | None:
        """Seconds the standby is behind the primary at most (see the module),
        or at least when it has not replayed even the oldest sample kept;
        None when that oldest sample is not as old as the bound: not known."""
        sampled_at = time.monotonic()
        async with bounded_transaction(self._primary, self.timeout) as conn:
            position = int((await conn.execute(sa.text(_PRIMARY_POSITION))).scalar_one())
        self._samples.append((sampled_at, position))
        async with bounded_transaction(self.engine, self.timeout) as conn:
            recovering, replayed = (await conn.execute(sa.text(_STANDBY_POSITION))).one()
        now = time.monotonic()
        if not recovering:
            raise _NotAStandby("it is not a standby (not in recovery): promoted, or not a replica")
        # Samples older than twice the bound say no more than "past the bound".
        while len(self._samples) > 1 and self._samples[0][0] < now - 2 * self.max_lag:
            self._samples.popleft()
        caught_up_to = [at for at, sampled in self._samples if sampled <= int(replayed)]
        if caught_up_to:
            return now - caught_up_to[-1]
        at_least = now - self._samples[0][0]
        return at_least if at_least > self.max_lag else None

    def _out_of_use(self, why: str) -> None:
        if self.in_use or not self._judged:
            log.warning("read database %s is not used: %s; lag-tolerant reads go to the primary",
                        self.database.shown, why)
        else:
            log.debug("read database %s still not used: %s", self.database.shown, why)
        self.in_use = False
        self._judged = True

    def _into_use(self, lag: float) -> None:
        if not self.in_use:
            log.info("read database %s is used for lag-tolerant reads (lag %.1fs, bound %gs)",
                     self.database.shown, lag, self.max_lag)
        self.in_use = True
        self._judged = True

    def __repr__(self) -> str:
        return f"ReadDatabase({self.database.shown!r}, in_use={self.in_use})"


class _NotAStandby(Exception):
    """The read database answers, but is not a standby in recovery."""


class LagTolerance:
    """A `tolerating_lag` block: the read database its reads may go to, until
    one finds it out of use; from then on the block reads on the primary,
    so that no read in it is older than one before it."""

    def __init__(self, read_database: ReadDatabase | None) -> None:
        self._read_database = read_database

    def read_database(self) -> ReadDatabase | None:
        if self._read_database is not None and not self._read_database.in_use:
            self._read_database = None
        return self._read_database

    def give_up(self) -> None:
        self._read_database = None


#: Set by a store's `tolerating_lag` for its block.
lag_tolerated: ContextVar[LagTolerance | None] = ContextVar("compensa_lag_tolerated", default=None)
#: Set by `lag_tolerant` while its read runs on the read database: there
#: `_transaction` opens its transaction.
reading_on: ContextVar[ReadDatabase | None] = ContextVar("compensa_reading_on", default=None)

_Read = TypeVar("_Read", bound=Callable[..., Awaitable[Any]])


def lag_tolerant(read: _Read) -> _Read:
    """Marks a method of a SQL store that only reads, whose answer may be up
    to the read database's lag bound old: in a `tolerating_lag` block it runs
    on the read database while that is in use. A read that fails there is
    made again on the primary (the read database is then out of use until
    its lag is checked good again)."""

    @functools.wraps(read)
    async def routed(self: Any, *args: Any, **kwargs: Any) -> Any:
        tolerance = lag_tolerated.get()
        read_database = tolerance.read_database() if tolerance is not None else None
        if tolerance is None or read_database is None or reading_on.get() is not None:
            return await read(self, *args, **kwargs)
        reading = reading_on.set(read_database)
        try:
            return await read(self, *args, **kwargs)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError, psycopg.Error, OSError) as error:
            read_database.failed(error)
            tolerance.give_up()
        finally:
            reading_on.reset(reading)
        return await read(self, *args, **kwargs)

    return cast(_Read, routed)
