"""The orchestrator end to end on PostgreSQL: real participants, real gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import any_pb2, duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import checkout_input, checkout_stack, poll_until
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.checkout.v1 import checkout_pb2
from compensa.examples.server import start_participant
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.orchestrator.shared.errors import DefinitionError
from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2


async def _count_rows(url: str) -> dict[str, int]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            counts = {}
            for table in ("compensa_sagas", "compensa_saga_steps", "compensa_saga_events"):
                counts[table] = (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()
            return counts
    finally:
        await engine.dispose()


def _step(saga: saga_pb2.Saga, name: str) -> saga_pb2.Step:
    return next(step for step in saga.steps if step.name == name)


async def test_happy_path_runs_every_step_once(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        saga_id = await stack.start(order_id="order-happy")
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        assert [step.state for step in saga.steps] == [S.STEP_STATE_SUCCEEDED] * 3
        assert _step(saga, "charge_card").output.type_url.endswith("compensa.checkout.v1.Charge")
        events = await stack.events(saga_id)
        assert [event.sequence for event in events] == list(range(1, saga.sequence + 1))
        assert events[-1].type == S.EVENT_TYPE_SAGA_SUCCEEDED
        assert len(await stack.rows("inventory", "inventory_reservations", saga_id=saga_id, status="reserved")) == 1
        assert len(await stack.rows("payment", "payment_charges", saga_id=saga_id, status="charged")) == 1
        assert len(await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)) == 1


async def test_declined_payment_releases_stock_and_charges_nothing(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        saga_id = await stack.start(card_token="flagged-card", sku="sku-declined", quantity=3)
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_COMPENSATED
        assert "declined" in saga.failure_reason
        assert _step(saga, "reserve_stock").state == S.STEP_STATE_COMPENSATED
        assert _step(saga, "charge_card").state == S.STEP_STATE_FAILED
        assert _step(saga, "ship_order").state == S.STEP_STATE_PENDING
        reservations = await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)
        assert [row.status for row in reservations] == ["released"]
        stock = await stack.rows("inventory", "inventory_stock", sku="sku-declined")
        assert stock[0].available == 1000  # reserved 3, released 3
        assert await stack.rows("payment", "payment_charges", saga_id=saga_id) == []
        assert await stack.rows("shipping", "shipping_shipments", saga_id=saga_id) == []


async def test_transient_unavailable_is_retried_then_succeeds(make_postgres_url: Callable[[], str]) -> None:
    faults = {"payment": FaultPlan(unavailable_attempts=2)}
    async with checkout_stack(make_postgres_url, faults=faults) as stack:
        saga_id = await stack.start()
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        assert _step(saga, "charge_card").attempts == 3
        retries = [e for e in await stack.events(saga_id) if e.type == S.EVENT_TYPE_STEP_RETRY_SCHEDULED]
        assert [(e.step_name, e.attempt) for e in retries] == [("charge_card", 1), ("charge_card", 2)]
        assert all("UNAVAILABLE" in e.message for e in retries)
        assert len(await stack.rows("payment", "payment_charges", saga_id=saga_id)) == 1


FAST_CHECKOUT = """
name: checkout
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - {name: reserve_stock, participant: inventory, execute_timeout: 1s}
  - name: charge_card
    participant: payment
    execute_timeout: 300ms
    compensate_timeout: 300ms
    retry: {max_attempts: 3, initial_backoff: 50ms, backoff_multiplier: 2, max_backoff: 200ms}
    compensate_retry: {max_attempts: 6, initial_backoff: 50ms, backoff_multiplier: 2, max_backoff: 200ms}
  - {name: ship_order, participant: shipping, kind: PIVOT, execute_timeout: 1s}
