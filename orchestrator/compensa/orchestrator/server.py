"""The orchestrator process: gRPC server, health, reflection and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
from dataclasses import dataclass

import grpc
import sqlalchemy
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from compensa.common.database import parse_database_url, with_async_driver
from compensa.common.health import DatabaseHealth
from compensa.common.serving import GRPC_SERVER_OPTIONS, ensure_sqlite_directory, listen_on
from compensa.common.startup import DatabaseMisconfigured, ServingError, first_line, wait_for_database
from compensa.common.tls import TlsConfigError
from compensa.orchestrator.api.service import OrchestratorService, service_handler
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.dashboard import RunningDashboard, start_dashboard
from compensa.orchestrator.definitions import load_definitions
from compensa.orchestrator.engine.auditor import AuditRunner
from compensa.orchestrator.engine.bulk import BulkRunner
from compensa.orchestrator.engine.engine import SagaEngine
from compensa.orchestrator.shared import payloads
from compensa.orchestrator.shared.errors import CompensaError, DatabaseRefusesWrites, StoreUnavailable
from compensa.orchestrator.store import open_store
from compensa.v1 import orchestrator_pb2

log = logging.getLogger("compensa.server")

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


@dataclass
class RunningOrchestrator:
    """A started orchestrator; `address` is where clients connect."""

    config: ServerConfig
    server: grpc.aio.Server
    engine: SagaEngine
    service: OrchestratorService
    health: health.aio.HealthServicer
    # What health answers: NOT_SERVING while the database cannot be reached.
    database_health: DatabaseHealth
    port: int
    address: str
    # Where /metrics is served, if it is.
    metrics_port: int | None = None
    # The web dashboard, if it is served.
    dashboard: RunningDashboard | None = None
    #: Works on bulk actions once the engine runs.
    bulk: BulkRunner | None = None
    #: Runs audit jobs once the engine runs.
    audits: AuditRunner | None = None
    #: Done once the database is reached and the engine started; holds the
    #: exception of a start-up that cannot succeed (e.g. a schema to migrate).
    ready: asyncio.Future[None] | None = None

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stops taking calls, stops driving sagas and releases their leases."""
        if self.ready is not None and not self.ready.done():
            self.ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ready
        await self.health.enter_graceful_shutdown()
        await self.database_health.stop()
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.server.stop(grace)
        await self.service.stop()
        if self.bulk is not None:
            await self.bulk.stop()
        if self.audits is not None:
            await self.audits.stop()
        await self.engine.stop()
        await self.engine.store.close()
        self.engine.metrics.close()


