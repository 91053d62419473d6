"""Building participant requests and calling a running participant, for the participant tests."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncEngine

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


# A frontend message in a libpq trace (REGRESS_MODE): Parse's statement name and
# text (which may hold quotes of its own), Bind's portal and statement, Query's text.
_PARSE = re.compile(r'^ "([^"]*)" "(.*)" \d+(?: \w+)*$')
_BIND = re.compile(r'^ "[^"]*" "([^"]*)"')
_QUERY = re.compile(r'^ "(.*)"$')


def round_trips(trace: str) -> list[list[str]]:
    """The round trips in a libpq trace (REGRESS_MODE, no timestamps): one per
    simple Query and per Sync, the frontend then waiting for its answer; each
    as the statements it carried ("BEGIN", "INSERT INTO table", "UPDATE table";
    "PREPARE ..." for psycopg's one-time preparation of a statement on a
    connection, sent on its own outside pipeline mode)."""
    trips: list[list[str]] = []
    executed: list[str] = []
    prepared: list[str] = []
    named: dict[str, str] = {}
    statement = ""
    for line in trace.splitlines():
        fields = line.split("\t", 3)
        if len(fields) < 3 or fields[0] != "F":
            continue
        kind, rest = fields[2], fields[3] if len(fields) > 3 else ""
        if kind == "Parse" and (parse := _PARSE.match(rest)):
            name, statement = parse.groups()
            if name:
                named[name] = statement
                prepared.append(f"PREPARE {_label(statement)}")
        elif kind == "Bind" and (bind := _BIND.match(rest)):
            statement = named.get(bind.group(1), statement)
        elif kind == "Execute":
            executed.append(_label(statement))
        elif kind == "Query" and (query := _QUERY.match(rest)):
            trips.append([*executed, _label(query.group(1))])
            executed, prepared = [], []
        elif kind == "Sync":
            trips.append(executed or prepared)
            executed, prepared = [], []
    return trips


def _label(sql: str) -> str:
    words = sql.replace('"', "").split()
    return " ".join(words[:3] if words[:1] == ["INSERT"] else words[:2])


@asynccontextmanager
async def libpq_traces(engine: AsyncEngine, directory: Path) -> AsyncIterator[Callable[[], list[str]]]:
    """Makes every connection `engine` opens from now on (its pool is emptied
    first) write libpq's protocol trace to a file of its own in `directory`;
    yields a function that returns the traces so far, one per connection."""
    await engine.dispose()
    files: list[tuple[Path, psycopg.pq.abc.PGconn]] = []

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        path = directory / f"connection-{len(files)}.trace"
        pgconn = dbapi_connection.driver_connection.pgconn
        # psycopg fdopen()s the descriptor, and untrace() closes it.
        pgconn.trace(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        files.append((path, pgconn))

    def traces() -> list[str]:
        for _path, pgconn in files:
            pgconn.untrace()  # flushes libpq's buffer
        return [path.read_text(errors="replace") for path, _pgconn in files]

    sqlalchemy.event.listen(engine.sync_engine, "connect", on_connect)
    try:
        yield traces
    finally:
        sqlalchemy.event.remove(engine.sync_engine, "connect", on_connect)
