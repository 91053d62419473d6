"""Why a server cannot start: the errors that stop it with one line (a
taken port, a database that will never work as configured), and how to tell
them from what is worth waiting for. Light on imports: the CLI catches these."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
from collections.abc import Awaitable, Callable

from compensa.common.retry import Backoff

__all__ = [
    "DATABASE_START_BACKOFF",
    "AddressInUse",
    "DatabaseMisconfigured",
    "ServingError",
    "ensure_address_free",
    "first_line",
    "permanent_database_problem",
    "wait_for_database",
]

#: How a server starting up waits for its database to answer.
DATABASE_START_BACKOFF = Backoff(initial=0.2, cap=5.0)

# libpq and SQLite messages of a database that will not work however long we
# wait; anything else (connection refused, the database system is starting up,
# a host name not resolvable yet) is transient.
_PERMANENT_DATABASE_PROBLEMS = re.compile(
    r'database "[^"]*" does not exist|role "[^"]*" does not exist|password authentication failed'
    r"|authentication failed|no pg_hba\.conf entry|no password supplied|unable to open database file"
    r"|invalid dsn|invalid connection option|invalid (?:integer )?value for parameter",
    re.IGNORECASE,
)


class ServingError(Exception):
    """A server cannot start; the message is one line saying why and what to check."""


class AddressInUse(ServingError):
    """Another process listens on the address."""


class DatabaseMisconfigured(ServingError):
    """The database cannot work as configured; waiting will not help."""


def permanent_database_problem(error: BaseException) -> str | None:
    """The one-line reason `error` (or an error it was raised from) is a
    database problem waiting will not fix; None if it may be transient."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    # The driver's own error first: its message is the shortest that says it.
    for cause in reversed(chain):
        text = str(cause)
        match = _PERMANENT_DATABASE_PROBLEMS.search(text)
        if match is not None:
            return _line_of(text, match.start())
    return None


def first_line(error: BaseException) -> str:
    """`error`'s message up to its first line break, for one-line logs."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _line_of(text: str, offset: int) -> str:
    start = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    line = text[start:end if end >= 0 else None].strip()
    # libpq: 'connection to server at "h", port 5432 failed: FATAL:  database "x" does not exist'
    return re.sub(r"\s+", " ", line.rpartition("FATAL:")[2].strip() if "FATAL:" in line else line)


def ensure_address_free(listen: str) -> None:
    """Raises AddressInUse if a process listens on `listen` (HOST:PORT) already.

    Checked before gRPC binds, which would otherwise log its own multi-line
    complaint; port 0 always passes."""
    host, _, port_text = listen.rpartition(":")
    if not port_text.isdigit() or int(port_text) == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return  # gRPC reports an address it cannot resolve
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise AddressInUse(f"address in use: {listen} (another process listens there)") from None


async def wait_for_database(
    attempt: Callable[[], Awaitable[None]],
    *,
    unreachable: tuple[type[BaseException], ...],
    logger: logging.Logger,
) -> None:
    """Runs `attempt` until it passes, waiting with backoff (and a one-line
    warning per try) while it fails with one of `unreachable`. Raises
    DatabaseMisconfigured when the failure is one waiting will not fix."""
    waits = DATABASE_START_BACKOFF.waits()
    while True:
        try:
            await attempt()
            return
        except unreachable as error:
            problem = permanent_database_problem(error)
            if problem is not None:
                raise DatabaseMisconfigured(f"database: {problem}; check --db") from None
            delay = waits.next()
            logger.warning("database not reachable (%s); retrying in %.1fs", first_line(error), delay)
        await asyncio.sleep(delay)
