"""The barrier's statements: the rows the SDK writes in a participant's
database, in the step's own transaction, to run each step once per key.

A barrier transaction starts with a claim, an INSERT of the key's row that
does nothing if the row exists, and, when the step ran, stores the step's
answer in that row as it commits. The claim's result decides whether the
step runs, so waiting for it is the one round trip the barrier must add.

On PostgreSQL through psycopg, nothing else is added: in pipeline mode the
BEGIN travels with the claim and the answer's UPDATE with the COMMIT, so an
Execute whose step sends no statement of its own costs two round trips, as
BEGIN and COMMIT alone would (a Compensate too: its two claims and its read
of Execute's answer travel with the BEGIN) (bench/run.py's participant side counts them
from a libpq trace). psycopg would send a BEGIN of its own, and wait for it,
before the first statement of a transaction; so during a barrier transaction
the connection is in psycopg's autocommit mode and the transaction is the
explicit BEGIN ... COMMIT sent here. Elsewhere (SQLite) the statements go one
by one through SQLAlchemy.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy
from psycopg import sql
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.common.database import abort_when_late

__all__ = [
    "BarrierRow", "BarrierTransaction", "CompensationClaims", "barrier_table", "barrier_transaction",
    "insert_if_absent",
]


def barrier_table(name: str) -> sqlalchemy.Table:
    """The barrier table called `name`: one row per (idempotency key, operation),
    indexed by saga and by creation time."""
    return sqlalchemy.Table(
        name,
        sqlalchemy.MetaData(),
        sqlalchemy.Column("idempotency_key", sqlalchemy.String, primary_key=True),
        sqlalchemy.Column("operation", sqlalchemy.String(16), primary_key=True),
        sqlalchemy.Column("saga_id", sqlalchemy.String, nullable=False),
        sqlalchemy.Column("step_name", sqlalchemy.String, nullable=False),
        # NULL only while the inserting transaction is still running.
        sqlalchemy.Column("outcome", sqlalchemy.String(32)),
        # The serialized ExecuteResponse or CompensateResponse answered.
        sqlalchemy.Column("response", sqlalchemy.LargeBinary),
        sqlalchemy.Column("created_at", sqlalchemy.DateTime(timezone=True), nullable=False),
        # The audit reads a saga's rows, and retention deletes the oldest
        # (compensa.participants.retention).
        sqlalchemy.Index(f"{name}_saga_id", "saga_id"),
        sqlalchemy.Index(f"{name}_created_at", "created_at"),
    )


async def insert_if_absent(conn: AsyncConnection, table: sqlalchemy.Table, values: Mapping[str, Any]) -> bool:
    """Inserts a row unless its primary key exists (ON CONFLICT DO NOTHING).

    True if this call inserted the row. On PostgreSQL a concurrent insert of the
    same key waits until the other transaction ends, then conflicts.
    """
    dialect = conn.dialect.name
    statement: sqlalchemy.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(table).values(dict(values)).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(table).values(dict(values)).on_conflict_do_nothing()
    else:
        raise NotImplementedError(f"database {dialect!r} is not supported (PostgreSQL or SQLite)")
    # RETURNING rather than rowcount: psycopg's async cursor reports -1 here.
    inserted = await conn.execute(statement.returning(*table.primary_key.columns))
    return inserted.first() is not None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class BarrierRow:
    """A barrier row as a claim inserts it; `outcome` None until the answer is stored."""

    idempotency_key: str
    operation: str
    saga_id: str
    step_name: str
    outcome: str | None = None
    response: bytes | None = None
    created_at: datetime.datetime = field(default_factory=_now)

    def values(self) -> tuple[str, str, str, str, str | None, bytes | None, datetime.datetime]:
        """The row's values, in the barrier table's column order."""
        return (
            self.idempotency_key, self.operation, self.saga_id, self.step_name, self.outcome, self.response,
            self.created_at,
        )


@dataclass(frozen=True)
class CompensationClaims:
    """What a Compensate's claims found (`BarrierTransaction.claim_compensation`)."""

    #: This call took the Execute key: Execute never ran (and now never will).
    execute_claimed: bool
    #: This call took the Compensate key; False: another Compensate has it.
    compensate_claimed: bool
    #: Execute's stored (outcome, answer), read after the claims.
    execute: tuple[str, bytes] | None


