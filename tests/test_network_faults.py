"""Network faults that kill nothing (issue "Network faults"): a proxy of our own
(tests/tcp_proxy.py) between a replica and PostgreSQL, between a replica and
a participant, and between a participant and its database, that blackholes
(keeps connections open, forwards nothing) or cuts (closes and refuses) the link.

What is checked, with two replicas (A behind the proxy, B direct):
- A's grpc.health.v1 goes NOT_SERVING within a probe and a database timeout
  of the fault, and SERVING again after the heal;
- calls on A answer UNAVAILABLE within the documented bound (orchestrator.proto:
  `database_timeout` per database wait, a call makes one or two) instead of
  waiting for their own deadline;
- A logs the loss of its database once and its return once;
- B takes A's sagas over, and each taken-over saga's log says so
  (TAKEN_OVER, from A to B);
- every saga ends as its input predicts, with each effect applied once.
And a participant refuses a call whose deadline passed, applying nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import FINAL, Stack, assert_replays_without_divergence, checkout_input, checkout_stack, poll_until
from participant_helpers import StepCall, connected, status_of
from processes import ProcessSet
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from compensa.examples.payment import CHARGES, PaymentParticipant
from compensa.examples.server import start_participant
from compensa.orchestrator.server import RunningOrchestrator
from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, participant_pb2, saga_pb2

pytestmark = [pytest.mark.postgres]

S = saga_pb2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

DATABASE_TIMEOUT = 1.0
PROBE_SECONDS = 0.2
FAST = {"database_timeout": DATABASE_TIMEOUT, "health_probe_seconds": PROBE_SECONDS}
LEASE_SECONDS = 1.5
#: orchestrator.proto: UNAVAILABLE within database_timeout of each wait, one
#: or two waits per call; plus room for a busy 2-core machine.
CALL_BOUND = 2 * DATABASE_TIMEOUT + 1.0
#: NOT_SERVING after at most a probe interval and a timed-out wait, plus room.
HEALTH_BOUND = PROBE_SECONDS + DATABASE_TIMEOUT + 2.0

#: Retries that outlast a fault window of a few seconds, so that the outcome
#: depends only on the input (the card), not on when the fault hit.
PATIENT_CHECKOUT = """
name: checkout
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve_stock
    participant: inventory
    execute_timeout: 1s
    compensate_timeout: 1s
    retry: {max_attempts: 60, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 300ms}
  - name: charge_card
    participant: payment
    execute_timeout: 1s
    compensate_timeout: 1s
    retry: {max_attempts: 60, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 300ms}
  - name: ship_order
    participant: shipping
    kind: PIVOT
    execute_timeout: 1s
    retry: {max_attempts: 60, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 300ms}
"""


def _proxied(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


async def _proxy_to_database(url: str) -> TcpProxy:
    parsed = make_url(url)
    return await TcpProxy.to(f"{parsed.host}:{parsed.port}")


async def _fault(proxy: TcpProxy, kind: str) -> None:
    if kind == "blackhole":
        proxy.blackhole()
    else:
        await proxy.cut()


async def health_of(address: str) -> int:
    """grpc.health.v1 Check("") of a server (its status, or -1 if it did not answer)."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return -1
        return int(answer.status)


async def timed(call: Any) -> tuple[grpc.StatusCode, float]:
    """How a call ended and how long it took, in seconds."""
    began = time.monotonic()
    code, _ = await status_of(call)
    return code, time.monotonic() - began


def expected_state(card_token: str) -> int:
    return S.SAGA_STATE_COMPENSATED if card_token.startswith("flagged") else S.SAGA_STATE_SUCCEEDED


