"""Overload: a replica at its bound of sagas in flight refuses new starts at
once, with RESOURCE_EXHAUSTED, a reason and a retry delay (never gRPC's bare
CANCELLED); every start it acknowledged finishes; SagaClient waits out the
delay it is given and does not take a CANCELLED it did not cause for a
broken stream."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status
from harness import poll_until, scrape
from participant_helpers import checkout_input
from processes import ProcessSet, free_port
from recording_participant import RecordingParticipant, StepBehaviour
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.examples.server import start_server
from compensa.orchestrator.client import SagaClient
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.participants.sdk import pack
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

pytestmark = [pytest.mark.postgres]

RECORDER = "recorder"
#: Sagas one replica takes on at once in these tests: far below the callers.
BOUND = 20
CALLERS = 2000
STEP_SECONDS = 0.5
#: A refusal must come at once, not after the work queued before it; the
#: issue asks for a second. The machine running the suite is shared, and this
#: process makes the 2,000 calls too, so the bound checked here is looser
#: than the bench's figure (bench/run.py --overload): it catches a refusal
#: that waited for sagas to finish, not a slow machine.
REFUSAL_SECONDS = 5.0

_DEFINITION = (
    "name: slow-one\n"
    "input_type: compensa.checkout.v1.CheckoutInput\n"
    "steps:\n"
    "  - name: only\n"
    "    participant: recorder\n"
    "    kind: COMPENSABLE\n"
    "    execute_timeout: 20s\n"
    "    compensate_timeout: 20s\n"
)


def status_details(error: grpc.aio.AioRpcError) -> tuple[ErrorInfo | None, RetryInfo | None]:
    """The ErrorInfo and RetryInfo a status carries (None for each it lacks)."""
    info: ErrorInfo | None = None
    retry: RetryInfo | None = None
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if isinstance(raw, bytes):
        for detail in Status.FromString(raw).details:
            if detail.Is(ErrorInfo.DESCRIPTOR):
                info = ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(RetryInfo.DESCRIPTOR):
                retry = RetryInfo()
                detail.Unpack(retry)
    return info, retry


@dataclass
class Answers:
    """What the callers got: per code, the seconds each answer took."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    acknowledged: list[str] = field(default_factory=list)
    refusals: list[tuple[str, str, ErrorInfo | None, RetryInfo | None]] = field(default_factory=list)


async def _call_once(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, answers: Answers) -> None:
    saga_id = f"load-{uuid.uuid4().hex[:12]}"
    request = orchestrator_pb2.StartSagaRequest(
        saga_id=saga_id, definition_name="slow-one", input=pack(checkout_input(order_id=saga_id))
    )
    began = time.monotonic()
    try:
        await stub.StartSaga(request, timeout=60.0)
    except grpc.aio.AioRpcError as error:
        answers.seconds[error.code().name].append(time.monotonic() - began)
        answers.refusals.append((error.code().name, error.details() or "", *status_details(error)))
        return
    answers.seconds["OK"].append(time.monotonic() - began)
    answers.acknowledged.append(saga_id)


