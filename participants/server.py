"""Serving a checkout participant: its database engine, gRPC server, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from compensa.v1 import participant_pb2, participant_pb2_grpc
from participants import tracing
from participants.faults import FaultPlan
from participants.tls import TlsFiles
from participants.fraud import FraudParticipant
from participants.inventory import InventoryParticipant
from participants.payment import PaymentParticipant
from participants.sdk import Participant
from participants.shipping import ShippingParticipant

__all__ = [
    "PARTICIPANT_KINDS",
    "RunningParticipant",
    "build_participant",
    "create_participant_engine",
    "serve_participant",
    "start_participant",
    "start_server",
]

logger = logging.getLogger(__name__)

#: The kinds of participant `build_participant` knows.
PARTICIPANT_KINDS = ("inventory", "fraud", "payment", "shipping")

_SERVICE_NAME: str = participant_pb2.DESCRIPTOR.services_by_name["ParticipantService"].full_name

#: How long a SQLite writer waits for the database lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_participant_engine(database_url: str) -> AsyncEngine:
    """An async engine for `database_url` (postgresql+psycopg:// or sqlite+aiosqlite://).

    SQLite connections use WAL and a busy timeout, and every transaction starts
    with BEGIN IMMEDIATE: writers then queue on the database lock from their
    first statement, so concurrent duplicate calls serialise instead of failing
    with "database is locked", and SAVEPOINTs work.
    """
    engine = create_async_engine(database_url)
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

    return engine


def build_participant(kind: str, engine: AsyncEngine, *, faults: FaultPlan | None = None) -> Participant:
    """The participant servicer of `kind` (one of PARTICIPANT_KINDS) on `engine`.

    Raises ValueError for an unknown kind.
    """
    if kind == "inventory":
        return InventoryParticipant(engine, faults=faults)
    if kind == "fraud":
        return FraudParticipant(engine, faults=faults)
    if kind == "payment":
        return PaymentParticipant(engine, faults=faults)
    if kind == "shipping":
        return ShippingParticipant(engine, faults=faults)
    raise ValueError(f"unknown participant kind {kind!r} (known: {', '.join(PARTICIPANT_KINDS)})")


@dataclass
class RunningParticipant:
    """A participant being served; `address` is "host:port" to dial."""

    participant: Participant
    server: grpc.aio.Server
    port: int
    address: str
    engine: AsyncEngine
    health: health.aio.HealthServicer

    async def stop(self, grace: float | None = 0.5) -> None:
        """Reports NOT_SERVING, stops the server (letting calls finish for `grace`
        seconds) and disposes of the engine."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.engine.dispose()


async def start_participant(
    kind: str,
    database_url: str,
    *,
    listen: str = "127.0.0.1:0",
    faults: FaultPlan | None = None,
    tls: TlsFiles | None = None,
) -> RunningParticipant:
    """Creates the schema and starts serving participant `kind` (one of
    PARTICIPANT_KINDS) from `database_url` on `listen`; see `start_server`."""
    engine = create_participant_engine(database_url)
    try:
        participant = build_participant(kind, engine, faults=faults)
    except BaseException:
        await engine.dispose()
        raise
    return await start_server(participant, listen=listen, tls=tls)


async def start_server(
    participant: Participant, *, listen: str = "127.0.0.1:0", tls: TlsFiles | None = None
) -> RunningParticipant:
    """Creates `participant`'s schema and serves it on `listen`; returns once listening.

    Port 0 picks a free port, reported in the result. Health (grpc.health.v1)
    answers SERVING for "" and for compensa.v1.ParticipantService; server
    reflection is enabled. With `tls` it serves TLS only (mutual when `tls.ca`
    is set). The participant's engine is disposed of when the result is
    stopped, or here if the server cannot start.
    """
    engine = participant.engine
    server = grpc.aio.server()
    try:
        credentials = tls.server_credentials if tls is not None else None
        await participant.create_schema()
        participant_pb2_grpc.add_ParticipantServiceServicer_to_server(participant, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        port: int = (
            server.add_secure_port(listen, credentials) if credentials is not None else server.add_insecure_port(listen)
        )
        if port == 0:
            raise OSError(f"cannot listen on {listen!r}")
        for service in ("", _SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
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
    return RunningParticipant(
        participant=participant, server=server, port=port, address=address, engine=engine, health=health_servicer
    )


async def serve_participant(
    kind: str, *, listen: str, database_url: str, faults: FaultPlan | None = None, tls: TlsFiles | None = None
) -> None:
    """Serves participant `kind` until SIGINT or SIGTERM, then stops gracefully."""
    running = await start_participant(kind, database_url, listen=listen, faults=faults, tls=tls)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        logger.info("%s participant on %s stopping", kind, running.address)
        await running.stop(grace=5.0)
        tracing.shutdown()
