"""Server plumbing both sides share: the options of every gRPC server here,
binding a port with a one-line error, and a SQLite file's directory checked
before anything connects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import sqlalchemy

from compensa.common.startup import DatabaseMisconfigured, ServingError, ensure_address_free

__all__ = ["GRPC_SERVER_OPTIONS", "MAX_WAITING_CALLS", "ensure_sqlite_directory", "listen_on"]

#: Calls gRPC's C core holds for a server before its event loop picks them up.
#: By default it refuses some at random past 1,000 waiting and all past 3,000,
#: and the caller sees CANCELLED with no message, as if it had given up itself:
#: 2,000 callers at once were enough. Overload is the server's to answer (the
#: orchestrator refuses starts over its bound with RESOURCE_EXHAUSTED and a
#: retry delay), so the queue is bounded only against a flood: about 12 KB
#: each while they wait, measured.
MAX_WAITING_CALLS = 10_000

#: Options of every gRPC server here. gRPC sets SO_REUSEPORT by default, so a
#: second process on a taken port would start serving too and the kernel would
#: split new connections between the two; with it off, the second is refused.
GRPC_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", MAX_WAITING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_WAITING_CALLS),
)


def listen_on(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds `server` (made with GRPC_SERVER_OPTIONS) to `listen`; the port.

    Raises AddressInUse when another process listens there, ServingError when
    the address cannot be bound for another reason."""
    ensure_address_free(listen)
    try:
        port: int = (
            server.add_secure_port(listen, credentials) if credentials is not None else server.add_insecure_port(listen)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        # Taken between the check and the bind, or not an address of this host.
        ensure_address_free(listen)
        raise ServingError(f"cannot listen on {listen}: not an address of this host, or not allowed")
    return port


def ensure_sqlite_directory(database_url: str) -> None:
    """Raises DatabaseMisconfigured if `database_url` names a SQLite file in a
    directory that does not exist (connecting would fail, and nothing should
    create directories a typo named)."""
    try:
        url = sqlalchemy.engine.make_url(database_url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return  # create_async_engine says what is wrong with it
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    directory = Path(url.database).parent
    if not directory.is_dir():
        raise DatabaseMisconfigured(
            f"database: the directory of the SQLite file {url.database} does not exist; create it or check --db"
        )
