"""compensa.testing, used as a participant author would in their own tests:
their servicers, their definition, a real orchestrator on a temporary database."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import ClassVar

import sqlalchemy
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.checkout.v1 import checkout_pb2
from compensa.participants import Participant, StepFailed, TransientError, unpack_as
from compensa.testing import SagaTestEnvironment
from compensa.v1 import definition_pb2, participant_pb2, saga_pb2

# --- what the author wrote: two participants and a definition ----------------------

ledger_tables = sqlalchemy.MetaData()
ENTRIES = sqlalchemy.Table(
    "ledger_entries",
    ledger_tables,
    sqlalchemy.Column("entry_id", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("order_id", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("amount_cents", sqlalchemy.BigInteger, nullable=False),
    sqlalchemy.Column("status", sqlalchemy.String(16), nullable=False),
)


class Ledger(Participant):
    """Posts the order's amount; reverses it on compensation."""

    metadata: ClassVar[sqlalchemy.MetaData] = ledger_tables
    barrier_table_name: ClassVar[str] = "ledger_barrier"

    async def execute_step(self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest) -> Message:
        order = unpack_as(request.saga_input, checkout_pb2.CheckoutInput)
        entry_id = f"en-{uuid.uuid4().hex}"
        await conn.execute(
            ENTRIES.insert().values(
                entry_id=entry_id, order_id=order.order_id, amount_cents=order.amount_cents, status="posted"
            )
        )
        return wrappers_pb2.StringValue(value=entry_id)

    async def compensate_step(self, conn: AsyncConnection, request: participant_pb2.CompensateRequest) -> None:
        entry = unpack_as(request.execute_output, wrappers_pb2.StringValue)
        await conn.execute(ENTRIES.update().where(ENTRIES.c.entry_id == entry.value).values(status="reversed"))


class Mailer(Participant):
    """Sends the confirmation: a pivot-free last step that may refuse an address,
    and whose mail server is away on the first try."""

    barrier_table_name: ClassVar[str] = "mailer_barrier"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.tries = 0

    async def execute_step(self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest) -> Message:
        self.tries += 1
        if self.tries == 1:
            raise TransientError("mail server away")
        order = unpack_as(request.saga_input, checkout_pb2.CheckoutInput)
        if not order.shipping_address:
            raise StepFailed("no address to write to")
        return wrappers_pb2.StringValue(value=f"mailed {order.order_id}")


DEFINITION = """
name: post-and-mail
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: post
    participant: ledger
    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 10ms}
  - name: mail
    participant: mailer
    kind: RETRIABLE
    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 10ms}
"""


def _order(**changes: object) -> checkout_pb2.CheckoutInput:
    values: dict[str, object] = {"order_id": f"order-{uuid.uuid4().hex[:8]}", "amount_cents": 2_500,
                                 "shipping_address": "1 Saga Street"}
    values.update(changes)
    return checkout_pb2.CheckoutInput(**values)  # type: ignore[arg-type]


# --- their tests ------------------------------------------------------------------


async def _entries(ledger: Participant, order_id: str) -> list[str]:
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(sqlalchemy.select(ENTRIES.c.status).where(ENTRIES.c.order_id == order_id))).all()
    return [row.status for row in rows]


async def test_an_authors_saga_succeeds_through_a_transient_error(tmp_path: Path) -> None:
    (tmp_path / "post-and-mail.yaml").write_text(DEFINITION)
    async with SagaTestEnvironment.start(
        definitions=[tmp_path / "post-and-mail.yaml"], participants={"ledger": Ledger, "mailer": Mailer}
    ) as env:
        order = _order()
        saga = await env.client.execute("post-and-mail", order)

        assert saga.state == saga_pb2.SAGA_STATE_SUCCEEDED
        mail = next(step for step in saga.steps if step.name == "mail")
        assert mail.attempts == 2 and "mail server away" in mail.last_error
        assert await _entries(env.participant("ledger"), order.order_id) == ["posted"]


async def test_an_authors_saga_compensates_a_business_failure(tmp_path: Path) -> None:
    # The definition as a message this time, and one servicer made by the author.
    definition = definition_pb2.SagaDefinition(
        name="post-then-mail",
        input_type="compensa.checkout.v1.CheckoutInput",
        steps=[
            definition_pb2.StepDefinition(name="post", participant="ledger"),
            definition_pb2.StepDefinition(
                name="mail", participant="mailer",
                retry=definition_pb2.RetryPolicy(max_attempts=2),
            ),
        ],
    )
    async with SagaTestEnvironment.start(
        definitions=[definition], participants={"ledger": Ledger, "mailer": Mailer}
    ) as env:
        order = _order(shipping_address="")
        saga = await env.client.execute("post-then-mail", order)

        assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED
        assert "no address to write to" in saga.failure_reason
        assert await _entries(env.participant("ledger"), order.order_id) == ["reversed"]
        kinds = [event.type for event in await env.events(saga.saga_id)]
        assert kinds[-1] == saga_pb2.EVENT_TYPE_SAGA_COMPENSATED


class Sloppy(Participant):
    """Returns a str where a protobuf message is expected."""

    barrier_table_name: ClassVar[str] = "sloppy_barrier"

    async def execute_step(self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest) -> Message:
        return "booked"  # type: ignore[return-value]


async def test_a_step_that_returns_no_message_says_so_in_the_saga(tmp_path: Path) -> None:
    definition = definition_pb2.SagaDefinition(
        name="sloppy", input_type="compensa.checkout.v1.CheckoutInput",
        steps=[definition_pb2.StepDefinition(name="book", participant="sloppy",
                                             retry=definition_pb2.RetryPolicy(max_attempts=1))],
    )
    async with SagaTestEnvironment.start(definitions=[definition], participants={"sloppy": Sloppy}) as env:
        saga = await env.client.execute("sloppy", _order())
        assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED
        (step,) = saga.steps
        assert "step 'book': execute_step returned builtins.str ('booked'); expected a protobuf message" in (
            step.last_error
        ), step.last_error
