"""The payment participant of the checkout saga: charges the card, refunds on compensation."""

from __future__ import annotations

import uuid
from typing import ClassVar

import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.checkout.v1 import checkout_pb2
from compensa.v1 import participant_pb2
from participants.faults import FaultPlan
from participants.sdk import Participant, StepFailed, unpack_as

metadata = sqlalchemy.MetaData()

#: One row per charge; `status` is 'charged' or 'refunded'.
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
    "flagged", and amounts that are not positive.
    """

    metadata: ClassVar[sqlalchemy.MetaData] = metadata
    barrier_table_name: ClassVar[str] = "payment_barrier"

    def __init__(
        self, engine: AsyncEngine, *, faults: FaultPlan | None = None, card_limit_cents: int = 100_000
    ) -> None:
        super().__init__(engine, faults=faults)
        self.card_limit_cents = card_limit_cents

    async def execute_step(self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest) -> checkout_pb2.Charge:
        """Records a charge of `amount_cents` on `card_token`, or declines it."""
        order = unpack_as(request.saga_input, checkout_pb2.CheckoutInput)
        if order.amount_cents <= 0:
            raise StepFailed(f"amount must be positive, got {order.amount_cents} cents")
        if order.card_token.startswith("flagged"):
            raise StepFailed("card declined: flagged card")
        if order.amount_cents > self.card_limit_cents:
            raise StepFailed(f"card declined: {order.amount_cents} cents is over the limit of {self.card_limit_cents}")
        charge_id = f"ch-{uuid.uuid4().hex}"
        await conn.execute(
            CHARGES.insert().values(
                charge_id=charge_id,
                saga_id=request.context.saga_id,
                order_id=order.order_id,
                card_token=order.card_token,
                amount_cents=order.amount_cents,
                status="charged",
                created_at=sqlalchemy.func.now(),
            )
        )
        return checkout_pb2.Charge(charge_id=charge_id, amount_cents=order.amount_cents)

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> checkout_pb2.Refund:
        """Marks the charge refunded and records the refund."""
        charge = unpack_as(request.execute_output, checkout_pb2.Charge)
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
