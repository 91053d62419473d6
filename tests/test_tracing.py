"""Traces: one trace per saga, across a crash, into a real OTLP receiver.

Real `compensa serve` and `compensa participant` processes export through the
OpenTelemetry OTLP/gRPC exporter to a TraceService started here. A replica
is SIGKILLed in the middle of a saga; the replica that takes the saga over
puts its spans in the same trace (the traceparent stored with the saga), and
the participants' own spans (the SDK's, one per call) join it through the
`traceparent` gRPC metadata. The same processes log JSON lines
(`--log-format json`) that carry the trace id.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from harness import checkout_input
from otlp_receiver import OtlpReceiver, ReceivedSpan
from processes import FAST_RECONNECT, REPO, ProcessSet
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ORCHESTRATOR = "compensa-orchestrator"
CALLER_TRACE, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture
async def receiver() -> Iterator[OtlpReceiver]:  # type: ignore[misc]
    started = OtlpReceiver()
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


def _json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


async def _stored_trace_parent(database_url: str, saga_id: str) -> str:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            value = (await conn.execute(
                sa.text("SELECT trace_parent FROM compensa_sagas WHERE saga_id = :id"), {"id": saga_id}
            )).scalar_one()
    finally:
        await engine.dispose()
    assert isinstance(value, str)
    return value


# Two replica processes: one at a time (make test's --dist loadgroup).
@pytest.mark.xdist_group("heavy")
async def test_a_saga_resumed_by_another_replica_after_a_kill_continues_its_trace(
    tmp_path: Path, make_postgres_url: Callable[[], str], receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in receiver.environment().items():
        monkeypatch.setenv(name, value)  # inherited by the processes started below
    saga_id = "traced-across-a-kill"
    orchestrator_url = make_postgres_url()
    with ProcessSet(tmp_path) as processes:
        # Shipping holds its first attempt past the step's 2s timeout, so the
        # saga is mid-flight at ship_order when the first replica dies.
        faults = {"shipping": "delay_seconds=3,delay_attempts=1"}
        participants = {
            kind: processes.participant(kind, make_postgres_url(), faults=faults.get(kind, ""))
            for kind in ("inventory", "payment", "shipping")
        }
        addresses = {kind: process.address for kind, process in participants.items()}
        first = processes.orchestrator(orchestrator_url, addresses, name="first")
        second = processes.orchestrator(orchestrator_url, addresses, name="second")
        for process in (*participants.values(), first, second):
            process.args += ["--log-format", "json"]
        for process in (*participants.values(), first):
            process.start()
        for process in (*participants.values(), first):
            await process.wait_serving()

        async with grpc.aio.insecure_channel(first.address, options=FAST_RECONNECT) as channel:
            # The caller's own trace (a checkout request, say): the saga links to it.
            await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).StartSaga(orchestrator_pb2.StartSagaRequest(
                saga_id=saga_id, definition_name="checkout", input=checkout_input()
            ), metadata=(("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),))

        def first_calls_done(spans: list[ReceivedSpan]) -> bool:
            names = {(span.service, span.name) for span in spans}
            return {(ORCHESTRATOR, "execute reserve_stock"), (ORCHESTRATOR, "execute charge_card")} <= names

        await receiver.wait_for(first_calls_done, "spans of the first two steps from the first replica")
        first.kill()
        await second.start_serving()

        async with grpc.aio.insecure_channel(second.address, options=FAST_RECONNECT) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            watch = orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True)
            async for response in stub.WatchSaga(watch):
                if response.event.type == saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED:
                    break

        def shipped_by_the_second(spans: list[ReceivedSpan]) -> bool:
            return any(
                span.name == "Execute ship_order" and span.attributes.get("compensa.attempt", 0) >= 2 for span in spans
            ) and any(span.service == ORCHESTRATOR and span.name == "execute ship_order" for span in spans)

        await receiver.wait_for(shipped_by_the_second, "ship_order's spans from the second replica and shipping")
        trace_parent = await _stored_trace_parent(orchestrator_url, saga_id)

    trace_id = trace_parent.split("-")[1]
    spans = [span for span in receiver.spans if span.attributes.get("compensa.saga.id") == saga_id]
    # One trace for the saga, whichever process made the span.
    assert {span.trace_id for span in spans} == {trace_id}
    # Its root is linked to the caller's span, in a trace of its own.
    root = next(span for span in spans if span.name == "saga checkout")
    assert root.links == ((CALLER_TRACE, CALLER_SPAN),) and root.parent_span_id == "", root
    assert trace_id != CALLER_TRACE
    ours = [span for span in spans if span.service == ORCHESTRATOR]
    replicas = {span.attributes["compensa.replica"] for span in ours}
    assert len(replicas) == 2, replicas
    by_replica = {replica: {span.name for span in ours if span.attributes["compensa.replica"] == replica}
                  for replica in replicas}
    assert any({"saga checkout", "execute reserve_stock", "execute charge_card"} <= names
               for names in by_replica.values()), by_replica
    assert any("execute ship_order" in names and "execute reserve_stock" not in names
               for names in by_replica.values()), by_replica
    # The participants' spans are children of the calls that reached them.
    call_spans = {span.span_id: span for span in ours}
    services = set()
    for span in spans:
        if span.service == ORCHESTRATOR:
            continue
        services.add(span.service)
        parent = call_spans.get(span.parent_span_id)
        if parent is not None:
            assert parent.name == span.name.lower(), (span, parent)
    assert services == {
        "compensa-participant-InventoryParticipant", "compensa-participant-PaymentParticipant",
        "compensa-participant-ShippingParticipant",
    }
    reserve = next(span for span in spans if span.name == "Execute reserve_stock")
    assert call_spans[reserve.parent_span_id].name == "execute reserve_stock"

    # JSON logs: the participant's line for each call carries the saga's ids.
    lines = [line for line in _json_lines(participants["inventory"].log_path) if line.get("saga_id") == saga_id]
    assert lines, participants["inventory"].tail()
    assert all(line["trace_id"] == trace_id and line["step"] == "reserve_stock" for line in lines), lines
    assert {"time", "level", "logger", "message", "attempt"} <= set(lines[0])


async def test_traces_go_to_an_otlp_http_collector_when_the_protocol_says_so(
    tmp_path: Path, make_postgres_url: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = OtlpReceiver(protocol="http/protobuf")
    await receiver.start()
    try:
        for name, value in receiver.environment().items():
            monkeypatch.setenv(name, value)
        with ProcessSet(tmp_path) as processes:
            participants = {
                kind: processes.participant(kind, make_postgres_url()) for kind in ("inventory", "payment", "shipping")
            }
            orchestrator = processes.orchestrator(
                make_postgres_url(), {kind: process.address for kind, process in participants.items()}
            )
            for process in (*participants.values(), orchestrator):
                process.start()
            for process in (*participants.values(), orchestrator):
                await process.wait_serving()
            async with grpc.aio.insecure_channel(orchestrator.address, options=FAST_RECONNECT) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                await stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                    saga_id="over-http", definition_name="checkout", input=checkout_input()
                ))

            def whole_saga(spans: list[ReceivedSpan]) -> bool:
                names = {(span.service, span.name) for span in spans}
                return {(ORCHESTRATOR, "saga checkout"), (ORCHESTRATOR, "execute ship_order"),
                        ("compensa-participant-ShippingParticipant", "Execute ship_order")} <= names

            await receiver.wait_for(whole_saga, "the saga's spans over OTLP/HTTP")
    finally:
        await receiver.stop()
    spans = [span for span in receiver.spans if span.attributes.get("compensa.saga.id") == "over-http"]
    assert len({span.trace_id for span in spans}) == 1


def test_the_code_runs_without_the_otel_extra() -> None:
    """Traces asked for by OTEL_* but the extra not installed: a warning, no spans, and everything imports."""
    script = (
        "import sys, logging\n"
        "sys.modules['opentelemetry'] = None  # as if compensa[otel] were not installed\n"
        "logging.basicConfig()\n"
        "from compensa.orchestrator.engine.tracing import SagaTracing\n"
        "import compensa.orchestrator.engine.engine, compensa.orchestrator.server, compensa.participants.sdk\n"
        "print('tracing', SagaTracing.from_environment('r1'))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tracing None"
    assert "install compensa[otel]" in result.stderr
