"""Bulk actions run by the server (issue 23): a repair of many sagas after a
planted participant bug, on two replica processes on PostgreSQL, one of them
SIGKILLed during the job; and the bad input a bulk action refuses.

The repair's size is COMPENSA_BULK_SAGAS (default 2,000, the issue's number):
half the sagas wait out a long retry backoff of `charge`, half ended FAILED
because the compensation of `reserve` failed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from dashboard_rig import bearer, dashboard_rig
from google.protobuf import any_pb2, wrappers_pb2
from harness import checkout_input, poll_until
from processes import REPO, ProcessSet

from compensa.v1 import bulk_pb2, orchestrator_pb2, orchestrator_pb2_grpc, participant_pb2, participant_pb2_grpc
from compensa.v1 import saga_pb2 as S

SAGAS = int(os.environ.get("COMPENSA_BULK_SAGAS", "2000"))
COMPENSA = Path(sys.executable).parent / "compensa"

#: reserve's compensation is tried once; charge's Execute is retried after an hour.
REPAIRS = """\
name: repairs
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve
    participant: planted
    execute_timeout: 5s
    compensate_timeout: 5s
    compensate_retry: {max_attempts: 1}
  - name: charge
    participant: planted
    execute_timeout: 5s
    compensate_timeout: 5s
    retry: {max_attempts: 100, initial_backoff: 1h, backoff_multiplier: 1, max_backoff: 1h}
"""


class PlantedBug(participant_pb2_grpc.ParticipantServiceServicer):
    """While `broken`, charge answers UNAVAILABLE and every compensation
    fails; sagas whose id starts with "declined-" have their charge refused
    (a business failure) either way. Counts every call it receives."""

    def __init__(self) -> None:
        self.broken = True
        self.calls: collections.Counter[tuple[str, str, str]] = collections.Counter()

    async def Execute(
        self, request: participant_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.ExecuteResponse:
        step = request.context
        self.calls[(step.saga_id, step.step_name, "execute")] += 1
        if step.step_name == "charge":
            if step.saga_id.startswith("declined-"):
                await context.abort(grpc.StatusCode.ABORTED, "card declined")
            if self.broken:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "planted bug: payment client lost its key")
        output = any_pb2.Any()
        output.Pack(wrappers_pb2.StringValue(value="done"))
        return participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_SUCCEEDED, output=output)

    async def Compensate(
        self, request: participant_pb2.CompensateRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.CompensateResponse:
        step = request.context
        self.calls[(step.saga_id, step.step_name, "compensate")] += 1
        if self.broken:
            await context.abort(grpc.StatusCode.INTERNAL, "planted bug: release of stock crashes")
        return participant_pb2.CompensateResponse()


async def _serve(participant: PlantedBug) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServiceServicer_to_server(participant, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _start_all(stubs: list[orchestrator_pb2_grpc.OrchestratorServiceStub], saga_ids: list[str]) -> None:
    slots = asyncio.Semaphore(32)

    async def start(index: int, saga_id: str) -> None:
        async with slots:
            await stubs[index % len(stubs)].StartSaga(
                orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="repairs", input=checkout_input()),
                timeout=30,
            )

    await asyncio.gather(*(start(index, saga_id) for index, saga_id in enumerate(saga_ids)))


async def _job(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, job_id: str) -> bulk_pb2.BulkAction:
    answer = await stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id), timeout=10)
    return answer.bulk_action


def _acted_on(database_url: str, job_id: str, event_type: int) -> collections.Counter[str]:
    """How many events of `event_type` naming the job each saga has."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT saga_id, count(*) FROM compensa_saga_events WHERE type = :type AND message LIKE :tag"
                    " GROUP BY saga_id"
                ),
                {"type": event_type, "tag": f"bulk action {job_id}%"},
            ).all()
    finally:
        engine.dispose()
    return collections.Counter({saga_id: count for saga_id, count in rows})


