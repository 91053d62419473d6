"""Failover of the database: two `compensa serve` replicas on a PostgreSQL
primary with a synchronous standby, the libpq host list of both in their URL
(target_session_attrs=read-write). The primary is SIGKILLed while sagas run
and the standby promoted: no acknowledged saga is lost, no effect is applied
twice, and both replicas answer NOT_SERVING during the gap and SERVING again
after it, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import assert_replays_without_divergence, poll_until
from participant_helpers import checkout_input
from pg import ReplicatedPair, find_server_bindir, start_primary_with_standby
from processes import ManagedProcess, ProcessSet
from recording_participant import CALLS, EXECUTE, StepBehaviour
from test_streaming_processes import BoundedRecorder

from compensa.examples.server import start_server
from compensa.participants.sdk import pack
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

# Several processes and many connections each: one at a time (make test's --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.xdist_group("heavy")]

RECORDER = "recorder"
STEPS = ("first", "second")
WORKERS = 6
_DEFINITION = "name: relay-two\ninput_type: compensa.checkout.v1.CheckoutInput\nsteps:\n" + "".join(
    f"  - name: {step}\n    participant: recorder\n    kind: COMPENSABLE\n    execute_timeout: 10s\n"
    "    compensate_timeout: 10s\n    retry: {max_attempts: 0, give_up_after: 120s, initial_backoff: 100ms,"
    " max_backoff: 1s}\n"
    for step in STEPS
)
_AWAY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def replicated_pair() -> Iterator[ReplicatedPair]:
    bindir = find_server_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) in /usr/lib/postgresql/*/bin")
    pair = start_primary_with_standby(bindir)
    try:
        yield pair
    finally:
        pair.close()


async def _health(address: str) -> int | None:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return None
        return int(answer.status)


async def _all_answer(replicas: list[ManagedProcess], status: int) -> bool:
    return all([await _health(replica.address) == status for replica in replicas])


@contextlib.asynccontextmanager
async def _starting_sagas(replicas: list[ManagedProcess], acknowledged: list[str]) -> AsyncIterator[None]:
    """Workers that start sagas through the replicas in turn until the block
    ends; a start answered UNAVAILABLE (the database is away) is made again,
    the same request, until it is acknowledged."""
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as channels:
        stubs = [
            orchestrator_pb2_grpc.OrchestratorServiceStub(
                await channels.enter_async_context(grpc.aio.insecure_channel(replica.address))
            )
            for replica in replicas
        ]

        async def worker(number: int) -> None:
            turn = number
            while not stop.is_set():
                saga_id = f"failover-{uuid.uuid4().hex[:12]}"
                request = orchestrator_pb2.StartSagaRequest(
                    saga_id=saga_id, definition_name="relay-two", input=pack(checkout_input(order_id=saga_id))
                )
                while True:
                    turn += 1
                    try:
                        await stubs[turn % len(stubs)].StartSaga(request, timeout=5.0)
                    except grpc.aio.AioRpcError as error:
                        if error.code() not in _AWAY:
                            raise
                        await asyncio.sleep(0.1)  # ok-sleep: a client's pause before trying again
                        continue
                    acknowledged.append(saga_id)
                    break

        tasks = [asyncio.create_task(worker(number)) for number in range(WORKERS)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def test_a_failover_to_a_synchronous_standby_loses_no_saga_and_repeats_no_effect(
    tmp_path: Path, make_postgres_url: Callable[[], str], replicated_pair: ReplicatedPair
) -> None:
    with psycopg.connect(replicated_pair.conninfo(replicated_pair.primary_port), autocommit=True) as conn:
        conn.execute("CREATE DATABASE orchestrator")
    # At most a few calls at once: each holds two pooled connections (its
    # barrier's transaction and the recording's), so more would wait on each
    # other's connections when the sagas held up by the gap all resume.
    participant = BoundedRecorder(make_postgres_url(), {step: StepBehaviour(execute_seconds=0.05) for step in STEPS})
    served = await start_server(participant)
    definition = tmp_path / "relay-two.yaml"
    definition.write_text(_DEFINITION)
    acknowledged: list[str] = []
    try:
        with ProcessSet(tmp_path) as processes:
            replicas = [
                processes.orchestrator(
                    replicated_pair.urls_host_list, {RECORDER: served.address}, definitions=[definition],
                    name=f"orchestrator-{name}",
                )
                for name in "ab"
            ]
            for replica in replicas:  # one at a time: the first creates the schema
                await replica.start_serving(timeout=30.0)
            async with _starting_sagas(replicas, acknowledged):
                await poll_until(lambda: len(acknowledged) >= 30, timeout=30.0)
                replicated_pair.kill_primary()
                killed_at = time.monotonic()
                await poll_until(lambda: _all_answer(replicas, _NOT_SERVING), timeout=20.0, interval=0.1)
                noticed = time.monotonic() - killed_at
                before_promotion = len(acknowledged)
                promoting = time.monotonic()
                replicated_pair.promote_standby()
                promoted = time.monotonic() - promoting
                await poll_until(lambda: _all_answer(replicas, _SERVING), timeout=30.0, interval=0.1)
                serving_again = time.monotonic() - promoting
                await poll_until(lambda: len(acknowledged) >= before_promotion + 30, timeout=30.0)
            print(
                f"failover: both replicas NOT_SERVING {noticed:.1f}s after the kill; promote took {promoted:.1f}s;"
                f" both SERVING {serving_again:.1f}s after the promote began; {len(acknowledged)} sagas acknowledged"
            )
            # Neither replica was restarted to get there.
            assert all(replica.running() and replica.starts == 1 for replica in replicas)

            async with grpc.aio.insecure_channel(replicas[0].address) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

                async def unfinished() -> list[str]:
                    left = []
                    for saga_id in acknowledged:
                        try:
                            saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
                        except grpc.aio.AioRpcError as error:
                            # NOT_FOUND would be an acknowledged saga the failover lost.
                            assert error.code() in _AWAY, (saga_id, error.code(), error.details())
                            left.append(saga_id)
                            continue
                        assert saga.state in (saga_pb2.SAGA_STATE_RUNNING, saga_pb2.SAGA_STATE_SUCCEEDED), saga
                        if saga.state != saga_pb2.SAGA_STATE_SUCCEEDED:
                            left.append(saga_id)
                    return left

                async def all_finished() -> bool:
                    return not await unfinished()

                await poll_until(all_finished, timeout=60.0, interval=0.5)
                await assert_replays_without_divergence(stub, acknowledged)

        # Each step's effect happened once per saga: duplicates after the
        # failover were answered from the participant's barrier.
        async with participant.engine.connect() as conn:
            effects = (
                await conn.execute(
                    sa.select(CALLS.c.saga_id, CALLS.c.step_name, sa.func.count())
                    .where(CALLS.c.operation == EXECUTE, CALLS.c.outcome == "succeeded")
                    .group_by(CALLS.c.saga_id, CALLS.c.step_name)
                )
            ).all()
        counts = {(saga_id, step): count for saga_id, step, count in effects}
        assert {key for key, count in counts.items() if count > 1} == set()
        assert {(saga_id, step) for saga_id in acknowledged for step in STEPS} <= set(counts)
    finally:
        await served.stop(0)
        await participant.engine.dispose()
