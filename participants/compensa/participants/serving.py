"""Serving a participant of your own: its database engine, a gRPC server with
health and reflection, and a process that runs until SIGINT or SIGTERM.

    from compensa.participants import Participant, create_participant_engine, serve

    class Billing(Participant):
        ...

    asyncio.run(serve(Billing(create_participant_engine(DATABASE_URL)), listen="0.0.0.0:50070"))

What stops a start, rather than being retried, raises a `ServingError` with a
one-line reason (`compensa` prints it and exits 2): a port another process
listens on (`AddressInUse`), and a database that cannot work as configured
(`DatabaseMisconfigured`: it does not exist, the login is refused, a SQLite
file's directory is missing, a URL that is not one). A database that does not
answer yet (connection refused while PostgreSQL starts) is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from compensa.common import tracing
from compensa.common.database import (
    DATABASE_URL_FORMS,
    DEFAULT_DATABASE_TIMEOUT,
    engine_options,
    parse_database_url,
)
from compensa.common.health import DEFAULT_PROBE_SECONDS, DatabaseHealth
from compensa.common.serving import GRPC_SERVER_OPTIONS, ensure_sqlite_directory, listen_on
from compensa.common.startup import (
    AddressInUse,
    DatabaseMisconfigured,
    ServingError,
    ensure_address_free,
    first_line,
    permanent_database_problem,
    wait_for_database,
)
from compensa.common.tls import TlsFiles
from compensa.participants.audit import BarrierAudit
from compensa.participants.retention import DEFAULT_PURGE_BATCH, purge_below_watermark
from compensa.participants.sdk import Participant
from compensa.participants.typed import TypedParticipant
from compensa.v1 import barrier_audit_pb2, barrier_audit_pb2_grpc, participant_pb2, participant_pb2_grpc

__all__ = [
    "GRPC_SERVER_OPTIONS",
    "AddressInUse",
    "DatabaseMisconfigured",
    "RunningParticipant",
    "ServingError",
    "create_participant_engine",
    "ensure_address_free",
    "ensure_sqlite_directory",
    "first_line",
    "listen_on",
    "permanent_database_problem",
    "serve",
    "start_server",
]

logger = logging.getLogger(__name__)

_SERVICE_NAME: str = participant_pb2.DESCRIPTOR.services_by_name["ParticipantService"].full_name
_AUDIT_SERVICE_NAME: str = barrier_audit_pb2.DESCRIPTOR.services_by_name["BarrierAuditService"].full_name

#: The exit status of a process whose participant cannot start (as `compensa`'s for any error).
_EXIT_CANNOT_START = 2

#: How long a SQLite writer waits for the database lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000

def create_participant_engine(database_url: str, *, database_timeout: float = DEFAULT_DATABASE_TIMEOUT) -> AsyncEngine:
    """An async engine for `database_url` (postgresql+psycopg:// or sqlite+aiosqlite://;
    postgresql:// and sqlite:// get those drivers).

    A PostgreSQL URL may name several hosts, in any form libpq or SQLAlchemy
    takes (`compensa.common.database.parse_database_url`): with
    `target_session_attrs=read-write`, connections go to whichever is the
    primary. Raises DatabaseMisconfigured for a URL that is not one of those,
    or a SQLite file whose directory does not exist.

    On PostgreSQL, connecting and waiting for a pooled connection each take at
    most `database_timeout` seconds, and the server ends statements and idle
    transactions after that long (`compensa.common.database`).

    SQLite
    connections use WAL and a busy timeout, and every transaction starts with
    BEGIN IMMEDIATE: writers then queue on the database lock from their first
    statement, so concurrent duplicate calls serialise instead of failing with
    "database is locked", and SAVEPOINTs work.
    """
    database = parse_database_url(database_url)
    ensure_sqlite_directory(database_url)
    try:
        engine = create_async_engine(database.engine_url, **engine_options(database, database_timeout))
    except (
        sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.InvalidRequestError,
        ValueError, ImportError,
    ) as error:
        raise DatabaseMisconfigured(
            f"--db {database.shown!r} is not a database URL this can use ({first_line(error)}); {DATABASE_URL_FORMS}"
        ) from None
    if engine.dialect.name == "sqlite":
        sync_engine = engine.sync_engine

        @sqlalchemy.event.listens_for(sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Stop the driver from issuing its own BEGIN; see "begin" below.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

        @sqlalchemy.event.listens_for(sync_engine, "begin")
        def _on_begin(conn: sqlalchemy.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    elif engine.dialect.name != "postgresql":
        raise DatabaseMisconfigured(
            f"--db {database_url!r}: {engine.dialect.name} is not supported; use postgresql+psycopg:// or sqlite+aiosqlite://"
        )
    return engine


async def create_schema_when_reachable(participant: Participant) -> None:
    """Creates `participant`'s tables, waiting while its database does not
    answer; DatabaseMisconfigured when it never will."""
    await wait_for_database(
        participant.create_schema,
        unreachable=(
            sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError, OSError
        ),
        logger=logger,
    )


@dataclass
class RunningParticipant:
    """A participant being served; `address` is "host:port" to dial."""

    participant: Participant
    server: grpc.aio.Server
    port: int
    address: str
    engine: AsyncEngine
    health: health.aio.HealthServicer
    #: What health answers: NOT_SERVING while the database cannot be reached.
    database_health: DatabaseHealth
    #: Deletes barrier rows below the purge watermark (None: not asked to).
    purging: asyncio.Task[None] | None = None

    async def stop(self, grace: float | None = 0.5) -> None:
        """Reports NOT_SERVING, stops the server (letting calls finish for `grace`
        seconds) and disposes of the engine."""
        if self.purging is not None:
            self.purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.purging
        await self.health.enter_graceful_shutdown()
        await self.database_health.stop()
        await self.server.stop(grace)
        await self.engine.dispose()


async def start_server(
    participant: Participant,
    *,
    listen: str = "127.0.0.1:0",
    tls: TlsFiles | None = None,
    health_probe_seconds: float = DEFAULT_PROBE_SECONDS,
    purge_interval: float | None = None,
    purge_batch_size: int = DEFAULT_PURGE_BATCH,
) -> RunningParticipant:
    """Serves `participant` on `listen` once its schema exists; returns once listening.

    Port 0 picks a free port, reported in the result. Health (grpc.health.v1)
    answers for "" and for compensa.v1.ParticipantService: SERVING while the
    participant's database answers, NOT_SERVING from the first call or probe
    (every `health_probe_seconds` without a call) that could not reach it
    until one does again, each change logged once. Server reflection is
    enabled, and lists the contract service of a participant on generated
    stubs (its contract, read by `compensa participants set NAME ADDRESS
    --contract-from-reflection`). BarrierAuditService is served too (`compensa.participants.audit`);
    with `purge_interval` (seconds), barrier rows below the purge watermark
    the orchestrator set are deleted that often, `purge_batch_size` per
    transaction (`compensa.participants.retention`); without it, nothing is
    ever deleted. With `tls` it serves TLS only (mutual when `tls.ca` is set). A
    database that does not answer yet is waited for (see the module docstring
    for what raises instead). The participant's engine is disposed of when the
    result is stopped, or here if the server cannot start.
    """
    engine = participant.engine
    server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
    try:
        credentials = tls.server_credentials if tls is not None else None
        # The port first: a second copy of a participant stops here, before
        # it touches the database.
        port = listen_on(server, listen, credentials)
        await create_schema_when_reachable(participant)
        participant_pb2_grpc.add_ParticipantServiceServicer_to_server(participant, server)
        barrier_audit_pb2_grpc.add_BarrierAuditServiceServicer_to_server(BarrierAudit(participant), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                _SERVICE_NAME, _AUDIT_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME, *_contract_services(participant),
            ),
            server,
        )
        database_health = DatabaseHealth(
            health_servicer, ("", _SERVICE_NAME), name=f"{type(participant).__name__} on port {port}", logger=logger
        )
        # The schema was just created: the database answered, no probe is due yet.
        database_health.succeeded()
        participant.database_health = database_health
        await server.start()
        await database_health.ready()
        database_health.probe_every(health_probe_seconds, participant.ping)
    except BaseException:
        await server.stop(None)
        await engine.dispose()
        raise
    host = listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    address = f"{host}:{port}"
    logger.info(
        "%s listening on %s (faults: %s)", type(participant).__name__, address, participant.faults.describe() or "none"
    )
    purging = (
        asyncio.create_task(_purge_every(participant, purge_interval, purge_batch_size), name="compensa-barrier-purge")
        if purge_interval is not None
        else None
    )
    return RunningParticipant(
        participant=participant, server=server, port=port, address=address, engine=engine, health=health_servicer,
        database_health=database_health, purging=purging,
    )


def _contract_services(participant: Participant) -> tuple[str, ...]:
    """The contract service of a participant on generated stubs, listed by
    reflection so that the orchestrator can read the contract from here
    (`compensa participants set NAME ADDRESS --contract-from-reflection`).
    Its rpcs are not served: the calls come through ParticipantService."""
    if isinstance(participant, TypedParticipant) and participant.contract:
        return (participant.contract,)
    return ()


async def _purge_every(participant: Participant, interval: float, batch_size: int) -> None:
    """Deletes barrier rows below the purge watermark every `interval` seconds, until cancelled."""
    while True:
        try:
            deleted = await purge_below_watermark(
                participant.engine, participant.barrier, participant.barrier_watermark,
                batch_size=batch_size, timeout=participant.database_timeout,
            )
            await participant.refresh_purge_watermark()
        except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
            logger.warning("barrier purge: %s; trying again in %.0fs", first_line(error), interval)
        else:
            if deleted:
                logger.info("barrier purge: deleted %d row(s) below the purge watermark", deleted)
        await asyncio.sleep(interval)


async def serve(
    participant: Participant,
    *,
    listen: str,
    tls: TlsFiles | None = None,
    grace: float = 5.0,
    health_probe_seconds: float = DEFAULT_PROBE_SECONDS,
    purge_interval: float | None = None,
    purge_batch_size: int = DEFAULT_PURGE_BATCH,
) -> None:
    """Serves `participant` on `listen` until SIGINT or SIGTERM, then stops,
    letting calls in flight finish for `grace` seconds. See `start_server`.

    Meant to be the whole of a participant's process: when it cannot start
    (a `ServingError`: a taken port, a database that cannot work as
    configured) it prints that one line (``error: ...``) on stderr and ends
    the process with status 2 (SystemExit), as `compensa` does, rather than
    with a traceback. `start_server` raises instead."""
    try:
        running = await start_server(
            participant, listen=listen, tls=tls, health_probe_seconds=health_probe_seconds,
            purge_interval=purge_interval, purge_batch_size=purge_batch_size,
        )
    except ServingError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(_EXIT_CANNOT_START) from None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
        logger.info("%s on %s stopping", type(participant).__name__, running.address)
        await running.stop(grace=grace)
        tracing.shutdown()  # sends the spans still buffered
