"""The web dashboard (`compensa serve --http HOST:PORT`): counts, a live saga
list, saga timelines and operator actions, served by aiohttp from the
orchestrator's own event loop."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from aiohttp import web

from compensa.common.startup import AddressInUse, ServingError
from compensa.common.tls import TlsFiles
from compensa.orchestrator.api.auth import AccessPolicy, RefusedCalls, StreamLimit
from compensa.orchestrator.api.log_tails import DeploymentLogs
from compensa.orchestrator.dashboard.app import Dashboard, server_ssl_context
from compensa.orchestrator.engine.engine import SagaEngine

__all__ = ["RunningDashboard", "start_dashboard"]

#: How long a stop waits for requests in flight; live streams are then cut.
_SHUTDOWN_SECONDS = 1.0


@dataclass
class RunningDashboard:
    """A dashboard being served; `url` is where a browser opens it."""

    runner: web.AppRunner
    port: int
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_dashboard(
    listen: str,
    engine: SagaEngine,
    logs: DeploymentLogs,
    access: AccessPolicy,
    streams: StreamLimit,
    refused_calls: RefusedCalls,
    tls: TlsFiles | None,
    *,
    live_buffer_events: int,
) -> RunningDashboard:
    """Serves the dashboard on `listen` (HOST:PORT; port 0 picks one), over
    TLS with the server's certificate when `tls` is given."""
    dashboard = Dashboard(
        engine, logs, access, streams, refused_calls, live_buffer_events=live_buffer_events, tls=tls is not None
    )
    # Cancel a handler when its client goes away: a closed live list stops
    # following the log at once instead of at its next write.
    runner = web.AppRunner(
        dashboard.app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS
    )
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(
        runner,
        host.strip("[]") or "0.0.0.0",
        int(port),
        ssl_context=server_ssl_context(tls) if tls is not None else None,
    )
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        if error.errno == errno.EADDRINUSE:
            raise AddressInUse(f"address in use: {listen} (--http; another process listens there)") from None
        raise ServingError(f"cannot serve the dashboard on {listen} (--http): {error.strerror or error}") from None
    bound = runner.addresses[0][1]
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host
    scheme = "https" if tls is not None else "http"
    return RunningDashboard(runner, bound, f"{scheme}://{shown}:{bound}/")