@dataclass(frozen=True)
class _Answer:
    idempotency_key: str
    operation: str
    outcome: str
    response: bytes


class BarrierTransaction(abc.ABC):
    """One barrier transaction; `conn` is the step's connection, in it.

    Its first statement is a claim. An answer given with `answer` is stored as
    the transaction commits, which it does when the block that opened it ends
    without an exception (`barrier_transaction`).
    """

    def __init__(self, conn: AsyncConnection, table: sqlalchemy.Table) -> None:
        self.conn = conn
        self.table = table
        self._answer: _Answer | None = None

    @abc.abstractmethod
    async def claim(self, row: BarrierRow) -> bool:
        """Inserts `row` unless its (key, operation) exists; True if this call inserted it."""

    @abc.abstractmethod
    async def stored(self, key: str, operation: str) -> tuple[str, bytes]:
        """The outcome and serialized answer of a committed barrier row."""

    async def claim_compensation(self, execute: BarrierRow, compensate: BarrierRow) -> CompensationClaims:
        """A Compensate's claims: the Execute key (`execute`, taken only if
        Execute never ran), its own (`compensate`), then Execute's answer."""
        execute_claimed = await self.claim(execute)
        compensate_claimed = await self.claim(compensate)
        stored = None if execute_claimed else await self.stored(execute.idempotency_key, execute.operation)
        return CompensationClaims(execute_claimed, compensate_claimed, stored)

    def answer(self, key: str, operation: str, outcome: str, response: bytes) -> None:
        """Stores `outcome` and `response` in the row this transaction claimed, as it commits."""
        self._answer = _Answer(key, operation, outcome, response)

    @abc.abstractmethod
    async def _finish(self) -> None:
        """Stores the answer, if any; commits too if it can send both at once."""


class _SqlAlchemyBarrier(BarrierTransaction):
    """Each statement on its own, through SQLAlchemy Core (SQLite; psycopg without pipeline mode)."""

    async def claim(self, row: BarrierRow) -> bool:
        values = dict(zip(self.table.columns.keys(), row.values(), strict=True))
        return await insert_if_absent(self.conn, self.table, values)

    async def stored(self, key: str, operation: str) -> tuple[str, bytes]:
        table = self.table
        query = sqlalchemy.select(table.c.outcome, table.c.response).where(
            table.c.idempotency_key == key, table.c.operation == operation
        )
        row = (await self.conn.execute(query)).one()
        return str(row.outcome), bytes(row.response or b"")

    async def _finish(self) -> None:
        answer, table = self._answer, self.table
        if answer is not None:
            await self.conn.execute(
                table.update()
                .where(table.c.idempotency_key == answer.idempotency_key, table.c.operation == answer.operation)
                .values(outcome=answer.outcome, response=answer.response)
            )


@dataclass(frozen=True)
class _Statements:
    """The barrier's statements on PostgreSQL, for psycopg, for one table."""

    claim: bytes
    stored: bytes
    answer: bytes


@functools.cache
def _statements(table_name: str) -> _Statements:
    table = sql.Identifier(table_name)
    return _Statements(
        claim=sql.SQL(
            "INSERT INTO {} (idempotency_key, operation, saga_id, step_name, outcome, response, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING idempotency_key"
        ).format(table).as_bytes(),
        stored=sql.SQL("SELECT outcome, response FROM {} WHERE idempotency_key = %s AND operation = %s")
        .format(table).as_bytes(),
        answer=sql.SQL("UPDATE {} SET outcome = %s, response = %s WHERE idempotency_key = %s AND operation = %s")
        .format(table).as_bytes(),
    )


