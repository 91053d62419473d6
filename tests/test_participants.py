"""The participant SDK's barrier and the checkout participants, over real gRPC and real databases.

Every test runs on PostgreSQL and on SQLite. Tests on one engine share a
database; each uses its own saga ids, orders and SKUs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy
import sqlalchemy.ext.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from participant_helpers import (
    Connected,
    StepCall,
    libpq_traces,
    round_trips,
    serving,
    serving_participant,
    status_of,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.checkout.v1 import checkout_pb2
from compensa.examples import inventory, payment, shipping
from compensa.examples.server import PARTICIPANT_KINDS, build_participant, create_participant_engine
from compensa.participants.faults import FaultPlan
from compensa.participants.sdk import Participant, StepFailed, TransientError, unpack_as
from compensa.v1 import participant_pb2

INITIAL_STOCK = 1000  # InventoryParticipant's default for a SKU it has never seen


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A participant database URL: the run's PostgreSQL database, or a fresh SQLite file."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'participant.db'}"


async def available(inv: Connected, sku: str) -> int | None:
    rows = await inv.rows(inventory.STOCK, sku=sku)
    return rows[0].available if rows else None


# --- Execute -----------------------------------------------------------------


async def test_execute_reserves_stock_and_returns_the_reservation(database_url: str) -> None:
    step = StepCall.new("reserve", quantity=3)
    async with serving("inventory", database_url) as inv:
        response = await inv.stub.Execute(step.execute())

        assert response.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED
        reservation = unpack_as(response.output, checkout_pb2.Reservation)
        assert (reservation.sku, reservation.quantity) == (step.order.sku, 3)
        rows = await inv.rows(inventory.RESERVATIONS, saga_id=step.saga_id)
        assert [(r.reservation_id, r.status, r.quantity) for r in rows] == [
            (reservation.reservation_id, "reserved", 3)
        ]
        assert await available(inv, step.order.sku) == INITIAL_STOCK - 3


async def test_duplicate_execute_returns_the_stored_response_and_applies_once(database_url: str) -> None:
    step = StepCall.new("charge", amount_cents=1_234)
    async with serving("payment", database_url) as pay:
        first = await pay.stub.Execute(step.execute(attempt=1))
        second = await pay.stub.Execute(step.execute(attempt=2))

        assert second == first
        charges = await pay.rows(payment.CHARGES, saga_id=step.saga_id)
        assert len(charges) == 1
        assert charges[0].charge_id == unpack_as(first.output, checkout_pb2.Charge).charge_id
        assert charges[0].amount_cents == 1_234


async def test_concurrent_duplicate_executes_apply_once(database_url: str) -> None:
    step = StepCall.new("reserve", quantity=1)
    async with serving("inventory", database_url) as inv:
        responses = await asyncio.gather(*(inv.stub.Execute(step.execute(attempt=1)) for _ in range(10)))

        assert all(r.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED for r in responses)
        assert len({r.SerializeToString(deterministic=True) for r in responses}) == 1
        assert len(await inv.rows(inventory.RESERVATIONS, saga_id=step.saga_id)) == 1
        assert await available(inv, step.order.sku) == INITIAL_STOCK - 1


async def test_shipping_execute_records_one_shipment(database_url: str) -> None:
    step = StepCall.new("ship")
    async with serving("shipping", database_url) as ship:
        first = await ship.stub.Execute(step.execute())
        again = await ship.stub.Execute(step.execute(attempt=2))

        shipment = unpack_as(first.output, checkout_pb2.Shipment)
        assert again == first
        rows = await ship.rows(shipping.SHIPMENTS, saga_id=step.saga_id)
        assert [(r.tracking_number, r.address) for r in rows] == [
            (shipment.tracking_number, step.order.shipping_address)
        ]


# --- Business failures --------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"amount_cents": 100_001}, "over the limit"),
        ({"card_token": "flagged-4242"}, "flagged"),
    ],
)
async def test_declined_card_answers_aborted_and_a_retry_answers_the_same(
    database_url: str, overrides: dict[str, object], reason: str
) -> None:
    step = StepCall.new("charge", **overrides)
    async with serving("payment", database_url) as pay:
        first = await status_of(pay.stub.Execute(step.execute(attempt=1)))
        retry = await status_of(pay.stub.Execute(step.execute(attempt=2)))

        assert first[0] == grpc.StatusCode.ABORTED
        assert reason in first[1]
        assert retry == first
        assert await pay.rows(payment.CHARGES, saga_id=step.saga_id) == []


async def test_a_held_charge_answers_pending_once_and_a_duplicate_answers_pending_again(database_url: str) -> None:
    step = StepCall.new("charge", card_token="review-4242", amount_cents=7_000)
    request = step.execute()
    request.completion_token = "token-of-this-step"
    async with serving("payment", database_url) as pay:
        first = await pay.stub.Execute(request)
        again = await asyncio.gather(*(pay.stub.Execute(request) for _ in range(3)))

        assert first.result == participant_pb2.EXECUTE_RESULT_PENDING
        assert all(response == first for response in again)
        charge = unpack_as(first.output, checkout_pb2.Charge)
        rows = await pay.rows(payment.CHARGES, saga_id=step.saga_id)
        # One hold, kept with the token to report its outcome with.
        assert [(r.charge_id, r.status, r.completion_token) for r in rows] == [
            (charge.charge_id, "held", "token-of-this-step")
        ]
        # Compensating a held charge releases the hold; nothing was charged.
        compensated = await pay.stub.Compensate(step.compensate())
        assert unpack_as(compensated.output, checkout_pb2.Refund).charge_id == charge.charge_id
        assert [r.status for r in await pay.rows(payment.CHARGES, saga_id=step.saga_id)] == ["released"]
        assert await pay.rows(payment.REFUNDS, charge_id=charge.charge_id) == []


async def test_pending_from_a_step_that_is_not_long_running_is_refused_and_records_nothing(database_url: str) -> None:
    step = StepCall.new("charge", card_token="review-4242")
    async with serving("payment", database_url) as pay:
        code, details = await status_of(pay.stub.Execute(step.execute()))  # no completion token

        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "not long_running" in details
        assert await pay.rows(payment.CHARGES, saga_id=step.saga_id) == []


async def test_out_of_stock_answers_aborted_without_touching_stock(database_url: str) -> None:
    taken = StepCall.new("reserve", quantity=10)
    too_many = StepCall(order=checkout_pb2.CheckoutInput(), step_name="reserve", saga_id=taken.saga_id + "-2")
    too_many.order.CopyFrom(taken.order)
    too_many.order.quantity = INITIAL_STOCK  # only INITIAL_STOCK - 10 are left
    async with serving("inventory", database_url) as inv:
        await inv.stub.Execute(taken.execute())

        first = await status_of(inv.stub.Execute(too_many.execute(attempt=1)))
        retry = await status_of(inv.stub.Execute(too_many.execute(attempt=2)))

        assert first == (grpc.StatusCode.ABORTED, "out of stock")
        assert retry == first
        assert await inv.rows(inventory.RESERVATIONS, saga_id=too_many.saga_id) == []
        assert await available(inv, taken.order.sku) == INITIAL_STOCK - 10


async def test_a_business_failure_rolls_back_the_steps_partial_effects(database_url: str) -> None:
    step = StepCall.new("reserve", quantity=INITIAL_STOCK + 1)
    async with serving("inventory", database_url) as inv:
        code, _ = await status_of(inv.stub.Execute(step.execute()))

        assert code == grpc.StatusCode.ABORTED
        # The step created the SKU's stock row before finding it too small.
        assert await available(inv, step.order.sku) is None


async def test_execute_with_a_saga_input_of_the_wrong_type_is_a_business_failure(database_url: str) -> None:
    step = StepCall.new("ship")
    request = step.execute()
    request.saga_input.Pack(checkout_pb2.Shipment(tracking_number="not an order"))
    async with serving("shipping", database_url) as ship:
        code, details = await status_of(ship.stub.Execute(request))

        assert code == grpc.StatusCode.ABORTED
        assert "compensa.checkout.v1.CheckoutInput" in details
        assert await ship.rows(shipping.SHIPMENTS, saga_id=step.saga_id) == []


# --- Compensate ---------------------------------------------------------------


async def test_compensate_after_execute_releases_the_reservation(database_url: str) -> None:
    step = StepCall.new("reserve", quantity=4)
    async with serving("inventory", database_url) as inv:
        executed = await inv.stub.Execute(step.execute())
        compensated = await inv.stub.Compensate(step.compensate(execute_output=executed.output))

        reservation = unpack_as(executed.output, checkout_pb2.Reservation)
        assert unpack_as(compensated.output, checkout_pb2.Release).reservation_id == reservation.reservation_id
        rows = await inv.rows(inventory.RESERVATIONS, saga_id=step.saga_id)
        assert [r.status for r in rows] == ["released"]
        assert rows[0].released_at is not None
        assert await available(inv, step.order.sku) == INITIAL_STOCK


async def test_duplicate_compensates_refund_once(database_url: str) -> None:
    step = StepCall.new("charge", amount_cents=5_000)
    async with serving("payment", database_url) as pay:
        executed = await pay.stub.Execute(step.execute())
        first = await pay.stub.Compensate(step.compensate(attempt=1, execute_output=executed.output))
        concurrent = await asyncio.gather(
            *(pay.stub.Compensate(step.compensate(attempt=2, execute_output=executed.output)) for _ in range(5))
        )

        assert all(response == first for response in concurrent)
        charge = unpack_as(executed.output, checkout_pb2.Charge)
        refund = unpack_as(first.output, checkout_pb2.Refund)
        assert refund.charge_id == charge.charge_id
        refunds = await pay.rows(payment.REFUNDS, charge_id=charge.charge_id)
        assert [(r.refund_id, r.amount_cents) for r in refunds] == [(refund.refund_id, 5_000)]
        assert [c.status for c in await pay.rows(payment.CHARGES, saga_id=step.saga_id)] == ["refunded"]


async def test_compensate_uses_the_recorded_output_when_the_execute_answer_was_lost(database_url: str) -> None:
    step = StepCall.new("reserve", quantity=6)
    async with serving("inventory", database_url) as inv:
        executed = await inv.stub.Execute(step.execute())
        # The orchestrator never saw Execute's answer, so it sends no execute_output.
        compensated = await inv.stub.Compensate(step.compensate())

        reservation = unpack_as(executed.output, checkout_pb2.Reservation)
        assert unpack_as(compensated.output, checkout_pb2.Release).reservation_id == reservation.reservation_id
        assert await available(inv, step.order.sku) == INITIAL_STOCK


async def test_compensate_after_a_business_failure_has_nothing_to_undo(database_url: str) -> None:
    step = StepCall.new("charge", card_token="flagged-1")
    async with serving("payment", database_url) as pay:
        code, _ = await status_of(pay.stub.Execute(step.execute()))
        compensated = await pay.stub.Compensate(step.compensate())

        assert code == grpc.StatusCode.ABORTED
        assert not compensated.HasField("output")
        assert await pay.rows(payment.CHARGES, saga_id=step.saga_id) == []
        assert await pay.rows(payment.REFUNDS, saga_id=step.saga_id) == []


async def test_null_compensation_succeeds_and_a_hanging_execute_is_refused(database_url: str) -> None:
    step = StepCall.new("reserve", quantity=5)
    async with serving("inventory", database_url) as inv:
        compensated = await inv.stub.Compensate(step.compensate())
        hanging = await status_of(inv.stub.Execute(step.execute(attempt=1)))
        hanging_again = await status_of(inv.stub.Execute(step.execute(attempt=2)))
        compensated_again = await inv.stub.Compensate(step.compensate(attempt=2))

        assert not compensated.HasField("output")
        assert compensated_again == compensated
        assert hanging == (grpc.StatusCode.ABORTED, "compensated before it executed")
        assert hanging_again == hanging
        assert await inv.rows(inventory.RESERVATIONS, saga_id=step.saga_id) == []
        assert await available(inv, step.order.sku) is None


async def test_shipping_cannot_be_compensated(database_url: str) -> None:
    step = StepCall.new("ship")
    async with serving("shipping", database_url) as ship:
        executed = await ship.stub.Execute(step.execute())
        code, details = await status_of(ship.stub.Compensate(step.compensate(execute_output=executed.output)))

        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot be compensated" in details
        assert len(await ship.rows(shipping.SHIPMENTS, saga_id=step.saga_id)) == 1


async def test_racing_execute_and_compensate_agree_on_what_happened(database_url: str) -> None:
    async with serving("inventory", database_url) as inv:
        steps = [StepCall.new("reserve", quantity=3) for _ in range(8)]

        async def race(step: StepCall) -> tuple[tuple[grpc.StatusCode, str], participant_pb2.CompensateResponse]:
            executed, compensated = await asyncio.gather(
                status_of(inv.stub.Execute(step.execute())), inv.stub.Compensate(step.compensate())
            )
            return executed, compensated

        outcomes = await asyncio.gather(*(race(step) for step in steps))

        for step, (executed, compensated) in zip(steps, outcomes, strict=True):
            reservations = [r.status for r in await inv.rows(inventory.RESERVATIONS, saga_id=step.saga_id)]
            if executed[0] == grpc.StatusCode.OK:
                assert reservations == ["released"]
                assert compensated.HasField("output")
                assert await available(inv, step.order.sku) == INITIAL_STOCK
            else:
                assert executed == (grpc.StatusCode.ABORTED, "compensated before it executed")
                assert reservations == []
                assert not compensated.HasField("output")


# --- The SDK's handling of unexpected errors ------------------------------------

_ledger = sqlalchemy.MetaData()
_ENTRIES = sqlalchemy.Table(
    "sdk_test_entries",
    _ledger,
    sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True, autoincrement=True),
    sqlalchemy.Column("idempotency_key", sqlalchemy.String, nullable=False),
    sqlalchemy.Column("attempt", sqlalchemy.Integer, nullable=False),
)


class _FlakyParticipant(Participant):
    """Writes an entry, then fails transiently on attempt 1 and with a bug on attempt 2."""

    metadata = _ledger
    barrier_table_name = "sdk_test_barrier"

    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> checkout_pb2.Shipment:
        attempt = request.context.attempt
        await conn.execute(_ENTRIES.insert().values(idempotency_key=request.context.idempotency_key, attempt=attempt))
        if attempt == 1:
            raise TransientError("the warehouse is busy")
        if attempt == 2:
            raise ZeroDivisionError("a bug")
        return checkout_pb2.Shipment(tracking_number=f"attempt-{attempt}")


async def test_transient_errors_and_bugs_record_nothing_so_a_retry_runs_again(database_url: str) -> None:
    step = StepCall.new("flaky")
    async with serving_participant(_FlakyParticipant(create_participant_engine(database_url))) as flaky:
        transient = await status_of(flaky.stub.Execute(step.execute(attempt=1)))
        bug = await status_of(flaky.stub.Execute(step.execute(attempt=2)))
        assert await flaky.rows(_ENTRIES, idempotency_key=step.key) == []

        succeeded = await flaky.stub.Execute(step.execute(attempt=3))
        duplicate = await flaky.stub.Execute(step.execute(attempt=4))

        assert transient == (grpc.StatusCode.UNAVAILABLE, "the warehouse is busy")
        assert bug == (grpc.StatusCode.INTERNAL, "internal error: ZeroDivisionError")
        assert unpack_as(succeeded.output, checkout_pb2.Shipment).tracking_number == "attempt-3"
        assert duplicate == succeeded
        assert [r.attempt for r in await flaky.rows(_ENTRIES, idempotency_key=step.key)] == [3]


class _SloppyParticipant(Participant):
    """Returns what is not a protobuf message: a str from Execute, a dict from Compensate."""

    metadata = _ledger
    barrier_table_name = "sdk_sloppy_barrier"

    async def execute_step(self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest) -> Any:
        if request.context.step_name == "book_flight":
            return checkout_pb2.Shipment(tracking_number="flight-1")
        return "booked-123"

    async def compensate_step(self, conn: AsyncConnection, request: participant_pb2.CompensateRequest) -> Any:
        return {"cancelled": True}


async def test_a_step_that_returns_no_message_is_told_which_step_returned_what(tmp_path: Path) -> None:
    step = StepCall.new("book_hotel")
    engine = create_participant_engine(f"sqlite+aiosqlite:///{tmp_path / 'sloppy.db'}")
    async with serving_participant(_SloppyParticipant(engine)) as sloppy:
        executed = await status_of(sloppy.stub.Execute(step.execute()))
        assert executed == (
            grpc.StatusCode.INTERNAL,
            "step 'book_hotel': execute_step returned builtins.str ('booked-123'); expected a protobuf message or"
            " Pending (e.g. wrappers_pb2.StringValue(value=...))",
        )
        flight = StepCall.new("book_flight")
        await sloppy.stub.Execute(flight.execute())
        compensated = await status_of(sloppy.stub.Compensate(flight.compensate()))
        assert compensated == (
            grpc.StatusCode.INTERNAL,
            "step 'book_flight': compensate_step returned builtins.dict ({'cancelled': True}); expected a protobuf"
            " message or None (e.g. wrappers_pb2.StringValue(value=...))",
        )


def test_the_sdks_names_are_visible_to_dir() -> None:
    import compensa.participants

    shown = dir(compensa.participants)
    for name in ("Participant", "StepFailed", "serve", "create_participant_engine", "unpack_as", "Pending"):
        assert name in shown
    assert set(compensa.participants.__all__) <= set(shown)


# --- What a call costs the participant's database --------------------------------


async def test_on_sqlite_an_execute_is_one_transaction_with_two_barrier_statements_and_no_savepoint(
    tmp_path: Path,
) -> None:
    # The barrier is the claim and the answer, in the step's own transaction,
    # and nothing else.
    step = StepCall.new("ship")
    async with serving("shipping", f"sqlite+aiosqlite:///{tmp_path / 'participant.db'}") as ship:
        sent: list[tuple[int, str]] = []
        commits: list[int] = []

        def on_statement(conn: object, *args: object) -> None:
            words = str(args[1]).split()  # "INSERT INTO table", "UPDATE table", "SAVEPOINT name"
            sent.append((id(conn), " ".join(words[:3] if words[0] == "INSERT" else words[:2])))

        def on_commit(conn: object) -> None:
            commits.append(id(conn))

        engine = ship.running.engine.sync_engine
        sqlalchemy.event.listen(engine, "before_cursor_execute", on_statement)
        sqlalchemy.event.listen(engine, "commit", on_commit)
        try:
            response = await ship.stub.Execute(step.execute())
        finally:
            sqlalchemy.event.remove(engine, "before_cursor_execute", on_statement)
            sqlalchemy.event.remove(engine, "commit", on_commit)

        assert response.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED
        # Only the call's own connection: the health probe may use the engine meanwhile.
        (call,) = {conn for conn, statement in sent if statement == "INSERT INTO shipping_barrier"}
        assert [statement for conn, statement in sent if conn == call and statement != "BEGIN IMMEDIATE"] == [
            "INSERT INTO shipping_barrier",
            "INSERT INTO shipping_shipments",
            "UPDATE shipping_barrier",
        ]
        assert commits.count(call) == 1


def _calls_round_trips(traces: list[str], barrier_table: str) -> list[list[str]]:
    """The round trips of the calls' connection (the one that touched the
    barrier: the health probe may use the engine meanwhile), less psycopg's
    one-time preparation of a statement (sent on its own after a few calls)
    and any health probe's transaction between calls."""
    (calls,) = [round_trips(trace) for trace in traces if barrier_table in trace]
    calls = [trip for trip in calls if not trip[0].startswith("PREPARE")]
    probe = [["BEGIN"], ["SELECT 1"], ["COMMIT"]]
    while any(calls[at:at + 3] == probe for at in range(len(calls))):
        at = next(at for at in range(len(calls)) if calls[at:at + 3] == probe)
        del calls[at:at + 3]
    return calls


