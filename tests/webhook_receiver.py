"""A real HTTP webhook receiver for alert tests (http.server in a thread of
the test), answering each delivery from a script, and a real grpc.health.v1
server whose status a test switches.

No pytest here."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from compensa.orchestrator.engine.participant_health import PROBED_SERVICE


@dataclass
class Delivery:
    body: dict[str, object]
    idempotency_key: str
    status: int = 0  # what was answered; 0: held, no answer sent yet (or ever)


@dataclass
class WebhookReceiver:
    """Answers deliveries in turn from `script` (per alert kind in `scripts`,
    counted per kind): "hold" (no answer until `release`), "held" (no answer
    if it arrives before `release`, else 200), or a status code; after the
    script, 200."""

    script: list[str]
    scripts: dict[str, list[str]] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def of_kind(self, kind: str) -> list[Delivery]:
        return [delivery for delivery in self.deliveries if delivery.body.get("kind", "SAGA") == kind]

    def delivered(self) -> list[Delivery]:
        """Deliveries answered 2xx."""
        return [delivery for delivery in self.deliveries if 200 <= delivery.status < 300]

    def _turn(self, kind: str) -> str:
        script = self.scripts.get(kind, self.script)
        count = len(self.of_kind(kind))
        return script[count - 1] if count <= len(script) else "200"

    @contextlib.contextmanager
    def serving(self) -> Iterator[WebhookReceiver]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                delivery = Delivery(body, self.headers.get("Idempotency-Key", ""))
                receiver.deliveries.append(delivery)
                turn = receiver._turn(str(body.get("kind", "SAGA")))
                if turn == "held" and receiver.release.is_set():
                    turn = "200"
                if turn in ("hold", "held"):
                    receiver.release.wait(30)
                    return  # the sender is gone by now
                delivery.status = int(turn)
                self.send_response(delivery.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield self
        finally:
            self.release.set()
            server.shutdown()
            server.server_close()


@dataclass
class HealthServer:
    """A gRPC server with only a real grpc.health.v1 servicer, reporting
    for "" and the participant service as the SDK's servers do."""

    servicer: health.aio.HealthServicer
    address: str

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", PROBED_SERVICE):
            await self.servicer.set(name, status)


@contextlib.asynccontextmanager
async def health_server(*, serving: bool = True) -> AsyncIterator[HealthServer]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running = HealthServer(servicer, f"127.0.0.1:{port}")
    await running.set(serving)
    try:
        yield running
    finally:
        await server.stop(0)
