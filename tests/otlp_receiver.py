"""A real OTLP trace receiver for tests: the collector's TraceService (from
the opentelemetry-proto package) on a port of its own, over gRPC or, with
`protocol="http/protobuf"`, as OTLP/HTTP's POST /v1/traces (aiohttp), keeping
every span exported to it, with the service name of the process that sent it.

No pytest here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]
    #: (trace id, span id) of each span this one links to.
    links: tuple[tuple[str, str], ...] = ()


def _value(any_value: object) -> object:
    field = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(any_value, field) if field else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects spans; `address` is HOST:PORT once started."""

    def __init__(self, protocol: str = "grpc") -> None:
        self.spans: list[ReceivedSpan] = []
        self.address = ""
        self.protocol = protocol
        self._server: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._keep(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def _export_http(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text=f"not protobuf: {request.content_type}")
        self._keep(trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def _keep(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                    ))

    async def start(self) -> None:
        if self.protocol == "http/protobuf":
            app = web.Application()
            app.router.add_post("/v1/traces", self._export_http)
            self._http = web.AppRunner(app)
            await self._http.setup()
            site = web.TCPSite(self._http, "127.0.0.1", 0)
            await site.start()
            port = self._http.addresses[0][1]
            self.address = f"127.0.0.1:{port}"
            return
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
        if self._http is not None:
            await self._http.cleanup()

    def environment(self) -> dict[str, str]:
        """OTEL_* variables that send a process's spans here, promptly."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.address}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_EXPORTER_OTLP_PROTOCOL": self.protocol,
            # Export every 50 ms: a process killed later has sent what it ended.
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }

    async def wait_for(
        self, condition: Callable[[list[ReceivedSpan]], bool], what: str, timeout: float = 20.0
    ) -> None:
        """Polls the received spans until `condition` holds; fails at the deadline."""
        deadline = time.monotonic() + timeout
        while not condition(self.spans):
            if time.monotonic() > deadline:
                names = sorted({(span.service, span.name) for span in self.spans})
                raise AssertionError(f"no {what} within {timeout}s; received {names}")
            await asyncio.sleep(0.05)  # ok-sleep: polling interval, bounded by the deadline
