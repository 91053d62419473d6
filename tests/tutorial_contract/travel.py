import asyncio
import sys
import uuid

import sqlalchemy as sa
from google.protobuf.wrappers_pb2 import StringValue
from sqlalchemy.ext.asyncio import AsyncConnection
from trip_compensa import FlightsBase, HotelsBase
from trip_pb2 import TripInput

from compensa.participants import StepFailed, create_participant_engine, serve
from compensa.v1.participant_pb2 import StepContext

tables = sa.MetaData()
BOOKINGS = sa.Table(
    "bookings", tables,
    sa.Column("reference", sa.String(64), primary_key=True),
    sa.Column("saga_id", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
)


async def book(conn: AsyncConnection, ctx: StepContext) -> StringValue:
    reference = f"{ctx.step_name}-{uuid.uuid4().hex[:8]}"
    await conn.execute(BOOKINGS.insert().values(reference=reference, saga_id=ctx.saga_id, status="booked"))
    return StringValue(value=reference)


async def cancel(conn: AsyncConnection, booking: StringValue) -> None:
    await conn.execute(BOOKINGS.update().where(BOOKINGS.c.reference == booking.value).values(status="cancelled"))


class Hotels(HotelsBase):
    metadata = tables
    barrier_table_name = "hotels_barrier"

    async def book_hotel(self, conn: AsyncConnection, trip: TripInput, ctx: StepContext) -> StringValue:
        return await book(conn, ctx)

    async def undo_book_hotel(
        self, conn: AsyncConnection, trip: TripInput, string_value: StringValue, ctx: StepContext
    ) -> None:
        await cancel(conn, string_value)


class Flights(FlightsBase):
    metadata = tables
    barrier_table_name = "flights_barrier"

    async def book_flight(self, conn: AsyncConnection, trip: TripInput, ctx: StepContext) -> StringValue:
        if trip.destination == "Atlantis":
            raise StepFailed("no flights to Atlantis")
        return await book(conn, ctx)

    async def undo_book_flight(
        self, conn: AsyncConnection, trip: TripInput, string_value: StringValue, ctx: StepContext
    ) -> None:
        await cancel(conn, string_value)


if __name__ == "__main__":
    name, port = sys.argv[1], sys.argv[2]
    participant = {"hotels": Hotels, "flights": Flights}[name]
    engine = create_participant_engine(f"sqlite+aiosqlite:///{name}.db")
    asyncio.run(serve(participant(engine), listen=f"127.0.0.1:{port}"))
