"""The fraud participant of the parallel checkout saga: screens the order, voids the check on compensation."""

from __future__ import annotations

import uuid
from typing import ClassVar

import sqlalchemy
from google.protobuf import struct_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.checkout.v1 import checkout_pb2
from compensa.participants.sdk import Participant, StepFailed, unpack_as
from compensa.v1 import participant_pb2

metadata = sqlalchemy.MetaData()

#: One row per fraud check; `status` is 'cleared' or 'voided'.
CHECKS = sqlalchemy.Table(
    "fraud_checks",
    metadata,
    sqlalchemy.Column("check_id", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("saga_id", sqlalchemy.String(256), nullable=False, index=True),
    sqlalchemy.Column("order_id", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("card_token", sqlalchemy.String(256), nullable=False),
    sqlalchemy.Column("status", sqlalchemy.String(16), nullable=False),
    sqlalchemy.Column("created_at", sqlalchemy.DateTime(timezone=True), nullable=False),
    sqlalchemy.Column("voided_at", sqlalchemy.DateTime(timezone=True)),
)

#: Card tokens starting with this are refused as stolen.
STOLEN_PREFIX = "stolen"


class FraudParticipant(Participant):
    """Execute clears the order and records the check (a Struct with `check_id`);
    Compensate voids the check, so a later order is not vouched for by it.

    Refuses cards whose token starts with "stolen".
    """

    metadata: ClassVar[sqlalchemy.MetaData] = metadata
    barrier_table_name: ClassVar[str] = "fraud_barrier"

    async def execute_step(self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest) -> struct_pb2.Struct:
        """Records a cleared check of the order, or refuses a stolen card."""
        order = unpack_as(request.saga_input, checkout_pb2.CheckoutInput)
        if order.card_token.startswith(STOLEN_PREFIX):
            raise StepFailed("fraud suspected: stolen card")
        check_id = f"fc-{uuid.uuid4().hex}"
        await conn.execute(
            CHECKS.insert().values(
                check_id=check_id,
                saga_id=request.context.saga_id,
                order_id=order.order_id,
                card_token=order.card_token,
                status="cleared",
                created_at=sqlalchemy.func.now(),
            )
        )
        output = struct_pb2.Struct()
        output.update({"check_id": check_id})
        return output

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> struct_pb2.Struct:
        """Marks the check voided."""
        check = unpack_as(request.execute_output, struct_pb2.Struct)
        check_id = str(check["check_id"])
        voided = await conn.execute(
            CHECKS.update()
            .where(CHECKS.c.check_id == check_id, CHECKS.c.status == "cleared")
            .values(status="voided", voided_at=sqlalchemy.func.now())
        )
        # The barrier runs this once per key; a check already voided here
        # means the tables were changed behind the barrier's back.
        if voided.rowcount != 1:
            raise RuntimeError(f"fraud check {check_id} is not cleared")
        output = struct_pb2.Struct()
        output.update({"check_id": check_id, "status": "voided"})
        return output