async def assert_ends_as_predicted(
    stack: Stack, stub: Any, sagas: dict[str, str]
) -> dict[str, list[saga_pb2.SagaEvent]]:
    """Every saga (id -> card token) ends as its card predicts, each effect
    once; returns each saga's log."""
    async def all_final() -> dict[str, int] | None:
        found = {}
        for saga_id in sagas:
            try:
                found[saga_id] = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga.state
            except grpc.aio.AioRpcError:
                return None
        return found if all(state in FINAL for state in found.values()) else None

    final = await poll_until(all_final, timeout=60, interval=0.2)
    logs = {}
    for saga_id, card in sagas.items():
        expected = expected_state(card)
        assert final[saga_id] == expected, (saga_id, S.SagaState.Name(final[saga_id]))
        reservations = await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)
        charges = await stack.rows("payment", "payment_charges", saga_id=saga_id)
        shipments = await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)
        if expected == S.SAGA_STATE_SUCCEEDED:
            assert [r.status for r in reservations] == ["reserved"], saga_id
            assert [c.status for c in charges] == ["charged"], saga_id
            assert len(shipments) == 1, saga_id
        else:
            assert [r.status for r in reservations] == ["released"], saga_id
            assert charges == [] and shipments == [], saga_id
        events = []
        async for response in stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True)):
            events.append(response.event)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1)), saga_id
        logs[saga_id] = events
    await assert_replays_without_divergence(stub, sagas)
    return logs


def _log_lines(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    return [
        record.getMessage() for record in caplog.records if all(needle in record.getMessage() for needle in needles)
    ]


@dataclass
class Replicas:
    """A checkout stack whose orchestrator is replica A, and replica B beside it."""

    stack: Stack
    a: RunningOrchestrator
    b: RunningOrchestrator
    #: A client of B.
    b_stub: orchestrator_pb2_grpc.OrchestratorServiceStub
    #: The proxy on A's link that the test breaks.
    proxy: TcpProxy


@asynccontextmanager
async def two_replicas(
    make_postgres_url: Callable[[], str], tmp_path: Path, *, database_proxy: bool, participant_proxy: str = "",
    definition: str = PATIENT_CHECKOUT,
) -> AsyncIterator[Replicas]:
    """A checkout stack whose orchestrator (A) reaches its database, or the
    participant `participant_proxy`, through a proxy; and a replica B on the
    same database, direct."""
    definition_path = tmp_path / "checkout.yaml"
    definition_path.write_text(definition)
    direct = make_postgres_url()
    # Calls take a moment, so that sagas are in flight when the fault begins.
    slow = {kind: FaultPlan(delay_seconds=0.15) for kind in ("inventory", "payment", "shipping")}
    database = await _proxy_to_database(direct) if database_proxy else None
    async with checkout_stack(
        make_postgres_url,
        faults=slow,
        definition_paths=(definition_path,),
        orchestrator_url=_proxied(direct, database) if database else direct,
        lease_seconds=LEASE_SECONDS,
        participant_proxies=(participant_proxy,) if participant_proxy else (),
        **FAST,
    ) as stack:
        proxy = database or stack.extra["proxies"][participant_proxy]
        try:
            async with stack.another_replica(
                database_url=direct, definition_paths=(definition_path,), lease_seconds=LEASE_SECONDS, **FAST
            ) as replica_b, grpc.aio.insecure_channel(replica_b.address) as channel:
                yield Replicas(
                    stack, stack.orchestrator, replica_b, orchestrator_pb2_grpc.OrchestratorServiceStub(channel), proxy
                )
        finally:
            await proxy.heal()
    if database is not None:
        await database.close()


@pytest.mark.parametrize("fault", ["blackhole", "cut"])
async def test_a_replica_that_loses_its_database_says_so_answers_quickly_and_is_taken_over(
    fault: str, make_postgres_url: Callable[[], str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with two_replicas(make_postgres_url, tmp_path, database_proxy=True) as replicas:
        stack, replica_a, replica_b, proxy = replicas.stack, replicas.a, replicas.b_stub, replicas.proxy
        name_a, name_b = replica_a.config.replica_id, replicas.b.config.replica_id
        assert await health_of(replica_a.address) == SERVING
        sagas = {}
        for index in range(8):
            card = "flagged" if index % 3 == 0 else "ok"
            sagas[await stack.start(saga_id=f"db-{fault}-{index}-{uuid.uuid4().hex[:6]}", card_token=card)] = card

        await _fault(proxy, fault)
        began = time.monotonic()
        await poll_until(lambda: _is(health_of(replica_a.address), NOT_SERVING), timeout=HEALTH_BOUND, interval=0.05)
        assert time.monotonic() - began <= HEALTH_BOUND

        # Calls on A answer UNAVAILABLE quickly, not at their own deadline.
        late_id = f"db-{fault}-late-{uuid.uuid4().hex[:6]}"
        start = stack.stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id=late_id, definition_name="checkout", input=checkout_input()),
            timeout=15,
        )
        code, took = await timed(start)
        assert (code, took <= CALL_BOUND) == (grpc.StatusCode.UNAVAILABLE, True), (code, took)
        code, took = await timed(
            stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=next(iter(sagas))), timeout=15)
        )
        assert (code, took <= CALL_BOUND) == (grpc.StatusCode.UNAVAILABLE, True), (code, took)

        # B, direct, serves and drives A's sagas to their end meanwhile.
        assert await health_of(replicas.b.address) == SERVING
        logs = await assert_ends_as_predicted(stack, replica_b, sagas)

        await proxy.heal()
        await poll_until(lambda: _is(health_of(replica_a.address), SERVING), timeout=HEALTH_BOUND, interval=0.05)
        # A works again: a saga started on it ends, and the late start (which
        # may have landed at the heal, held by the network) ends if it exists.
        again = await stack.start(card_token="ok")
        sagas[again] = "ok"
        if await _exists(replica_b, late_id):
            sagas[late_id] = "tok_visa"
        await assert_ends_as_predicted(stack, replica_b, sagas)

    taken = [
        event for events in logs.values() for event in events if event.type == S.EVENT_TYPE_TAKEN_OVER
    ]
    assert taken, "B took none of A's sagas over"
    for event in taken:
        assert event.actor == name_b
        assert f"replica {name_b} took the saga over from replica {name_a}: its lease expired" in event.message
    assert len(_log_lines(caplog, f"orchestrator {name_a} lost its database")) == 1
    assert len(_log_lines(caplog, f"orchestrator {name_a} reached its database again")) == 1
    assert _log_lines(caplog, f"orchestrator {name_b} lost its database") == []


