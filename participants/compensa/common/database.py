"""Bounded waits on a database: a silent PostgreSQL makes callers fail within a
known time instead of hanging until their own deadline.

Shared by the participant SDK and the orchestrator's store. A database that
refuses connections fails at once; the hard case is one that goes silent (a
network that drops packets, a blackholed route): a connection attempt or a
query then waits forever unless something stops it. Each wait is bounded:

- connecting: `connect_bounded` gives up after the timeout;
- a query or a transaction: `abort_when_late` shuts the connection's socket
  down when it runs over, so the driver fails at once with a connection error
  (cancelling the coroutine instead would make psycopg try to cancel the query
  on the server first, over the same silent network, for up to 10 seconds);
- on the server's side, `statement_timeout` and
  `idle_in_transaction_session_timeout` end the work and release the locks of
  a client that went silent mid-transaction, so it cannot block the others.
  Statements are cancelled a little before the client gives up, so that a
  slow statement is answered (an error the database gave, not a lost
  database) rather than taken for silence;
- TCP keepalives and `tcp_user_timeout` let both ends notice a dead peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = [
    "DEFAULT_DATABASE_TIMEOUT",
    "DatabaseTimeout",
    "abort_when_late",
    "bounded_transaction",
    "cancelled_by_the_database",
    "connect_bounded",
    "connection_parameters",
    "engine_options",
]

#: The longest any one database wait may take, in seconds, unless configured:
#: connecting, a transaction, waiting for a pooled connection.
DEFAULT_DATABASE_TIMEOUT = 3.0


# The share of the timeout a statement may run on the server before it cancels it.
_STATEMENT_SHARE = 0.75


class DatabaseTimeout(TimeoutError):
    """The database did not answer in time (a TimeoutError, so an OSError:
    handled like any other connection failure)."""


def cancelled_by_the_database(error: BaseException) -> bool:
    """Whether `error` is a statement the database itself cancelled (its
    statement_timeout): then the database answered, it was not unreachable."""
    return isinstance(getattr(error, "orig", error), psycopg.errors.QueryCanceled)


def connection_parameters(timeout: float, *, options: str = "") -> dict[str, Any]:
    """libpq parameters bounding what PostgreSQL and the kernel can bound:
    statements and idle transactions end after `timeout` on the server, and a
    peer that stopped answering is noticed by TCP within about `timeout`.
    `options` are more `-c name=value` settings for the session."""
    milliseconds = max(1, round(timeout * 1000))
    statement_milliseconds = max(1, round(timeout * 1000 * _STATEMENT_SHARE))
    settings = (
        f"-c statement_timeout={statement_milliseconds} -c idle_in_transaction_session_timeout={milliseconds}"
    )
    return {
        # libpq's own bound (it has a 2s minimum); connect_bounded enforces `timeout` itself.
        "connect_timeout": max(2, math.ceil(timeout)),
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(timeout)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": milliseconds,
        "options": f"{settings} {options}".strip(),
    }


async def connect_bounded(
    conninfo: str, timeout: float, *, options: str = "", **kwargs: Any
) -> psycopg.AsyncConnection[Any]:
    """A psycopg connection, or DatabaseTimeout after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await psycopg.AsyncConnection.connect(
                conninfo, **connection_parameters(timeout, options=options), **kwargs
            )
    except TimeoutError:
        raise DatabaseTimeout(f"no connection to the database within {timeout:g}s") from None


#: The async driver used for a URL that names none.
_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}


def with_async_driver(url: str) -> str:
    """`url` with the async driver this uses when it names none:
    sqlite:///x.db is sqlite+aiosqlite:///x.db, postgresql://... is postgresql+psycopg://..."""
    scheme, separator, rest = url.partition("://")
    return f"{_ASYNC_DRIVERS[scheme]}://{rest}" if separator and scheme in _ASYNC_DRIVERS else url


def engine_options(url: str, timeout: float) -> dict[str, Any]:
    """create_async_engine options bounding connecting and waiting for a pooled
    connection by `timeout` (for PostgreSQL URLs; {} for others)."""
    if not url.startswith("postgresql"):
        return {}
    from sqlalchemy.engine import make_url

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await connect_bounded(conninfo, timeout)

    return {"async_creator": connect, "pool_timeout": timeout}


@contextlib.contextmanager
def abort_when_late(connection: object, timeout: float) -> Iterator[None]:
    """Shuts `connection`'s socket down if the block runs longer than `timeout`
    seconds; the driver then fails with a connection error, which leaves the
    block as DatabaseTimeout. Only psycopg connections have a socket to shut;
    for others this does nothing."""
    if not isinstance(connection, psycopg.AsyncConnection):
        yield
        return
    fired: list[bool] = []

    def shut_down() -> None:
        fired.append(True)
        _shut_down(connection)

    handle = asyncio.get_running_loop().call_later(timeout, shut_down)
    try:
        yield
    except Exception as error:
        if fired:
            raise DatabaseTimeout(f"no answer from the database within {timeout:g}s") from error
        raise
    finally:
        handle.cancel()


@contextlib.asynccontextmanager
async def bounded_transaction(engine: AsyncEngine, timeout: float) -> AsyncIterator[AsyncConnection]:
    """`engine.begin()` whose statements and commit together take at most
    `timeout` seconds (waiting for the connection is bounded by the engine's
    `engine_options`)."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        with abort_when_late(raw.driver_connection, timeout):
            async with conn.begin():
                yield conn


def _shut_down(connection: psycopg.AsyncConnection[Any]) -> None:
    if connection.closed:
        return
    try:
        descriptor = connection.pgconn.socket
    except psycopg.Error:
        return
    # A duplicate of the descriptor: shutting it down ends the connection for
    # every descriptor of the socket, and closing it closes only the copy.
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(descriptor)) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)