async def test_on_postgresql_the_barrier_adds_only_the_claims_round_trip_to_the_steps_transaction(
    postgres_url: str, tmp_path: Path
) -> None:
    # Every call pays for each round trip to the database (bench/run.py's
    # participant side counts them too). The claim's answer decides whether the
    # step runs, so it is waited for; BEGIN travels with it, and the answer with
    # COMMIT: the step's own statement is the only other round trip.
    steps = [StepCall.new("ship") for _ in range(8)]  # past psycopg's prepare threshold (5)
    async with serving("shipping", postgres_url) as ship:
        async with libpq_traces(ship.running.engine, tmp_path) as traces:
            for step in steps:
                response = await ship.stub.Execute(step.execute())
                assert response.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED
            sent = traces()

    calls = _calls_round_trips(sent, "shipping_barrier")
    one_call = [["BEGIN", "INSERT INTO shipping_barrier"], ["INSERT INTO shipping_shipments"],
                ["UPDATE shipping_barrier", "COMMIT"]]
    assert calls == one_call * len(steps)


async def test_on_postgresql_a_compensation_adds_only_one_round_trip_to_the_undos_transaction(
    postgres_url: str, tmp_path: Path
) -> None:
    # Compensate's barrier claims the Execute key (for an Execute that never
    # ran), claims its own and reads Execute's answer: all three travel with
    # BEGIN, and the answer with COMMIT.
    steps = [StepCall.new("reserve", quantity=1) for _ in range(8)]
    async with serving("inventory", postgres_url) as inv:
        for step in steps:
            assert (await inv.stub.Execute(step.execute())).result == participant_pb2.EXECUTE_RESULT_SUCCEEDED
        async with libpq_traces(inv.running.engine, tmp_path) as traces:
            for step in steps:
                await inv.stub.Compensate(step.compensate())
            never_ran = StepCall.new("reserve", quantity=1)
            await inv.stub.Compensate(never_ran.compensate())
            sent = traces()
        ours = {step.saga_id for step in steps}
        released = [row.status for row in await inv.rows(inventory.RESERVATIONS) if row.saga_id in ours]
        assert released == ["released"] * len(steps)

    calls = _calls_round_trips(sent, "inventory_barrier")
    claims = ["BEGIN", "INSERT INTO inventory_barrier", "INSERT INTO inventory_barrier", "SELECT outcome,"]
    answer = ["UPDATE inventory_barrier", "COMMIT"]
    starts = [at for at, trip in enumerate(calls) if trip == claims]
    assert len(starts) == len(steps) + 1, calls
    for begin, end in zip(starts, [*starts[1:], len(calls)], strict=True):
        one_call = calls[begin:end]
        # The claims, then the undo's own statements (none for a step that
        # never ran), then the answer with the commit.
        assert one_call[-1] == answer, one_call
        assert all("inventory_barrier" not in " ".join(trip) for trip in one_call[1:-1]), one_call