async def _set_serving(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def _follow_database(database_health: DatabaseHealth, error: BaseException | None, began: float) -> None:
    """Tells `database_health` the outcome of a database wait that began at `began`."""
    if error is None:
        database_health.succeeded(began=began)
    elif isinstance(error, DatabaseRefusesWrites):
        database_health.refused(error.reason, str(error), began=began)
    else:
        database_health.failed(error, began=began)


async def _wait_for_database(
    running: RunningOrchestrator, definitions: list, *, api_open: bool  # type: ignore[type-arg]
) -> None:
    """Checks the schema (creating it in an empty database) and registers
    definitions once the database answers, then reports SERVING and starts
    driving sagas. Only an unreachable database is waited for: any other
    failure ends the start-up, and a database that will never work as
    configured raises DatabaseMisconfigured."""

    async def prepare() -> None:
        await running.engine.store.ensure_schema()
        await running.engine.sync_clock()
        await running.engine.load_secrets()
        await running.engine.store_participants(
            running.config.participants, updated_by=f"serve --participant ({running.config.replica_id})"
        )
        for definition in definitions:
            registration = await running.engine.register_definition(
                definition, source="definitions", actor=f"serve --definitions ({running.config.replica_id})"
            )
            if registration.created:
                stored = registration.definition
                log.info("registered definition %s version %d", stored.name, stored.version)

    await wait_for_database(prepare, unreachable=(StoreUnavailable,), logger=log)
    running.engine.start()
    running.engine.store.check_read_database()
    running.bulk = BulkRunner(running.engine)
    running.bulk.start()
    engine = running.engine
    running.audits = AuditRunner(
        engine.store, engine.owner, lease_seconds=engine.config.lease_seconds,
        participant_tls=engine.config.participant_tls, commit_lag=engine.config.database_timeout,
        metrics=engine.metrics,
    )
    running.audits.start()
    await running.database_health.ready()
    store = running.engine.store
    running.database_health.probe_every(running.config.health_probe_seconds, store.ping, store.probe_writes)
    # Said once it serves: a start that fails shows only what stopped it.
    if api_open:
        log.warning(
            "the API is open: every caller may start, cancel, retry and resolve sagas and register definitions"
            " (give roles with --operator/--role and client certificates, or --tokens FILE)"
        )
    log.info("orchestrator %s serving on %s", running.config.replica_id, running.address)


def _read_database_url(config: ServerConfig, url: str) -> str | None:
    """--read-db with its driver, checked against --db (`url`): both PostgreSQL."""
    if not config.read_database_url:
        return None
    if not parse_database_url(url).is_postgres:
        raise DatabaseMisconfigured(
            "--read-db needs a PostgreSQL --db: a read database is a streaming standby of it, and SQLite has none"
        )
    read_url = with_async_driver(config.read_database_url)
    if not parse_database_url(read_url).is_postgres:
        raise DatabaseMisconfigured(
            f"--read-db {parse_database_url(read_url).shown!r} is not a PostgreSQL URL: a read database is a"
            " streaming standby of --db (postgresql+psycopg://USER@HOST/DATABASE)"
        )
    return read_url


async def start_orchestrator(config: ServerConfig, *, wait_ready: bool = True) -> RunningOrchestrator:
    """Starts listening at once (health NOT_SERVING), then becomes SERVING
    when the database is reachable. Definition files are validated first:
    a bad file raises DefinitionError before anything starts."""
    # TLS files first: one that cannot be read stops the start before anything
    # is created (the credentials are kept; the engine's client reuses them).
    credentials = config.tls.server_credentials if config.tls is not None else None
    if config.operators and (config.tls is None or config.tls.ca is None):
        raise TlsConfigError("operators are named by their client certificates: --operator needs --tls-client-ca")
    if config.certificate_roles and (config.tls is None or config.tls.ca is None):
        raise TlsConfigError("roles are given to client certificates: --role needs --tls-client-ca")
    access = config.access_policy()
    if config.participant_tls is not None:
        _ = config.participant_tls.channel_credentials
    payloads.import_proto_modules(config.proto_modules)
    definitions = load_definitions(config.definition_paths) if config.definition_paths else []
    url = config.resolved_database_url()
    if not config.database_url:
        log.info("no --db: sagas are kept in the embedded SQLite database %s (give --db URL for another)",
                 url.partition(":///")[2])
    read_url = _read_database_url(config, url)
    ensure_sqlite_directory(url)
    partition_urls = config.resolved_partition_urls()
    try:
        store = open_store(
            url, notifier=config.replica_id, timeout=config.database_timeout, read_url=read_url,
            read_max_lag=config.read_max_lag_seconds, partition_urls=partition_urls,
        )
    except (
        ValueError, ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError,
        sqlalchemy.exc.InvalidRequestError,
    ) as error:
        raise DatabaseMisconfigured(
            f"--db {url!r} is not a database URL this can use ({first_line(error)}); "
            "use postgresql+psycopg://USER@HOST/DATABASE or sqlite+aiosqlite:///FILE"
        ) from None
    engine = SagaEngine(store, config.engine_config())
    if read_url is not None:
        engine.metrics.read_database(store.read_database_status)
    limit = config.max_payload_bytes * 4
    server = grpc.aio.server(
        options=[
            *GRPC_SERVER_OPTIONS, ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)
        ]
    )
    settings = config.service_settings()
    service = OrchestratorService(engine, settings, access)
    server.add_generic_rpc_handlers((service_handler(service),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await _set_serving(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    database_health = DatabaseHealth(
        health_servicer, ("", SERVICE_NAME), name=f"orchestrator {config.replica_id}", logger=log,
        on_loss=engine.database_lost,
    )
    store.subscribe_reachability(functools.partial(_follow_database, database_health))
    dashboard = None
    try:
        port = listen_on(server, config.listen, credentials)
        # Before serving: a metrics or dashboard port that is taken stops the start here.
        metrics_port = engine.metrics.serve(config.metrics_listen, config.tls) if config.metrics_listen else None
        if config.http_listen:
            dashboard = await start_dashboard(
                config.http_listen, engine, service.logs, access, service.stream_limit, service.refused_calls,
                config.tls, live_buffer_events=settings.watch_buffer_events,
            )
            log.info("dashboard at %s", dashboard.url)
    except BaseException:
        await server.stop(None)
        engine.metrics.close()
        await store.close()
        raise
    await server.start()
    host = config.listen.rpartition(":")[0]
    address = f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"
    running = RunningOrchestrator(
        config, server, engine, service, health_servicer, database_health, port, address, metrics_port, dashboard
    )
    running.ready = asyncio.ensure_future(_wait_for_database(running, definitions, api_open=access.open))
    if wait_ready:
        try:
            await running.ready
        except BaseException:
            await running.stop()
            raise
    return running


async def _wait_set(event: asyncio.Event) -> None:
    await event.wait()


async def serve(config: ServerConfig) -> None:
    """Runs an orchestrator until SIGINT or SIGTERM; raises (after stopping)
    if it cannot start, e.g. its database will never work as configured."""
    running = await start_orchestrator(config, wait_ready=False)
    assert running.ready is not None
    # Everything loaded at start-up lives as long as the process: keep it out
    # of the collector's way, and collect less often (sagas make short-lived
    # objects by the thousand). Measured here: about 2% fewer CPU seconds per saga.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    stopping: asyncio.Future[None] = asyncio.ensure_future(_wait_set(stop))
    await asyncio.wait({stopping, running.ready}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        failure = running.ready.exception()
        if failure is not None:
            # A replica that cannot start must not stay half-alive (listening,
            # never SERVING): it ends, saying why.
            stopping.cancel()
            await running.stop()
            if isinstance(failure, (CompensaError, ServingError)):
                raise failure
            log.error("start-up failed", exc_info=failure)
            raise CompensaError(f"start-up failed: {type(failure).__name__}: {failure}") from failure
        await stop.wait()
    log.info("stopping")
    await running.stop()