@pytest.mark.postgres
async def test_a_repair_of_many_sagas_survives_the_kill_of_the_replica_running_it(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    participant = PlantedBug()
    server, address = await _serve(participant)
    (tmp_path / "repairs.yaml").write_text(REPAIRS)
    database_url = make_postgres_url()
    stuck = [f"stuck-{n:05d}" for n in range(SAGAS // 2)]
    declined = [f"declined-{n:05d}" for n in range(SAGAS - SAGAS // 2)]
    with ProcessSet(tmp_path) as processes:
        replicas = {
            name: processes.orchestrator(
                database_url, {"planted": address}, definitions=[tmp_path / "repairs.yaml"], name=name,
                options=["--replica-id", name],
            )
            for name in ("a", "b")
        }
        for replica in replicas.values():
            replica.start()
        for replica in replicas.values():
            await replica.wait_serving(60)
        channels = {name: grpc.aio.insecure_channel(replica.address) for name, replica in replicas.items()}
        stubs = {name: orchestrator_pb2_grpc.OrchestratorServiceStub(channel) for name, channel in channels.items()}
        try:
            await _start_all(list(stubs.values()), stuck + declined)
            stub = stubs["a"]

            async def selects(kind: int, text: str, expected: int) -> bool:
                answer = await stub.StartBulkAction(
                    bulk_pb2.StartBulkActionRequest(kind=kind, filter=text, validate_only=True), timeout=30
                )
                return answer.selected_count == expected

            retry_now = "definition=repairs step=charge id_prefix=stuck-"
            retry = "definition=repairs state=FAILED step_state=COMPENSATION_FAILED"
            # Every saga is where the bug left it: waiting out charge's backoff, or FAILED.
            await poll_until(
                lambda: selects(bulk_pb2.BULK_ACTION_KIND_RETRY_NOW, retry_now, len(stuck)), timeout=120, interval=0.5
            )
            await poll_until(
                lambda: selects(bulk_pb2.BULK_ACTION_KIND_RETRY, retry, len(declined)), timeout=120, interval=0.5
            )

            participant.broken = False
            jobs = {}
            for kind, text in ((bulk_pb2.BULK_ACTION_KIND_RETRY_NOW, retry_now), (bulk_pb2.BULK_ACTION_KIND_RETRY, retry)):
                started = await stub.StartBulkAction(
                    bulk_pb2.StartBulkActionRequest(
                        kind=kind, filter=text, note="payment client fixed (INC-7)", actor="ops",
                        max_sagas_per_second=300,
                    ),
                    timeout=30,
                )
                jobs[kind] = started.bulk_action.bulk_action_id
                assert started.bulk_action.selected_count == started.selected_count

            # SIGKILL the replica working on the retry-now job once it is under way.
            first = jobs[bulk_pb2.BULK_ACTION_KIND_RETRY_NOW]

            async def under_way() -> bulk_pb2.BulkAction | None:
                job = await _job(stub, first)
                return job if job.done_count >= len(stuck) // 10 and job.replica else None

            running = await poll_until(under_way, timeout=120, interval=0.05)
            assert running.state == bulk_pb2.BULK_ACTION_STATE_RUNNING and running.pending_count > 0
            victim = running.replica
            replicas[victim].kill()
            survivor = stubs["b" if victim == "a" else "a"]

            async def completed(job_id: str) -> bulk_pb2.BulkAction | None:
                job = await _job(survivor, job_id)
                return job if job.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED else None

            finished = [await poll_until(lambda: completed(job_id), timeout=240, interval=0.5) for job_id in jobs.values()]
            for job, expected in zip(finished, (len(stuck), len(declined)), strict=True):
                assert (job.selected_count, job.done_count, job.skipped_count, job.failed_count) == (expected, expected, 0, 0)

            async def summary() -> dict[int, int] | None:
                answer = await survivor.SummarizeSagas(
                    orchestrator_pb2.SummarizeSagasRequest(definition_name="repairs"), timeout=30
                )
                counts = {state.state: state.count for state in answer.states}
                return counts if counts.get(S.SAGA_STATE_SUCCEEDED) == len(stuck) else None

            # The survivor carried on with the job the victim held.
            assert replicas["b" if victim == "a" else "a"].log_lines(f"bulk action {first}: working on it")
            counts = await poll_until(summary, timeout=240, interval=0.5)
            assert counts == {S.SAGA_STATE_SUCCEEDED: len(stuck), S.SAGA_STATE_COMPENSATED: len(declined)}
        finally:
            for channel in channels.values():
                await channel.close()
            await server.stop(0)

    # Every saga acted on exactly once, by the job that selected it.
    assert _acted_on(database_url, jobs[bulk_pb2.BULK_ACTION_KIND_RETRY_NOW], S.EVENT_TYPE_BACKOFF_SKIPPED) == (
        collections.Counter(dict.fromkeys(stuck, 1))
    )
    assert _acted_on(database_url, jobs[bulk_pb2.BULK_ACTION_KIND_RETRY], S.EVENT_TYPE_OPERATOR_RETRIED) == (
        collections.Counter(dict.fromkeys(declined, 1))
    )
    # The participant saw the fix through: each charge ran again, each compensation again.
    assert all(participant.calls[(saga_id, "charge", "execute")] >= 2 for saga_id in stuck)
    assert all(participant.calls[(saga_id, "reserve", "compensate")] >= 2 for saga_id in declined)
