"""The payment participant of the checkout saga: charges the card, refunds on compensation.

A card whose token starts with "review" is held for review instead of charged:
Execute answers PENDING (charge_card is long_running in the checkout
definitions), and `PaymentParticipant.review` settles the hold later and
reports the outcome to the orchestrator with the step's completion token. A
hold nobody reviews is released when the saga compensates (the step's
step_timeout passes, or the saga is cancelled).
"""

from __future__ import annotations

import uuid
from typing import ClassVar

import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.checkout.v1 import checkout_pb2
from compensa.participants.faults import FaultPlan
from compensa.participants.sdk import CompleteStep, Participant, Pending, StepFailed, unpack_as
from compensa.v1 import participant_pb2

metadata = sqlalchemy.MetaData()

#: One row per charge; `status` is 'held' (waiting for review), 'charged',
#: 'declined' (a hold the review refused), 'released' (a hold undone by
#: compensation) or 'refunded'.
CHARGES = sqlalchemy.Table(
    "payment_charges",
    metadata,
    sqlalchemy.Column("charge_id", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("saga_id", sqlalchemy.String(256), nullable=False, index=True),
    sqlalchemy.Column("order_id", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("card_token", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("amount_cents", sqlalchemy.BigInteger, nullable=False),
    sqlalchemy.Column("status", sqlalchemy.String(16), nullable=False),
    sqlalchemy.Column("created_at", sqlalchemy.DateTime(timezone=True), nullable=False),
    sqlalchemy.Column("refunded_at", sqlalchemy.DateTime(timezone=True)),
    # A held charge's token for CompleteStep: kept with the hold, in its transaction.
    sqlalchemy.Column("completion_token", sqlalchemy.Text),
)

#: One row per refund of a charge.
REFUNDS = sqlalchemy.Table(
    "payment_refunds",
    metadata,
    sqlalchemy.Column("refund_id", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("charge_id", sqlalchemy.String(64), nullable=False, index=True),
    sqlalchemy.Column("saga_id", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("amount_cents", sqlalchemy.BigInteger, nullable=False),
    sqlalchemy.Column("created_at", sqlalchemy.DateTime(timezone=True), nullable=False),
)


class PaymentParticipant(Participant):
    """Execute charges the card (Charge); Compensate refunds the charge (Refund).

    Declines amounts above `card_limit_cents`, cards whose token starts with
    "flagged", and amounts that are not positive. Holds the charge of a card
    whose token starts with "review" (see the module docstring); `complete_step`
    reports reviewed holds to the orchestrator, e.g. `SagaClient.complete_step`.
    """

    metadata: ClassVar[sqlalchemy.MetaData] = metadata
    barrier_table_name: ClassVar[str] = "payment_barrier"

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        faults: FaultPlan | None = None,
        card_limit_cents: int = 100_000,
        complete_step: CompleteStep | None = None,
    ) -> None:
        super().__init__(engine, faults=faults)
        self.card_limit_cents = card_limit_cents
        self.complete_step = complete_step

    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> checkout_pb2.Charge | Pending:
        """Records a charge of `amount_cents` on `card_token`, holds it for
        review (Pending), or declines it."""
        order = unpack_as(request.saga_input, checkout_pb2.CheckoutInput)
        if order.amount_cents <= 0:
            raise StepFailed(f"amount must be positive, got {order.amount_cents} cents")
        if order.card_token.startswith("flagged"):
            raise StepFailed("card declined: flagged card")
        if order.amount_cents > self.card_limit_cents:
            raise StepFailed(f"card declined: {order.amount_cents} cents is over the limit of {self.card_limit_cents}")
        held = order.card_token.startswith("review")
        charge_id = f"ch-{uuid.uuid4().hex}"
        await conn.execute(
            CHARGES.insert().values(
                charge_id=charge_id,
                saga_id=request.context.saga_id,
                order_id=order.order_id,
                card_token=order.card_token,
                amount_cents=order.amount_cents,
                status="held" if held else "charged",
                created_at=sqlalchemy.func.now(),
                completion_token=request.completion_token if held else None,
            )
        )
        charge = checkout_pb2.Charge(charge_id=charge_id, amount_cents=order.amount_cents)
        return Pending(charge) if held else charge

    async def review(self, charge_id: str, *, approve: bool, reason: str = "declined on review") -> bool:
        """Settles a held charge (charged when `approve`, else declined) and
        reports the step's outcome; False if the hold was released meanwhile
        (the saga compensated). Safe to repeat: a settled charge is reported
        again with the same outcome."""
        if self.complete_step is None:
            raise RuntimeError("this payment participant has no complete_step to report reviews with")
        async with self.engine.begin() as conn:
            await conn.execute(
                CHARGES.update()
                .where(CHARGES.c.charge_id == charge_id, CHARGES.c.status == "held")
                .values(status="charged" if approve else "declined")
            )
            row = (
                await conn.execute(
                    sqlalchemy.select(CHARGES.c.status, CHARGES.c.amount_cents, CHARGES.c.completion_token).where(
                        CHARGES.c.charge_id == charge_id
                    )
                )
            ).one()
        if row.status not in ("charged", "declined") or not row.completion_token:
            return False
        if row.status == "charged":
            charge = checkout_pb2.Charge(charge_id=charge_id, amount_cents=row.amount_cents)
            await self.complete_step(row.completion_token, output=charge)
        else:
            await self.complete_step(row.completion_token, failure_reason=f"card declined: {reason}")
        return True

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> checkout_pb2.Refund:
        """Marks the charge refunded and records the refund; a hold is released
        instead (nothing was charged: the Refund has no refund_id)."""
        charge = unpack_as(request.execute_output, checkout_pb2.Charge)
        released = await conn.execute(
            CHARGES.update()
            .where(CHARGES.c.charge_id == charge.charge_id, CHARGES.c.status.in_(("held", "declined")))
            .values(status="released", refunded_at=sqlalchemy.func.now())
        )
        if released.rowcount == 1:
            return checkout_pb2.Refund(charge_id=charge.charge_id)
        refunded = await conn.execute(
            CHARGES.update()
            .where(CHARGES.c.charge_id == charge.charge_id, CHARGES.c.status == "charged")
            .values(status="refunded", refunded_at=sqlalchemy.func.now())
        )
        # The barrier runs this once per key; a charge already refunded here
        # means the tables were changed behind the barrier's back.
        if refunded.rowcount != 1:
            raise RuntimeError(f"charge {charge.charge_id} is not in state charged")
        refund_id = f"rf-{uuid.uuid4().hex}"
        await conn.execute(
            REFUNDS.insert().values(
                refund_id=refund_id,
                charge_id=charge.charge_id,
                saga_id=request.context.saga_id,
                amount_cents=charge.amount_cents,
                created_at=sqlalchemy.func.now(),
            )
        )
        return checkout_pb2.Refund(refund_id=refund_id, charge_id=charge.charge_id)
