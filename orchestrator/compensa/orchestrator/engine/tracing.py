"""One trace per saga (OpenTelemetry, optional: see compensa.common.tracing).

A saga's trace starts with a short "saga NAME" span when the saga is created
(linked to the caller's span when StartSaga carried a `traceparent`);
its W3C traceparent is stored with the saga (compensa_sagas.trace_parent), so
every replica that drives the saga later, after a crash or a release, hangs
its spans in the same trace. Each step attempt and each compensation attempt
is a CLIENT span, child of that context, and travels to the participant in
the call's gRPC metadata (`traceparent`), where the SDK's SERVER span joins it.

`SagaTracing.from_environment` is None when traces are off; the engine then
makes no span and sends no metadata (one None check per call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compensa.common import tracing
from compensa.common.tracing import TRACEPARENT
from compensa.orchestrator.engine import machine
from compensa.orchestrator.shared import records

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["CallSpan", "SagaTracing"]

_SCOPE = "compensa.orchestrator"
_SERVICE = "compensa-orchestrator"
# Answers that are errors of the call (a business failure is an outcome, not an error).
_ERRORS = (machine.ExecuteErrored, machine.CompensateErrored)


@dataclass
class CallSpan:
    """The span of one call in flight, and the metadata that carries it."""

    span: Span
    metadata: tuple[tuple[str, str], ...]
    outcome: str = field(default="no answer")

    def answered(self, answer: machine.Event) -> None:
        """Records the machine event the call's answer became."""
        from opentelemetry.trace import Status, StatusCode

        self.outcome = type(answer).__name__
        self.span.set_attribute("compensa.outcome", self.outcome)
        if isinstance(answer, _ERRORS):
            self.span.set_status(Status(StatusCode.ERROR, answer.error))
        elif isinstance(answer, machine.ExecuteFailed):
            self.span.set_attribute("compensa.failure_reason", answer.reason)


class SagaTracing:
    """Makes the spans of the sagas one replica drives."""

    def __init__(self, tracer: Tracer, replica_id: str) -> None:
        self._tracer = tracer
        self._replica_id = replica_id

    @classmethod
    def from_environment(cls, replica_id: str) -> SagaTracing | None:
        """Tracing as the OTEL_* variables configure it; None when off."""
        active = tracing.tracer(_SCOPE, _SERVICE)
        return None if active is None else cls(active, replica_id)

    def start_saga(self, saga: records.SagaRecord, caller_trace_parent: str | None = None) -> str:
        """Opens the saga's trace with a span for its creation; its traceparent.

        A new trace, whatever the caller's: one trace per saga, however long
        it lives and whoever started it. The caller's span (the `traceparent`
        StartSaga came with) is a link of the saga's first span, as OpenTelemetry
        advises for work a request starts and does not wait for."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        links = []
        if caller_trace_parent:
            caller = trace.get_current_span(
                TraceContextTextMapPropagator().extract({TRACEPARENT: caller_trace_parent})
            ).get_span_context()
            if caller.is_valid:
                links.append(trace.Link(caller))
        root = trace.set_span_in_context(trace.INVALID_SPAN)
        span = self._tracer.start_span(
            f"saga {saga.definition_name}", context=root, links=links, attributes={
                "compensa.saga.id": saga.saga_id, "compensa.definition": saga.definition_name,
                "compensa.definition.version": saga.definition_version, "compensa.replica": self._replica_id,
            },
        )
        span.end()
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        return carrier[TRACEPARENT]

    @contextlib.contextmanager
    def call(self, saga: records.SagaRecord, call: machine.Call, participant: str) -> Iterator[CallSpan]:
        """A span for one Execute or Compensate attempt in the saga's trace
        (`saga.trace_parent`, which must be set)."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        propagator = TraceContextTextMapPropagator()
        parent = propagator.extract({TRACEPARENT: saga.trace_parent or ""})
        method = "Execute" if isinstance(call, machine.CallExecute) else "Compensate"
        with self._tracer.start_as_current_span(
            f"{method.lower()} {call.step}", context=parent, kind=SpanKind.CLIENT, attributes={
                "compensa.saga.id": saga.saga_id, "compensa.step": call.step, "compensa.attempt": call.attempt,
                "compensa.participant": participant, "compensa.replica": self._replica_id,
                "rpc.system": "grpc", "rpc.service": "compensa.v1.ParticipantService", "rpc.method": method,
            },
        ) as span:
            carrier: dict[str, str] = {}
            propagator.inject(carrier, context=trace.set_span_in_context(span))
            yield CallSpan(span, tuple(carrier.items()))

    @staticmethod
    def shutdown() -> None:
        """Sends the spans still buffered (the replica is stopping)."""
        tracing.shutdown()
