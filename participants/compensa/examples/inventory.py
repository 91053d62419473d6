"""The inventory participant of the checkout saga: reserves stock, releases it on compensation."""

from __future__ import annotations

import uuid
from typing import ClassVar

import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.checkout.v1 import checkout_pb2
from compensa.participants.faults import FaultPlan
from compensa.participants.sdk import Participant, StepFailed, insert_if_absent, unpack_as
from compensa.v1 import participant_pb2

metadata = sqlalchemy.MetaData()

#: Units of each SKU that can still be reserved.
STOCK = sqlalchemy.Table(
    "inventory_stock",
    metadata,
    sqlalchemy.Column("sku", sqlalchemy.String(128), primary_key=True),
    sqlalchemy.Column("available", sqlalchemy.Integer, nullable=False),
)

#: One row per reservation; `status` is 'reserved' or 'released'.
RESERVATIONS = sqlalchemy.Table(
    "inventory_reservations",
    metadata,
    sqlalchemy.Column("reservation_id", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("saga_id", sqlalchemy.String(256), nullable=False, index=True),
    sqlalchemy.Column("order_id", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("sku", sqlalchemy.String(128), nullable=False),
    sqlalchemy.Column("quantity", sqlalchemy.Integer, nullable=False),
    sqlalchemy.Column("status", sqlalchemy.String(16), nullable=False),
    sqlalchemy.Column("created_at", sqlalchemy.DateTime(timezone=True), nullable=False),
    sqlalchemy.Column("released_at", sqlalchemy.DateTime(timezone=True)),
)


class InventoryParticipant(Participant):
    """Execute reserves `quantity` of `sku` (Reservation); Compensate releases it (Release).

    Fails with "out of stock" when fewer units are available. A SKU seen for the
    first time starts with `initial_stock` units.
    """

    metadata: ClassVar[sqlalchemy.MetaData] = metadata
    barrier_table_name: ClassVar[str] = "inventory_barrier"

    def __init__(self, engine: AsyncEngine, *, faults: FaultPlan | None = None, initial_stock: int = 1000) -> None:
        super().__init__(engine, faults=faults)
        self.initial_stock = initial_stock

    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> checkout_pb2.Reservation:
        """Takes the units from stock and records a reservation."""
        order = unpack_as(request.saga_input, checkout_pb2.CheckoutInput)
        if order.quantity <= 0:
            raise StepFailed(f"quantity must be positive, got {order.quantity}")
        await insert_if_absent(conn, STOCK, {"sku": order.sku, "available": self.initial_stock})
        taken = await conn.execute(
            STOCK.update()
            .where(STOCK.c.sku == order.sku, STOCK.c.available >= order.quantity)
            .values(available=STOCK.c.available - order.quantity)
        )
        if taken.rowcount != 1:
            raise StepFailed("out of stock")
        reservation_id = f"res-{uuid.uuid4().hex}"
        await conn.execute(
            RESERVATIONS.insert().values(
                reservation_id=reservation_id,
                saga_id=request.context.saga_id,
                order_id=order.order_id,
                sku=order.sku,
                quantity=order.quantity,
                status="reserved",
                created_at=sqlalchemy.func.now(),
            )
        )
        return checkout_pb2.Reservation(reservation_id=reservation_id, sku=order.sku, quantity=order.quantity)

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> checkout_pb2.Release:
        """Marks the reservation released and puts its units back in stock."""
        reservation = unpack_as(request.execute_output, checkout_pb2.Reservation)
        released = await conn.execute(
            RESERVATIONS.update()
            .where(
                RESERVATIONS.c.reservation_id == reservation.reservation_id,
                RESERVATIONS.c.status == "reserved",
            )
            .values(status="released", released_at=sqlalchemy.func.now())
        )
        # The barrier runs this once per key; a reservation already released
        # here means the tables were changed behind the barrier's back.
        if released.rowcount != 1:
            raise RuntimeError(f"reservation {reservation.reservation_id} is not reserved")
        await conn.execute(
            STOCK.update()
            .where(STOCK.c.sku == reservation.sku)
            .values(available=STOCK.c.available + reservation.quantity)
        )
        return checkout_pb2.Release(reservation_id=reservation.reservation_id)
