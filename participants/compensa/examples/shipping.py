"""The shipping participant of the checkout saga: ships the order, the saga's pivot step."""

from __future__ import annotations

import uuid
from typing import ClassVar

import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.checkout.v1 import checkout_pb2
from compensa.participants.sdk import Participant, unpack_as
from compensa.v1 import participant_pb2

metadata = sqlalchemy.MetaData()

#: One row per shipment.
SHIPMENTS = sqlalchemy.Table(
    "shipping_shipments",
    metadata,
    sqlalchemy.Column("tracking_number", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("saga_id", sqlalchemy.String(256), nullable=False, index=True),
    sqlalchemy.Column("order_id", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("address", sqlalchemy.Text, nullable=False),
    sqlalchemy.Column("created_at", sqlalchemy.DateTime(timezone=True), nullable=False),
)


class ShippingParticipant(Participant):
    """Execute ships the order (Shipment). A parcel cannot be unshipped: Compensate
    answers FAILED_PRECONDITION (the base class default)."""

    metadata: ClassVar[sqlalchemy.MetaData] = metadata
    barrier_table_name: ClassVar[str] = "shipping_barrier"

    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> checkout_pb2.Shipment:
        """Records a shipment to `shipping_address` and returns its tracking number."""
        order = unpack_as(request.saga_input, checkout_pb2.CheckoutInput)
        tracking_number = f"TRK-{uuid.uuid4().hex[:16].upper()}"
        await conn.execute(
            SHIPMENTS.insert().values(
                tracking_number=tracking_number,
                saga_id=request.context.saga_id,
                order_id=order.order_id,
                address=order.shipping_address,
                created_at=sqlalchemy.func.now(),
            )
        )
        return checkout_pb2.Shipment(tracking_number=tracking_number)
