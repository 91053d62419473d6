"""A participant built on the SDK (compensa.participants.sdk.Participant) with nothing but its barrier.

Execute applies no effect of its own and returns an empty message, so what it
costs beyond the no-op participant (noop_participant.py) is the SDK: the
barrier row in the participant's PostgreSQL database, written in the step's
transaction, and the SDK's per-call work. Compensate undoes nothing.

With --trace FILE every database connection the calls use writes libpq's
protocol trace to FILE (without timestamps), which run.py reads to count the
round trips and statements per call. The schema is created before tracing
starts, so the trace holds the calls' traffic only.

Prints "ready HOST:PORT" on stdout once serving; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import IO, Any

import grpc
import psycopg
import sqlalchemy
from google.protobuf import empty_pb2, message
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.examples.server import create_participant_engine
from compensa.participants.sdk import Participant
from compensa.v1 import participant_pb2, participant_pb2_grpc


class BarrierOnlyParticipant(Participant):
    """Every step succeeds with no effect but the SDK's barrier row."""

    barrier_table_name = "bench_barrier"

    async def execute_step(self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest) -> message.Message:
        return empty_pb2.Empty()

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> message.Message | None:
        return None


def trace_connections(participant: Participant, trace: IO[str]) -> list[psycopg.pq.abc.PGconn]:
    """Makes every connection `participant`'s engine opens from now on trace to `trace`."""
    traced: list[psycopg.pq.abc.PGconn] = []

    @sqlalchemy.event.listens_for(participant.engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        pgconn = dbapi_connection.driver_connection.pgconn
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        traced.append(pgconn)

    return traced


async def serve(listen: str, database_url: str, trace_path: str | None) -> None:
    participant = BarrierOnlyParticipant(create_participant_engine(database_url))
    await participant.create_schema()
    await participant.engine.dispose()  # the calls' connections are opened afresh (and traced)
    trace = open(trace_path, "w") if trace_path else None  # noqa: ASYNC230 (once, before serving; closed below)
    traced = trace_connections(participant, trace) if trace else []
    server = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServiceServicer_to_server(participant, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {listen.rpartition(':')[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(0.2)
    for pgconn in traced:
        with contextlib.suppress(Exception):
            pgconn.untrace()  # flushes libpq's buffer
    await participant.engine.dispose()
    if trace:
        trace.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--database-url", required=True, help="postgresql+psycopg://... of the participant's database")
    parser.add_argument("--trace", help="write libpq's protocol trace of the calls to this file")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.database_url, args.trace))


if __name__ == "__main__":
    main()
