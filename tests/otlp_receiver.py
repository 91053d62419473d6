"""A real OTLP/gRPC trace receiver for tests: the collector's TraceService
(from the opentelemetry-proto package) on a port of its own, keeping every
span exported to it, with the service name of the process that sent it.

No pytest here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
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

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.address = ""
        self._server: grpc.aio.Server | None = None

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
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
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> None:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    def environment(self) -> dict[str, str]:
        """OTEL_* variables that send a process's spans here, promptly."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.address}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
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