class _YieldingParticipant(Participant):
    """Attempt 1 fails for a business reason, but only once attempt 2 of its key
    waits for its claim; attempt 2 succeeds."""

    barrier_table_name = "sdk_yield_barrier"

    def __init__(self, url: str) -> None:
        # Attempt 1 holds its transaction open until attempt 2 waits for the
        # claim (up to 10s on a busy machine): more than the default bound on
        # a transaction, which would end it first.
        bound = 30.0
        super().__init__(create_participant_engine(url, database_timeout=bound), database_timeout=bound)
        self.observer = sqlalchemy.ext.asyncio.create_async_engine(url)
        self.first_claimed = asyncio.Event()

    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> checkout_pb2.Shipment:
        if request.context.attempt == 1:
            self.first_claimed.set()
            await self._until_a_call_waits_for_a_lock()
            raise StepFailed("declined")
        return checkout_pb2.Shipment(tracking_number="attempt-2")

    async def _record_failure(
        self, step: participant_pb2.StepContext, failure: StepFailed
    ) -> tuple[participant_pb2.ExecuteResponse, str, bool]:
        # Attempt 2 claims the key once attempt 1 rolls back; let it commit
        # before attempt 1 claims the key with its failure, which otherwise may
        # get there first (then both calls answer the failure, as they should).
        await self._until_the_key_is_answered(step.idempotency_key)
        return await super()._record_failure(step, failure)

    async def _until_the_key_is_answered(self, key: str, seconds: float = 10.0) -> None:
        answered = sqlalchemy.select(self.barrier.c.outcome).where(
            self.barrier.c.idempotency_key == key, self.barrier.c.outcome.is_not(None)
        )
        deadline = asyncio.get_running_loop().time() + seconds
        async with self.observer.connect() as conn:
            while (await conn.execute(answered)).first() is None:
                assert asyncio.get_running_loop().time() < deadline, "attempt 2 never committed"
                await asyncio.sleep(0.01)  # ok-sleep: polling the barrier table with a deadline

    async def _until_a_call_waits_for_a_lock(self, seconds: float = 10.0) -> None:
        waiting = sqlalchemy.text(
            "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
            " WHERE NOT granted AND datname = current_database()"
        )
        deadline = asyncio.get_running_loop().time() + seconds
        async with self.observer.connect() as conn:
            while not (await conn.execute(waiting)).scalar_one():
                assert asyncio.get_running_loop().time() < deadline, "attempt 2 never waited for the claim"
                await asyncio.sleep(0.01)  # ok-sleep: polling pg_locks with a deadline