"""


async def test_participant_past_its_deadline_is_retried_then_compensated(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    definition = tmp_path / "checkout.yaml"
    definition.write_text(FAST_CHECKOUT)
    # Payment sleeps past the 300ms deadline on its first 3 calls: every
    # Execute attempt times out, and so do the first compensations.
    faults = {"payment": FaultPlan(delay_seconds=0.6, delay_attempts=3)}
    async with checkout_stack(make_postgres_url, faults=faults, definition_paths=(definition,)) as stack:
        saga_id = await stack.start()
        saga = await stack.wait_final(saga_id, timeout=60)
        assert saga.state == S.SAGA_STATE_COMPENSATED, saga.failure_reason
        assert "DEADLINE_EXCEEDED" in saga.failure_reason
        charge = _step(saga, "charge_card")
        assert charge.attempts == 3
        assert charge.state == S.STEP_STATE_COMPENSATED  # its effect was unknown, so it was undone too
        events = await stack.events(saga_id)
        retries = [e for e in events if e.type == S.EVENT_TYPE_STEP_RETRY_SCHEDULED]
        assert [e.attempt for e in retries] == [1, 2]
        assert all("DEADLINE_EXCEEDED" in e.message for e in retries)
        assert _step(saga, "reserve_stock").state == S.STEP_STATE_COMPENSATED
        assert [r.status for r in await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)] == [
            "released"
        ]
        # The slow Executes may have charged after the deadline: each such
        # charge was refunded, or blocked by the barrier if it came late.
        charges = await stack.rows("payment", "payment_charges", saga_id=saga_id)
        assert all(row.status == "refunded" for row in charges)
        assert await stack.rows("shipping", "shipping_shipments", saga_id=saga_id) == []


async def test_start_saga_is_idempotent_on_saga_id(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        payload = checkout_input(order_id="order-idem")
        request = orchestrator_pb2.StartSagaRequest(saga_id="idem-1", definition_name="checkout", input=payload)
        first = await stack.stub.StartSaga(request)
        second = await stack.stub.StartSaga(request)
        assert first.created and not second.created
        assert second.saga.saga_id == "idem-1"
        await stack.wait_final("idem-1")
        third = await stack.stub.StartSaga(request)
        assert not third.created and third.saga.state == S.SAGA_STATE_SUCCEEDED
        assert len(await stack.rows("payment", "payment_charges", order_id="order-idem")) == 1

        other = orchestrator_pb2.StartSagaRequest(
            saga_id="idem-1", definition_name="checkout", input=checkout_input(order_id="order-other")
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.stub.StartSaga(other)
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "idem-1" in (error.value.details() or "")


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"definition_name": "no-such-flow"}, grpc.StatusCode.NOT_FOUND, "no-such-flow"),
        ({"input": None}, grpc.StatusCode.INVALID_ARGUMENT, "input is required"),
        ({"saga_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "saga_id"),
        ({"saga_id": "bad id with spaces"}, grpc.StatusCode.INVALID_ARGUMENT, "saga_id"),
        ({"input": "wrong-type"}, grpc.StatusCode.INVALID_ARGUMENT, "compensa.checkout.v1.CheckoutInput"),
        ({"input": "garbage"}, grpc.StatusCode.INVALID_ARGUMENT, "cannot be decoded"),
        ({"input": "oversized"}, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        ({"definition_version": 7}, grpc.StatusCode.NOT_FOUND, "version 7"),
    ],
)
async def test_bad_start_requests_are_refused_and_write_nothing(
    make_postgres_url: Callable[[], str], request_fields: dict[str, object], code: grpc.StatusCode, words: str
) -> None:
    async with checkout_stack(make_postgres_url, max_payload_bytes=4096) as stack:
        fields: dict[str, object] = {"saga_id": "bad-1", "definition_name": "checkout", "input": checkout_input()}
        fields.update(request_fields)
        match fields["input"]:
            case "wrong-type":
                wrong = any_pb2.Any()
                wrong.Pack(duration_pb2.Duration(seconds=1))
                fields["input"] = wrong
            case "garbage":
                fields["input"] = any_pb2.Any(
                    type_url="type.googleapis.com/compensa.checkout.v1.CheckoutInput", value=b"\xff\xff\xff"
                )
            case "oversized":
                fields["input"] = checkout_input(shipping_address="x" * 10_000)
            case None:
                del fields["input"]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.stub.StartSaga(orchestrator_pb2.StartSagaRequest(**fields))  # type: ignore[arg-type]
        assert error.value.code() == code
        assert words in (error.value.details() or "")
        assert await _count_rows(stack.orchestrator_url) == {
            "compensa_sagas": 0,
            "compensa_saga_steps": 0,
            "compensa_saga_events": 0,
        }


async def test_an_input_near_the_size_limit_is_stored_and_passed_on_byte_for_byte(
    make_postgres_url: Callable[[], str],
) -> None:
    async with checkout_stack(make_postgres_url) as stack:  # 1 MiB limit
        address = "Rua São João, 1 — 3º \"B\" " + "x" * 900_000
        saga_id = await stack.start(saga_id="big-1", shipping_address=address)
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        stored = checkout_pb2.CheckoutInput()
        assert saga.input.Unpack(stored)
        assert stored.shipping_address == address
        (shipment,) = await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)
        assert shipment.address == address


async def test_invalid_definition_file_is_refused_before_anything_starts(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(
        "name: broken\ninput_type: compensa.checkout.v1.CheckoutInput\n"
        "steps:\n  - name: a\n    participant: inventory\n    execute_timeout: -1s\n"
    )
    url = make_postgres_url()
    with pytest.raises(DefinitionError) as error:
        await start_orchestrator(ServerConfig(listen="127.0.0.1:0", database_url=url, definition_paths=(bad,)))
    message = str(error.value)
    assert "broken.yaml" in message and "'a'" in message and "execute_timeout" in message
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        assert tables == []
    finally:
        await engine.dispose()


async def test_list_filters_and_pages(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        ok = [await stack.start(saga_id=f"list-ok-{i}") for i in range(3)]
        declined = [await stack.start(saga_id=f"list-no-{i}", card_token="flagged") for i in range(2)]
        for saga_id in ok + declined:
            await stack.wait_final(saga_id)
        seen: list[str] = []
        token = ""
        while True:
            page = await stack.stub.ListSagas(orchestrator_pb2.ListSagasRequest(page_size=2, page_token=token))
            assert len(page.sagas) <= 2
            seen += [saga.saga_id for saga in page.sagas]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(ok + declined)
        compensated = await stack.stub.ListSagas(
            orchestrator_pb2.ListSagasRequest(state=S.SAGA_STATE_COMPENSATED, definition_name="checkout")
        )
        assert sorted(s.saga_id for s in compensated.sagas) == sorted(declined)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.stub.ListSagas(orchestrator_pb2.ListSagasRequest(page_token="not-a-token"))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_is_not_serving_until_the_database_answers() -> None:
    # A port where nothing listens: the orchestrator starts, but cannot serve.
    config = ServerConfig(
        listen="127.0.0.1:0", database_url="postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1"
    )
    running = await start_orchestrator(config, wait_ready=False)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service="compensa.v1.OrchestratorService"))
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.stop(0)


async def test_health_serving_and_reflection_lists_the_service(make_postgres_url: Callable[[], str]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with checkout_stack(make_postgres_url) as stack:
        health = health_pb2_grpc.HealthStub(stack.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="compensa.v1.OrchestratorService"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
        services: list[str] = []
        async for response in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            services += [service.name for service in response.list_services_response.service]
        assert "compensa.v1.OrchestratorService" in services


PATIENT_CHECKOUT = """
name: checkout
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - {name: reserve_stock, participant: inventory, execute_timeout: 1s}
  - name: charge_card
    participant: payment
    execute_timeout: 1s
    # Rides out an outage of up to about 25 s (minutes in production, with a longer cap).
    retry: {max_attempts: 30, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 1s}
  - {name: ship_order, participant: shipping, kind: PIVOT, execute_timeout: 1s}