@pytest.mark.parametrize("fault", ["blackhole", "cut"])
async def test_sagas_end_as_predicted_when_a_replica_loses_a_participant(
    fault: str, make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    async with two_replicas(make_postgres_url, tmp_path, database_proxy=False, participant_proxy="payment") as replicas:
        stack, replica_b, proxy = replicas.stack, replicas.b_stub, replicas.proxy
        sagas = {}
        for index in range(6):
            card = "flagged" if index % 3 == 0 else "ok"
            sagas[await stack.start(saga_id=f"p-{fault}-{index}-{uuid.uuid4().hex[:6]}", card_token=card)] = card
        await _fault(proxy, fault)
        # Held for longer than a call's timeout (1s): calls fail and are retried.
        await asyncio.sleep(2.5)  # ok-sleep: the length of the fault window is what is tested
        for index in range(2):
            sagas[await stack.start(saga_id=f"p-{fault}-during-{index}-{uuid.uuid4().hex[:6]}", card_token="ok")] = "ok"
        await proxy.heal()
        # Still SERVING throughout: a participant that cannot be reached is
        # retried, it does not make the orchestrator unable to work.
        assert await health_of(stack.orchestrator.address) == SERVING
        await assert_ends_as_predicted(stack, replica_b, sagas)


@pytest.mark.parametrize("fault", ["blackhole", "cut"])
async def test_a_participant_that_loses_its_database_says_so_and_answers_unavailable(
    fault: str, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    direct = make_postgres_url()
    proxy = await _proxy_to_database(direct)
    running = await start_participant(
        "payment", _proxied(direct, proxy), database_timeout=DATABASE_TIMEOUT, health_probe_seconds=PROBE_SECONDS
    )
    name = f"PaymentParticipant on port {running.port}"
    try:
        async with connected(running) as payment:
            assert await health_of(running.address) == SERVING
            first = StepCall.new("charge_card")
            assert (await status_of(payment.stub.Execute(first.execute())))[0] == grpc.StatusCode.OK

            await _fault(proxy, fault)
            began = time.monotonic()
            await poll_until(lambda: _is(health_of(running.address), NOT_SERVING), timeout=HEALTH_BOUND, interval=0.05)
            assert time.monotonic() - began <= HEALTH_BOUND
            during = StepCall.new("charge_card")
            code, took = await timed(payment.stub.Execute(during.execute(), timeout=15))
            assert (code, took <= CALL_BOUND) == (grpc.StatusCode.UNAVAILABLE, True), (code, took)

            await proxy.heal()
            await poll_until(lambda: _is(health_of(running.address), SERVING), timeout=HEALTH_BOUND, interval=0.05)
            # The refused call did nothing: retried, it charges once.
            assert (await status_of(payment.stub.Execute(during.execute(attempt=2))))[0] == grpc.StatusCode.OK
            assert [c.status for c in await payment.rows(CHARGES, saga_id=during.saga_id)] == [
                "charged"
            ]
    finally:
        await proxy.close()
    assert len(_log_lines(caplog, f"{name} lost its database")) == 1
    assert len(_log_lines(caplog, f"{name} reached its database again")) == 1


async def test_a_participant_refuses_a_call_that_arrives_after_its_deadline(
    make_postgres_url: Callable[[], str],
) -> None:
    running = await start_participant("payment", make_postgres_url())
    async with connected(running) as payment:
        step = StepCall.new("charge_card")
        past = timestamp_pb2.Timestamp()
        past.FromNanoseconds(time.time_ns() - 1_000_000_000)
        stale = step.execute()
        stale.context.deadline.CopyFrom(past)
        code, details = await status_of(payment.stub.Execute(stale))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert "after its deadline" in details
        barrier = PaymentParticipant.barrier_table_name
        assert await _barrier_rows(payment, barrier, step.key) == 0
        assert await payment.rows(CHARGES, saga_id=step.saga_id) == []

        stale_undo = step.compensate()
        stale_undo.context.deadline.CopyFrom(past)
        assert (await status_of(payment.stub.Compensate(stale_undo)))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _barrier_rows(payment, barrier, step.key) == 0

        # Nothing was recorded: the same key in time is executed, once.
        future = timestamp_pb2.Timestamp()
        future.FromNanoseconds(time.time_ns() + 10_000_000_000)
        timely = step.execute(attempt=2)
        timely.context.deadline.CopyFrom(future)
        answer = await payment.stub.Execute(timely)
        assert answer.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED
        assert [c.status for c in await payment.rows(CHARGES, saga_id=step.saga_id)] == ["charged"]


async def test_an_operator_action_on_another_replica_logs_the_takeover(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    # A long call timeout: A's payment call stays in flight (held by the
    # blackhole), so A holds the saga under a live lease all along.
    held = PATIENT_CHECKOUT.replace("execute_timeout: 1s", "execute_timeout: 30s")
    async with two_replicas(
        make_postgres_url, tmp_path, database_proxy=False, participant_proxy="payment", definition=held
    ) as replicas:
        stack, replica_b = replicas.stack, replicas.b_stub
        name_a, name_b = replicas.a.config.replica_id, replicas.b.config.replica_id
        replicas.proxy.blackhole()
        saga_id = await stack.start(card_token="ok")

        async def charging() -> bool:
            saga = (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
            return any(step.name == "charge_card" and step.state == S.STEP_STATE_RUNNING for step in saga.steps)

        await poll_until(charging, timeout=10)
        await replica_b.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id=saga_id, actor="alice", reason="test"))

        async def compensated() -> bool:
            saga = (await replica_b.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
            return saga.state == S.SAGA_STATE_COMPENSATED

        # B compensates while A's call is still held: nothing charged, stock released.
        await poll_until(compensated, timeout=20)
        assert [r.status for r in await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)] == [
            "released"
        ]
        assert await stack.rows("payment", "payment_charges", saga_id=saga_id) == []
        events = [
            response.event
            async for response in replica_b.WatchSaga(
                orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True)
            )
        ]
        await assert_replays_without_divergence(replica_b, [saga_id])
    taken = [event for event in events if event.type == S.EVENT_TYPE_TAKEN_OVER]
    assert len(taken) == 1, [S.EventType.Name(event.type) for event in events]
    assert taken[0].actor == name_b
    assert taken[0].message == (
        f"replica {name_b} took the saga over from replica {name_a}: CancelSaga by alice (its lease was live)"
    )
    assert taken[0].saga_state == S.SAGA_STATE_RUNNING
    cancel = next(event for event in events if event.type == S.EVENT_TYPE_CANCEL_REQUESTED)
    assert cancel.sequence == taken[0].sequence + 1


async def _is(status: Any, wanted: int) -> bool:
    return bool(await status == wanted)


async def _exists(stub: Any, saga_id: str) -> bool:
    code, _ = await status_of(stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id)))
    return code == grpc.StatusCode.OK


