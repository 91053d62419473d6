"""The orchestrator process: gRPC server, health, reflection and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass

import grpc
from compensa.v1 import orchestrator_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator import payloads
from orchestrator.config import ServerConfig
from orchestrator.definitions import load_definitions
from orchestrator.engine import SagaEngine
from orchestrator.errors import CompensaError, StoreUnavailable
from orchestrator.service import OrchestratorService, register_definition, service_handler
from orchestrator.store import open_store
from participants.tls import TlsConfigError

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
    port: int
    address: str
    # Where /metrics is served, if it is.
    metrics_port: int | None = None
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
        await self.server.stop(grace)
        await self.service.stop()
        await self.engine.stop()
        await self.engine.store.close()
        self.engine.metrics.close()


async def _set_serving(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _wait_for_database(running: RunningOrchestrator, definitions: list) -> None:  # type: ignore[type-arg]
    """Checks the schema (creating it in an empty database) and registers
    definitions once the database answers, then reports SERVING and starts
    driving sagas. Only an unreachable database is waited for: any other
    failure ends the start-up."""
    delay = 0.2
    while True:
        try:
            await running.engine.store.ensure_schema()
            await running.engine.sync_clock()
            await running.engine.load_secrets()
            await running.engine.store_participants(
                running.config.participants, updated_by=f"serve --participant ({running.config.replica_id})"
            )
            for definition in definitions:
                stored, created = await register_definition(running.engine, definition, source="definitions")
                if created:
                    log.info("registered definition %s version %d", stored.name, stored.version)
            break
        except StoreUnavailable as error:
            log.warning("database not reachable (%s); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    running.engine.start()
    await _set_serving(running.health, health_pb2.HealthCheckResponse.SERVING)
    log.info("orchestrator %s serving on %s", running.config.replica_id, running.address)


async def start_orchestrator(config: ServerConfig, *, wait_ready: bool = True) -> RunningOrchestrator:
    """Starts listening at once (health NOT_SERVING), then becomes SERVING
    when the database is reachable. Definition files are validated first:
    a bad file raises DefinitionError before anything starts."""
    # TLS files first: one that cannot be read stops the start before anything
    # is created (the credentials are kept; the engine's client reuses them).
    credentials = config.tls.server_credentials if config.tls is not None else None
    if config.operators and (config.tls is None or config.tls.ca is None):
        raise TlsConfigError("operators are named by their client certificates: --operator needs --tls-client-ca")
    if config.participant_tls is not None:
        _ = config.participant_tls.channel_credentials
    payloads.import_proto_modules(config.proto_modules)
    definitions = load_definitions(config.definition_paths) if config.definition_paths else []
    store = open_store(config.resolved_database_url(), notifier=config.replica_id)
    engine = SagaEngine(store, config)
    limit = config.max_payload_bytes * 4
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    service = OrchestratorService(engine)
    server.add_generic_rpc_handlers((service_handler(service),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await _set_serving(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    if credentials is not None:
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    # Before serving: a metrics port that is taken stops the start here.
    metrics_port = engine.metrics.serve(config.metrics_listen, config.tls) if config.metrics_listen else None
    await server.start()
    host = config.listen.rpartition(":")[0]
    address = f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"
    running = RunningOrchestrator(config, server, engine, service, health_servicer, port, address, metrics_port)
    running.ready = asyncio.ensure_future(_wait_for_database(running, definitions))
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
    """Runs an orchestrator until SIGINT or SIGTERM."""
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
            if isinstance(failure, CompensaError):
                raise failure
            log.error("start-up failed", exc_info=failure)
            raise CompensaError(f"start-up failed: {type(failure).__name__}: {failure}") from failure
        await stop.wait()
    log.info("stopping")
    await running.stop()