# Thousands of callers on one process, answered within a bound: one at a time (make test's --dist loadgroup).
@pytest.mark.xdist_group("heavy")
@pytest.mark.slow
async def test_thousands_of_callers_are_answered_ok_or_refused_at_once_with_a_retry_delay(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    participant_engine = create_async_engine(make_postgres_url(), pool_size=BOUND + 5, max_overflow=5)
    participant = RecordingParticipant(participant_engine, {"only": StepBehaviour(execute_seconds=STEP_SECONDS)})
    served = await start_server(participant)
    definition = tmp_path / "slow-one.yaml"
    definition.write_text(_DEFINITION)
    metrics_port = free_port()
    try:
        with ProcessSet(tmp_path) as processes:
            orchestrator = processes.orchestrator(
                make_postgres_url(), {RECORDER: served.address}, definitions=[definition],
                options=["--max-sagas-in-flight", str(BOUND), "--metrics-listen", f"127.0.0.1:{metrics_port}"],
            )
            await orchestrator.start_serving()
            answers = Answers()
            async with grpc.aio.insecure_channel(orchestrator.address) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                await asyncio.gather(*(_call_once(stub, answers) for _ in range(CALLERS)))
                codes = {code: len(seconds) for code, seconds in answers.seconds.items()}
                refused = answers.seconds.get("RESOURCE_EXHAUSTED", [])
                print(
                    f"answers {codes}; refusals took median {statistics.median(refused or [0]):.3f}s,"
                    f" max {max(refused or [0]):.3f}s"
                )

                # Only two answers: started, or refused with the reason and a delay.
                assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
                assert codes["OK"] >= BOUND, codes
                for code, details, info, retry in answers.refusals:
                    assert info is not None and info.reason == "REPLICA_AT_CAPACITY", (code, details, info)
                    assert "--max-sagas-in-flight" in details and "retry after" in details, details
                    assert retry is not None and 0.5 <= retry.retry_delay.ToNanoseconds() / 1e9 <= 1.5, retry
                assert max(refused) < REFUSAL_SECONDS, sorted(refused)[-10:]

                # The replica counted what it refused.
                samples = await scrape(metrics_port)
                assert samples[("compensa_saga_starts_refused_total", frozenset())] == len(refused)
                assert samples[("compensa_max_sagas_in_flight", frozenset())] == BOUND

                # Every acknowledged start runs to its end.
                async def all_succeeded() -> bool:
                    for saga_id in answers.acknowledged:
                        saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
                        if saga.state != saga_pb2.SAGA_STATE_SUCCEEDED:
                            return False
                    return True

                await poll_until(all_succeeded, timeout=120.0, interval=0.5)
    finally:
        await served.stop(0)
        await participant_engine.dispose()


@contextlib.asynccontextmanager
async def _one_slot_orchestrator(
    tmp_path: Path, make_url: Callable[[], str], gate: asyncio.Event
) -> AsyncIterator[tuple[str, Callable[[], float]]]:
    """An orchestrator in this process that takes on one saga at a time, its
    step held until `gate` is set; its address, and its count of refusals."""
    participant = RecordingParticipant(create_async_engine(make_url()), {"only": StepBehaviour(gate=gate)})
    served = await start_server(participant)
    definition = tmp_path / "slow-one.yaml"
    definition.write_text(_DEFINITION)
    try:
        running = await start_orchestrator(
            ServerConfig(
                listen="127.0.0.1:0", database_url=make_url(), participants={RECORDER: served.address},
                definition_paths=(definition,), max_sagas_in_flight=1,
            )
        )
        try:

            def refused() -> float:
                value = running.engine.metrics.registry.get_sample_value("compensa_saga_starts_refused_total")
                return value or 0.0

            yield running.address, refused
        finally:
            await running.stop(0)
    finally:
        await served.stop(0)


async def test_saga_client_waits_out_the_retry_delay_of_a_replica_at_capacity(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    gate = asyncio.Event()
    async with _one_slot_orchestrator(tmp_path, make_postgres_url, gate) as (address, refused):
        async with SagaClient(address, retry_for=30.0) as client:
            first = await client.start("slow-one", checkout_input(order_id="first"))
            began = time.monotonic()
            second = asyncio.create_task(client.start("slow-one", checkout_input(order_id="second")))
            await poll_until(lambda: refused() >= 2, timeout=20.0)
            gate.set()
            started = await asyncio.wait_for(second, 30.0)
            waited = time.monotonic() - began
        assert started.saga_id != first.saga_id
        # Each try after a refusal came at least the shortest delay (0.5 s) later.
        assert refused() <= waited / 0.5 + 1, (refused(), waited)


class _CancellingOrchestrator(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Answers every watch with CANCELLED, as nothing the client did."""

    def __init__(self) -> None:
        self.watches = 0

    async def WatchSaga(self, request, context):  # type: ignore[no-untyped-def]
        self.watches += 1
        await context.abort(grpc.StatusCode.CANCELLED, "cancelled by the server")
        yield orchestrator_pb2.WatchSagaResponse()


async def test_saga_client_does_not_resume_a_watch_on_a_cancelled_it_did_not_cause() -> None:
    servicer = _CancellingOrchestrator()
    server = grpc.aio.server()
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with SagaClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(20.0):
                    async for _ in client.events("any"):
                        pass
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        assert servicer.watches == 1
    finally:
        await server.stop(0)
