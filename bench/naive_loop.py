"""The naive durable loop: the design a developer writes first.

Per saga: one committed transaction inserting the saga (and its "started"
event), then for each of the three steps: call Execute on the no-op
participant, then one committed transaction updating the saga (guarded by its
sequence) and inserting the step's event. Four commits per saga, each waiting
for its own WAL flush (fsync and synchronous_commit as the server has them).

psycopg 3 (async) directly, no ORM; a fixed pool of connections (the size of
the orchestrator's SQLAlchemy pool, 10 + 10 overflow) held only for the
duration of a transaction, never across a participant call. Its own CPU is
what the bench reports as "CPU per saga" for this row.

Speaks the run protocol of bench/common.py on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
from common import STEP_NAMES, saga_input, serve_commands, timed_run
from null_driver import execute_request

from compensa.v1 import participant_pb2, participant_pb2_grpc

POOL_SIZE = 20
_TIMEOUT_SECONDS = 30.0
_RUNNING, _SUCCEEDED = 1, 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_sagas (
    saga_id text PRIMARY KEY,
    definition_name text NOT NULL,
    state integer NOT NULL,
    sequence bigint NOT NULL,
    current_step integer NOT NULL,
    input bytea NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS naive_events (
    saga_id text NOT NULL REFERENCES naive_sagas (saga_id),
    sequence bigint NOT NULL,
    type integer NOT NULL,
    step_name text NOT NULL,
    saga_state integer NOT NULL,
    time double precision NOT NULL,
    PRIMARY KEY (saga_id, sequence)
);
"""


class ConnectionPool:
    """A fixed set of connections; a transaction borrows one."""

    def __init__(self, connections: list[psycopg.AsyncConnection[Any]]) -> None:
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        for connection in connections:
            self._idle.put_nowait(connection)
        self._all = connections

    @classmethod
    async def open(cls, dsn: str, size: int) -> ConnectionPool:
        return cls([await psycopg.AsyncConnection.connect(dsn) for _ in range(size)])

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        connection = await self._idle.get()
        try:
            async with connection.transaction():
                yield connection
        finally:
            self._idle.put_nowait(connection)

    async def close(self) -> None:
        for connection in self._all:
            await connection.close()


class NaiveLoop:
    """Drives sagas with one committed transaction per transition."""

    def __init__(self, pool: ConnectionPool, participant: str) -> None:
        self._pool = pool
        self._channel = grpc.aio.insecure_channel(participant)
        self._stub = participant_pb2_grpc.ParticipantServiceStub(self._channel)
        self._input = saga_input().SerializeToString()

    async def _saga(self, saga_id: str) -> None:
        now = time.time()
        async with self._pool.transaction() as conn:
            await conn.execute(
                "INSERT INTO naive_sagas (saga_id, definition_name, state, sequence, current_step, input,"
                " created_at, updated_at) VALUES (%s, 'bench', %s, 1, 0, %s, %s, %s)",
                (saga_id, _RUNNING, self._input, now, now),
            )
            await conn.execute(
                "INSERT INTO naive_events (saga_id, sequence, type, step_name, saga_state, time)"
                " VALUES (%s, 1, 1, '', %s, %s)",
                (saga_id, _RUNNING, now),
            )
        sequence = 1
        for index, step in enumerate(STEP_NAMES):
            response = await self._stub.Execute(execute_request(saga_id, step, "bench"), timeout=_TIMEOUT_SECONDS)
            succeeded = (participant_pb2.EXECUTE_RESULT_SUCCEEDED, participant_pb2.EXECUTE_RESULT_UNSPECIFIED)
            if response.result not in succeeded:
                raise RuntimeError(f"step {step} answered {response.result}")
            state = _SUCCEEDED if index == len(STEP_NAMES) - 1 else _RUNNING
            now = time.time()
            async with self._pool.transaction() as conn:
                cursor = await conn.execute(
                    "UPDATE naive_sagas SET state = %s, sequence = %s, current_step = %s, updated_at = %s"
                    " WHERE saga_id = %s AND sequence = %s",
                    (state, sequence + 1, index + 1, now, saga_id, sequence),
                )
                if cursor.rowcount != 1:
                    raise RuntimeError(f"saga {saga_id} changed under us")
                await conn.execute(
                    "INSERT INTO naive_events (saga_id, sequence, type, step_name, saga_state, time)"
                    " VALUES (%s, %s, 5, %s, %s, %s)",
                    (saga_id, sequence + 1, step, state, now),
                )
            sequence += 1

    async def run(self, command: dict[str, Any]) -> str:
        return await timed_run(command, self._saga, (grpc.aio.AioRpcError, psycopg.Error, RuntimeError))


async def main_async(dsn: str, participant: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as setup:
        await setup.execute(_SCHEMA)
    pool = await ConnectionPool.open(dsn, POOL_SIZE)
    try:
        await serve_commands(NaiveLoop(pool, participant).run)
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True, help="libpq connection string of the loop's own database")
    parser.add_argument("--participant", required=True, help="HOST:PORT of the no-op participant")
    args = parser.parse_args()
    asyncio.run(main_async(args.dsn, args.participant))


if __name__ == "__main__":
    main()