async def test_a_business_failure_yields_to_a_call_that_committed_after_its_rollback(
    make_postgres_url: Callable[[], str],
) -> None:
    # A failed step rolls back its whole transaction, claim included, and then
    # claims the key with the failure; a call with the same key that claimed
    # it in between has committed by then, and its answer is both calls' answer.
    step = StepCall.new("ship")
    participant = _YieldingParticipant(make_postgres_url())
    try:
        async with serving_participant(participant) as served:
            first = asyncio.ensure_future(served.stub.Execute(step.execute(attempt=1)))
            await asyncio.wait_for(participant.first_claimed.wait(), timeout=10)
            second = await served.stub.Execute(step.execute(attempt=2))

            assert await first == second
            assert unpack_as(second.output, checkout_pb2.Shipment).tracking_number == "attempt-2"
            rows = await served.rows(participant.barrier, idempotency_key=step.key)
            assert [(row.operation, row.outcome) for row in rows] == [("execute", "succeeded")]
    finally:
        await participant.observer.dispose()


# --- Fault injection ----------------------------------------------------------


async def test_unavailable_attempts_answer_unavailable_then_succeed_once(database_url: str) -> None:
    step = StepCall.new("charge")
    async with serving("payment", database_url, FaultPlan(unavailable_attempts=2)) as pay:
        first = await status_of(pay.stub.Execute(step.execute(attempt=1)))
        second = await status_of(pay.stub.Execute(step.execute(attempt=2)))
        assert await pay.rows(payment.CHARGES, saga_id=step.saga_id) == []

        third = await pay.stub.Execute(step.execute(attempt=3))

        assert first[0] == second[0] == grpc.StatusCode.UNAVAILABLE
        assert third.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED
        assert len(await pay.rows(payment.CHARGES, saga_id=step.saga_id)) == 1