async def _barrier_rows(payment: Any, table: str, key: str) -> int:
    import sqlalchemy as sa

    async with payment.running.engine.connect() as conn:
        return int(
            (
                await conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE idempotency_key = :key"), {"key": key})
            ).scalar_one()
        )


async def test_a_slow_statement_is_cancelled_by_the_database_and_not_taken_for_a_lost_one(
    make_postgres_url: Callable[[], str],
) -> None:
    import sqlalchemy as sa

    from compensa.orchestrator.shared.errors import StoreUnavailable
    from compensa.orchestrator.store import open_store

    store = open_store(make_postgres_url(), timeout=DATABASE_TIMEOUT)
    outcomes: list[BaseException | None] = []
    store.subscribe_reachability(lambda outcome, began: outcomes.append(outcome))
    try:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            async with store._transaction() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(:seconds)"), {"seconds": 3 * DATABASE_TIMEOUT})
        assert time.monotonic() - began < DATABASE_TIMEOUT + 0.5
        assert [outcome for outcome in outcomes if outcome is not None] == []
        await store.ping()
        assert outcomes[-1] is None
    finally:
        await store.close()


async def test_a_compensa_serve_process_reports_its_lost_database_by_health_and_once_in_its_log(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    direct = make_postgres_url()
    proxy = await _proxy_to_database(direct)
    try:
        with ProcessSet(tmp_path) as processes:
            # No saga runs here: the participants' addresses only need to be given.
            nowhere = {kind: "127.0.0.1:9" for kind in ("inventory", "payment", "shipping")}
            serve = processes.orchestrator(_proxied(direct, proxy), nowhere, options=["--database-timeout", "1s"])
            await serve.start_serving()
            proxy.blackhole()
            # The probe runs every second (the default); a wait gives up after 1s.
            bound = 1.0 + 1.0 + 2.0
            await poll_until(lambda: _is(health_of(serve.address), NOT_SERVING), timeout=bound, interval=0.05)
            await proxy.heal()
            await serve.wait_serving(timeout=bound)
            assert len(serve.log_lines("lost its database: DatabaseTimeout")) == 1, serve.tail()
            assert len(serve.log_lines("reached its database again")) == 1, serve.tail()
    finally:
        await proxy.close()