"""


async def test_a_participant_down_for_many_leases_is_waited_for_then_the_saga_finishes(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    """Payment is down for 8 s, eight times the lease: the saga retries on its
    backoff, lies released in the database between attempts (no replica holds
    it), is claimed again for each attempt, and succeeds once payment is back
    on the same address; the card is charged once."""
    definition = tmp_path / "checkout.yaml"
    definition.write_text(PATIENT_CHECKOUT)
    async with checkout_stack(make_postgres_url, definition_paths=(definition,), lease_seconds=1.0) as stack:
        payment = stack.participants["payment"]
        payment_url = payment.engine.url.render_as_string(hide_password=False)
        await payment.stop(0)
        down_since = time.monotonic()
        saga_id = await stack.start()

        orchestrator_db = create_async_engine(stack.orchestrator_url)
        try:
            async def released_while_waiting() -> bool:
                async with orchestrator_db.connect() as conn:
                    row = (await conn.execute(
                        sa.text("SELECT owner, due_at, extract(epoch FROM clock_timestamp()) AS now"
                                " FROM compensa_sagas WHERE saga_id = :id"), {"id": saga_id}
                    )).one()
                return row.owner is None and row.due_at is not None and row.due_at > row.now

            await poll_until(released_while_waiting, timeout=8.0, interval=0.01)
        finally:
            await orchestrator_db.dispose()
        await asyncio.sleep(max(0.0, 8.0 - (time.monotonic() - down_since)))  # ok-sleep: the outage lasts 8 s
        stack.participants["payment"] = await start_participant(
            "payment", payment_url, listen=payment.address
        )

        saga = await stack.wait_final(saga_id, timeout=30.0)
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        charge = _step(saga, "charge_card")
        assert charge.attempts >= 5, charge  # it did wait through several failed attempts
        retries = [e for e in await stack.events(saga_id) if e.type == S.EVENT_TYPE_STEP_RETRY_SCHEDULED]
        assert len(retries) == charge.attempts - 1
        assert all("UNAVAILABLE" in e.message for e in retries)
        assert len(await stack.rows("payment", "payment_charges", saga_id=saga_id)) == 1
