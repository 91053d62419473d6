"""OpenTelemetry traces, shared by the orchestrator and the participant SDK.

Optional twice over: the `otel` extra must be installed (pip install
'compensa[otel]'; 'compensa[otel-http]' for OTLP over HTTP), and the standard OTEL_* environment variables must ask for
traces: OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT),
or OTEL_TRACES_EXPORTER set to otlp or console. OTEL_SDK_DISABLED=true turns
them off. The exporter reads its own variables (OTEL_EXPORTER_OTLP_PROTOCOL,
_HEADERS, _INSECURE, ...) and so does the batch processor (OTEL_BSP_*).

Without either, `tracer` answers None and callers skip every span: the only
cost on a call's path is that None check. The context travels between
processes as the W3C `traceparent` (in gRPC metadata under that key).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "TRACEPARENT",
    "server_span",
    "shutdown",
    "trace_id_of",
    "traceparent_in",
    "tracer",
    "traces_requested",
]

log = logging.getLogger("compensa.tracing")

#: The W3C trace-context header, as gRPC metadata key.
TRACEPARENT = "traceparent"

_TRACEPARENT_FORMAT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_provider: TracerProvider | None = None
_missing_extra_reported = False


def traces_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces (whatever is installed)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporter_names(environ)
    if exporters is not None:
        return exporters != ["none"]
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_names(environ: Mapping[str, str]) -> list[str] | None:
    given = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return [name.strip() for name in given.split(",") if name.strip()] if given else None


def tracer(scope: str, service_name: str) -> Tracer | None:
    """A tracer named `scope` on this process's provider, made on first use
    from the environment (`service_name` unless OTEL_SERVICE_NAME says
    otherwise); None when traces are off or the extra is not installed."""
    global _provider, _missing_extra_reported
    if not traces_requested():
        return None
    if _provider is None:
        try:
            _provider = _provider_from_environment(service_name)
        except ImportError as error:
            if not _missing_extra_reported:
                _missing_extra_reported = True
                log.warning(
                    "OTEL_* asks for traces but %s; install compensa[otel] (compensa[otel-http] for"
                    " OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf) to send them", error,
                )
            return None
    return _provider.get_tracer(scope)


def _provider_from_environment(service_name: str) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; OTEL_SERVICE_NAME wins
    # over our default name.
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    for name in _exporter_names(os.environ) or ["otlp"]:
        exporter: SpanExporter
        if name == "otlp":
            exporter = _otlp_exporter()
        elif name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "none":
            continue
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        # In the otel-http extra (it brings requests); ImportError otherwise,
        # reported as a missing extra.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (grpc or http/protobuf)")


def shutdown() -> None:
    """Sends the spans still buffered and stops the exporter (process end)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a W3C traceparent; None if malformed."""
    if not traceparent:
        return None
    match = _TRACEPARENT_FORMAT.match(traceparent)
    return match.group(1) if match else None


def traceparent_in(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The traceparent among a call's gRPC metadata, if any."""
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str):
            return value
    return None


@contextlib.contextmanager
def server_span(
    active: Tracer, name: str, traceparent: str | None, attributes: Mapping[str, str | int]
) -> Iterator[Span]:
    """A SERVER span for handling one call, child of the caller's span when
    the call carried a traceparent; it records an escaping exception."""
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent}) if traceparent else None
    with active.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes) as span:
        yield span