class _PipelinedBarrier(BarrierTransaction):
    """psycopg in pipeline mode: BEGIN with the first claim, the answer with COMMIT.

    The connection is in psycopg's autocommit mode (`barrier_transaction`), so
    nothing may reach it before the BEGIN sent with the first claim.
    """

    def __init__(self, conn: AsyncConnection, table: sqlalchemy.Table, raw: psycopg.AsyncConnection[Any]) -> None:
        super().__init__(conn, table)
        self._raw = raw
        self._statements = _statements(table.name)
        self._begun = False

    async def claim(self, row: BarrierRow) -> bool:
        parameters = row.values()
        cursor = self._raw.cursor()
        if self._begun:
            await cursor.execute(self._statements.claim, parameters)
        else:
            async with self._raw.pipeline():
                await self._raw.execute(b"BEGIN")
                await cursor.execute(self._statements.claim, parameters)
            self._begun = True
        return await cursor.fetchone() is not None

    async def claim_compensation(self, execute: BarrierRow, compensate: BarrierRow) -> CompensationClaims:
        if self._begun:
            return await super().claim_compensation(execute, compensate)
        # One round trip: each statement still runs on a snapshot of its own,
        # so the read sees an Execute that the first claim waited for.
        execute_claim, compensate_claim, execute_answer = (self._raw.cursor() for _ in range(3))
        async with self._raw.pipeline():
            await self._raw.execute(b"BEGIN")
            await execute_claim.execute(self._statements.claim, execute.values())
            await compensate_claim.execute(self._statements.claim, compensate.values())
            await execute_answer.execute(self._statements.stored, (execute.idempotency_key, execute.operation))
        self._begun = True
        execute_claimed = await execute_claim.fetchone() is not None
        compensate_claimed = await compensate_claim.fetchone() is not None
        row = await execute_answer.fetchone()
        stored = None if execute_claimed or row is None else (str(row[0]), bytes(row[1] or b""))
        return CompensationClaims(execute_claimed, compensate_claimed, stored)

    async def stored(self, key: str, operation: str) -> tuple[str, bytes]:
        self._ensure_begun()
        cursor = await self._raw.execute(self._statements.stored, (key, operation))
        row = await cursor.fetchone()
        if row is None:
            raise LookupError(f"no barrier row for {key!r} ({operation})")
        outcome, response = row
        return str(outcome), bytes(response or b"")

    async def _finish(self) -> None:
        self._ensure_begun()
        if self._raw.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
            raise RuntimeError("the step ended the barrier transaction itself (conn.commit or conn.rollback)")
        answer = self._answer
        async with self._raw.pipeline():
            if answer is not None:
                await self._raw.execute(
                    self._statements.answer,
                    (answer.outcome, answer.response, answer.idempotency_key, answer.operation),
                )
            await self._raw.execute(b"COMMIT")

    def _ensure_begun(self) -> None:
        # In autocommit mode a statement before the BEGIN would commit on its own.
        if not self._begun:
            raise RuntimeError("a barrier transaction starts with a claim")


def _pipelines(raw: object) -> bool:
    return isinstance(raw, psycopg.AsyncConnection) and psycopg.Pipeline.is_supported()


@contextlib.asynccontextmanager
async def barrier_transaction(
    engine: AsyncEngine, table: sqlalchemy.Table, timeout: float
) -> AsyncIterator[BarrierTransaction]:
    """A barrier transaction on `table`, committed when the block ends without
    an exception and rolled back otherwise; statements and commit together take
    at most `timeout` seconds (`compensa.common.database.bounded_transaction`)."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        if not _pipelines(raw):
            with abort_when_late(raw, timeout):
                async with conn.begin():
                    transaction: BarrierTransaction = _SqlAlchemyBarrier(conn, table)
                    yield transaction
                    await transaction._finish()
            return
        assert isinstance(raw, psycopg.AsyncConnection)
        await raw.set_autocommit(True)  # local to psycopg: no round trip
        try:
            with abort_when_late(raw, timeout):
                # SQLAlchemy's transaction is bookkeeping here: its commit finds
                # the connection idle (committed by the pipeline) and sends nothing,
                # and its rollback sends ROLLBACK when the BEGIN went out.
                async with conn.begin():
                    transaction = _PipelinedBarrier(conn, table, raw)
                    yield transaction
                    await transaction._finish()
        finally:
            if not raw.closed and raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                await raw.set_autocommit(False)
            else:
                # Never back to the pool in autocommit mode or mid-transaction.
                await conn.invalidate()
