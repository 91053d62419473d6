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

Also the one reading of a database URL (`parse_database_url`), so that the
orchestrator and the participant SDK accept the same forms, several hosts
included, and refuse the same in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.conninfo
import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.common.startup import DatabaseMisconfigured

__all__ = [
    "DEFAULT_DATABASE_TIMEOUT",
    "DatabaseTimeout",
    "DatabaseUrl",
    "abort_when_late",
    "bounded_transaction",
    "cancelled_by_the_database",
    "connect_bounded",
    "connection_parameters",
    "database_error_text",
    "engine_options",
    "parse_database_url",
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


#: The forms of --db, for messages that refuse one.
DATABASE_URL_FORMS = (
    "use postgresql+psycopg://USER@HOST[:PORT]/DATABASE (several hosts: USER@HOST1:PORT1,HOST2:PORT2/DATABASE"
    " or ?host=HOST1:PORT1&host=HOST2:PORT2) or sqlite+aiosqlite:///FILE"
)
_PASSWORD_IN_URL = re.compile(r"(://[^:/@?#]*:)[^@/?#]*@")
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&]*")


@dataclass(frozen=True)
class DatabaseUrl:
    """A database URL read once: what SQLAlchemy is given, and for PostgreSQL
    the libpq connection string every connection is made from (all hosts)."""

    #: The URL as given, its password hidden: for messages and logs.
    shown: str
    #: The URL SQLAlchemy's engine is made from (it picks the dialect; on
    #: PostgreSQL every connection comes from `conninfo` instead).
    engine_url: URL
    #: libpq's keyword/value string with every host and port; None for SQLite.
    conninfo: str | None

    @property
    def is_postgres(self) -> bool:
        return self.conninfo is not None


def parse_database_url(url: str) -> DatabaseUrl:
    """Reads `url` in every form a user of SQLAlchemy or libpq writes:
    postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE?OPTIONS, with several
    hosts as libpq's list (USER@H1:P1,H2:P2/DATABASE), as SQLAlchemy's repeated
    parameter (?host=H1:P1&host=H2:P2, ports optional) or as libpq's parameters
    (?host=H1,H2&port=P1,P2); other libpq parameters (target_session_attrs=
    read-write, say) pass through. sqlite+aiosqlite:///FILE as SQLAlchemy reads it.

    DatabaseMisconfigured, one line naming the forms that work, for anything
    else (an unknown scheme, a port that is not a number...)."""
    url = with_async_driver(url)
    shown = _PASSWORD_PARAMETER.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", url))
    scheme, separator, _ = url.partition("://")
    try:
        if not separator or not scheme:
            raise ValueError("it has no scheme://")
        backend = scheme.partition("+")[0]
        if backend in ("postgresql", "postgres"):
            conninfo, engine_url = _postgres_parts(url, scheme)
            return DatabaseUrl(shown, engine_url, conninfo)
        if backend == "sqlite":
            return DatabaseUrl(shown, make_url(url), None)
        raise ValueError(f"{scheme}:// is not a database this can use")
    except (ValueError, sqlalchemy.exc.ArgumentError, psycopg.ProgrammingError) as error:
        raise DatabaseMisconfigured(
            f"--db {shown!r} is not a database URL this can use ({_one_line(str(error))}); {DATABASE_URL_FORMS}"
        ) from None


def _postgres_parts(url: str, scheme: str) -> tuple[str, URL]:
    """libpq's connection string for a PostgreSQL URL, and the single-host
    URL that makes SQLAlchemy's engine."""
    address, _, query = url.partition("?")
    hosts: list[tuple[str, str]] = []
    kept: list[str] = []
    for part in query.split("&") if query else ():
        name, _, value = part.partition("=")
        host = urllib.parse.unquote(value)
        if name == "host" and host and "," not in host:
            hosts.append(_host_and_port(host))
        else:
            kept.append(part)  # as written: libpq reads it
    # libpq reads the host list of the address itself; a repeated ?host= it
    # would reduce to the last one, so those are joined here.
    libpq_url = "postgresql://" + address.partition("://")[2] + (f"?{'&'.join(kept)}" if kept else "")
    params = psycopg.conninfo.conninfo_to_dict(libpq_url)
    if hosts:
        default_port = str(params.get("port") or "")
        if "," in default_port:
            raise ValueError("give ports with their hosts (?host=HOST:PORT) or as ?host=H1,H2&port=P1,P2, not both")
        params["host"] = ",".join(host for host, _ in hosts)
        params["port"] = ",".join(port or default_port for _, port in hosts)
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    first_host = str(params.get("host") or "").split(",")[0] or None
    first_port = str(params.get("port") or "").split(",")[0]
    engine_url = URL.create(
        scheme if scheme.startswith("postgresql") else "postgresql" + scheme[len("postgres"):],
        username=str(params.get("user") or "") or None,
        host=first_host if first_host and not first_host.startswith("/") else None,
        port=int(first_port) if first_port else None,
        database=str(params.get("dbname") or "") or None,
    )
    return psycopg.conninfo.make_conninfo("", **params), engine_url


def _host_and_port(entry: str) -> tuple[str, str]:
    """One ?host= value: HOST, HOST:PORT, [IPv6]:PORT or a socket directory."""
    if entry.startswith("/"):
        return entry, ""
    if entry.startswith("["):
        host, _, after = entry[1:].partition("]")
        return host, after.removeprefix(":")
    host, colon, port = entry.rpartition(":")
    if not colon or ":" in host:  # no port, or a bare IPv6 address
        return entry, ""
    return host, port


def _one_line(text: str) -> str:
    return " ".join(text.split())


def database_error_text(error: BaseException) -> str:
    """A database error in one line, as the driver told it: without
    SQLAlchemy's wrapping (its statement and its "Background on this error"
    link) and with libpq's lines (one per host tried) joined."""
    cause = getattr(error, "orig", None) if isinstance(error, sqlalchemy.exc.DBAPIError) else None
    shown = cause if isinstance(cause, BaseException) else error
    return f"{type(shown).__name__}: {_one_line(str(shown))}" if str(shown).strip() else type(shown).__name__


def engine_options(database: DatabaseUrl, timeout: float) -> dict[str, Any]:
    """create_async_engine options bounding connecting and waiting for a pooled
    connection by `timeout` (for PostgreSQL; {} for SQLite). Every connection
    is made from the URL's libpq string, so all its hosts are tried."""
    conninfo = database.conninfo
    if conninfo is None:
        return {}

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