async def test_answer_lost_after_commit_then_a_retry_returns_the_stored_result(database_url: str) -> None:
    step = StepCall.new("reserve", quantity=7)
    async with serving("inventory", database_url, FaultPlan(fail_after_commit_rate=1.0)) as inv:
        lost = await status_of(inv.stub.Execute(step.execute(attempt=1)))
        rows_after_lost = await inv.rows(inventory.RESERVATIONS, saga_id=step.saga_id)

        retried = await inv.stub.Execute(step.execute(attempt=2))

        assert lost[0] == grpc.StatusCode.UNAVAILABLE
        assert len(rows_after_lost) == 1
        reservation = unpack_as(retried.output, checkout_pb2.Reservation)
        assert reservation.reservation_id == rows_after_lost[0].reservation_id
        assert len(await inv.rows(inventory.RESERVATIONS, saga_id=step.saga_id)) == 1
        assert await available(inv, step.order.sku) == INITIAL_STOCK - 7


async def test_delay_provokes_deadline_exceeded_and_the_retry_applies_once(database_url: str) -> None:
    step = StepCall.new("charge")
    async with serving("payment", database_url, FaultPlan(delay_seconds=30.0, delay_attempts=1)) as pay:
        timed_out = await status_of(pay.stub.Execute(step.execute(attempt=1), timeout=0.2))
        retried = await pay.stub.Execute(step.execute(attempt=2), timeout=10)

        assert timed_out[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert retried.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED
        assert len(await pay.rows(payment.CHARGES, saga_id=step.saga_id)) == 1


async def test_faults_apply_to_compensate_too(database_url: str) -> None:
    step = StepCall.new("reserve")
    async with serving("inventory", database_url, FaultPlan(unavailable_attempts=1)) as inv:
        executed = await inv.stub.Execute(step.execute(attempt=2))
        refused = await status_of(inv.stub.Compensate(step.compensate(attempt=1)))
        assert await available(inv, step.order.sku) == INITIAL_STOCK - 2

        await inv.stub.Compensate(step.compensate(attempt=2, execute_output=executed.output))

        assert refused[0] == grpc.StatusCode.UNAVAILABLE
        assert await available(inv, step.order.sku) == INITIAL_STOCK


# --- Serving ------------------------------------------------------------------


@pytest.mark.parametrize("kind", PARTICIPANT_KINDS)
async def test_health_reports_serving(database_url: str, kind: str) -> None:
    async with serving(kind, database_url) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        for service in ("", "compensa.v1.ParticipantService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_build_participant_rejects_an_unknown_kind(tmp_path: Path) -> None:
    engine = create_participant_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="unknown participant kind 'billing'"):
        build_participant("billing", engine)


# --- FaultPlan.parse ------------------------------------------------------------


def test_fault_plan_parses_a_cli_spec() -> None:
    plan = FaultPlan.parse("unavailable_rate=0.2, delay_seconds=1.5,unavailable_attempts=2,seed=7")

    assert plan == FaultPlan(unavailable_rate=0.2, delay_seconds=1.5, unavailable_attempts=2, seed=7)
    assert FaultPlan.parse(plan.describe()) == plan
    assert FaultPlan.parse("") == FaultPlan()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("explode=1", "unknown key 'explode'"),
        ("unavailable_rate", "expected key=value"),
        ("delay_seconds=soon", "delay_seconds must be a number"),
        ("unavailable_rate=1.5", "between 0 and 1"),
    ],
)
def test_fault_plan_rejects_a_bad_spec(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultPlan.parse(spec)


async def test_seeded_fault_plans_fail_the_same_attempts() -> None:
    async def outcomes(plan: FaultPlan) -> list[bool]:
        results: list[bool] = []
        for attempt in range(1, 50):
            try:
                await plan.before_call(attempt)
                results.append(True)
            except Exception:
                results.append(False)
        return results

    first = await outcomes(FaultPlan(unavailable_rate=0.5, seed=3))
    second = await outcomes(FaultPlan(unavailable_rate=0.5, seed=3))

    assert first == second
    assert True in first and False in first
