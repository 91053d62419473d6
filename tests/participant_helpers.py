"""Building participant requests and calling a running participant, for the participant tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import sqlalchemy

from compensa.checkout.v1 import checkout_pb2
from compensa.examples.server import RunningParticipant, start_participant, start_server
from compensa.participants.faults import FaultPlan
from compensa.participants.sdk import Participant, pack
from compensa.v1 import participant_pb2, participant_pb2_grpc

if TYPE_CHECKING:
    from compensa.v1.participant_pb2_grpc import ParticipantServiceAsyncStub


def checkout_input(**overrides: Any) -> checkout_pb2.CheckoutInput:
    """A valid checkout input with a unique order and SKU, so tests sharing a database don't interact."""
    unique = uuid.uuid4().hex[:12]
    values: dict[str, Any] = {
        "order_id": f"order-{unique}",
        "sku": f"sku-{unique}",
        "quantity": 2,
        "amount_cents": 4_200,
        "card_token": "tok_visa",
        "shipping_address": "1 Saga Street, Springfield",
    }
    values.update(overrides)
    return checkout_pb2.CheckoutInput(**values)


@dataclass(frozen=True)
class StepCall:
    """One step of one saga: builds its Execute and Compensate requests."""

    order: checkout_pb2.CheckoutInput
    step_name: str
    saga_id: str = ""

    @classmethod
    def new(cls, step_name: str, **overrides: Any) -> StepCall:
        """A step of a fresh saga with a fresh checkout input."""
        return cls(order=checkout_input(**overrides), step_name=step_name, saga_id=f"saga-{uuid.uuid4().hex}")

    @property
    def key(self) -> str:
        """The idempotency key, as the orchestrator derives it: one per saga and step."""
        return f"{self.saga_id}/{self.step_name}"

    def context(self, attempt: int) -> participant_pb2.StepContext:
        return participant_pb2.StepContext(
            saga_id=self.saga_id,
            step_name=self.step_name,
            idempotency_key=self.key,
            attempt=attempt,
            definition_name="checkout",
            definition_version=1,
        )

    def execute(self, attempt: int = 1) -> participant_pb2.ExecuteRequest:
        return participant_pb2.ExecuteRequest(context=self.context(attempt), saga_input=pack(self.order))

    def compensate(
        self, attempt: int = 1, execute_output: Any = None
    ) -> participant_pb2.CompensateRequest:
        request = participant_pb2.CompensateRequest(
            context=self.context(attempt), saga_input=pack(self.order), reason="a later step failed"
        )
        if execute_output is not None:
            request.execute_output.CopyFrom(execute_output)
        return request


@dataclass
class Connected:
    """A running participant and a stub over a real channel to it."""

    running: RunningParticipant
    stub: ParticipantServiceAsyncStub
    channel: grpc.aio.Channel

    async def rows(self, table: sqlalchemy.Table, **where: Any) -> list[sqlalchemy.Row[Any]]:
        """The rows of one of the participant's tables matching `where` (column=value)."""
        query = sqlalchemy.select(table).where(*(table.c[name] == value for name, value in where.items()))
        async with self.running.engine.connect() as conn:
            return list((await conn.execute(query)).all())


@asynccontextmanager
async def serving(kind: str, database_url: str, faults: FaultPlan | None = None) -> AsyncIterator[Connected]:
    """Starts participant `kind` on port 0 and yields it with a connected stub; stops it after."""
    async with connected(await start_participant(kind, database_url, faults=faults)) as participant:
        yield participant


@asynccontextmanager
async def serving_participant(participant: Participant) -> AsyncIterator[Connected]:
    """Serves `participant` on port 0 and yields it with a connected stub; stops it after."""
    async with connected(await start_server(participant)) as served:
        yield served


@asynccontextmanager
async def connected(running: RunningParticipant) -> AsyncIterator[Connected]:
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = participant_pb2_grpc.ParticipantServiceStub(channel)
            yield Connected(running, stub, channel)
    finally:
        await running.stop()


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details a call ended with (OK for a successful one)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""
