"""Peer: DBOS Transact running the bench saga as a durable workflow.

One `@DBOS.workflow` with three `@DBOS.step`s, each step one Execute call to
the no-op participant with the requests the orchestrator sends (the same as
null_driver.py). DBOS keeps its state in its system database (the bench's
PostgreSQL, a fresh database), with its default configuration (a pool of 20
connections, like the orchestrator's).

How it differs from the orchestrator, so that the figures are read fairly:
DBOS is a library, so each saga is a workflow function called in this
process (with the saga id as its workflow id): there is no start call over
the network and no stream telling a client that the saga ended; the latency
is the workflow call's. Load generation runs in this process too, so its CPU
counts here (as for the naive loop).

Speaks the run protocol of bench/common.py on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import grpc
from common import STEP_NAMES, serve_commands, timed_run
from dbos import DBOS, DBOSConfig, SetWorkflowID
from null_driver import execute_request

from compensa.v1 import participant_pb2, participant_pb2_grpc

_TIMEOUT_SECONDS = 30.0
_SUCCESS = (participant_pb2.EXECUTE_RESULT_SUCCEEDED, participant_pb2.EXECUTE_RESULT_UNSPECIFIED)


class _Participant:
    """The no-op participant's stub, made on the running loop by main_async."""

    stub: participant_pb2_grpc.ParticipantServiceStub


@DBOS.step()
async def execute_step(saga_id: str, step: str) -> None:
    response = await _Participant.stub.Execute(execute_request(saga_id, step, "bench"), timeout=_TIMEOUT_SECONDS)
    if response.result not in _SUCCESS:
        raise RuntimeError(f"step {step} answered {response.result}")


@DBOS.workflow()
async def bench_saga(saga_id: str) -> None:
    for step in STEP_NAMES:
        await execute_step(saga_id, step)


async def run(command: dict[str, Any]) -> str:
    async def saga(saga_id: str) -> None:
        with SetWorkflowID(saga_id):
            await bench_saga(saga_id)

    # Any exception is counted and reported as a failed saga.
    return await timed_run(command, saga, (Exception,))


async def main_async(database_url: str, participant: str) -> None:
    _Participant.stub = participant_pb2_grpc.ParticipantServiceStub(grpc.aio.insecure_channel(participant))
    config: DBOSConfig = {"name": "compensa-bench", "system_database_url": database_url, "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()
    try:
        await serve_commands(run)
    finally:
        DBOS.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True, help="postgresql://... of DBOS's own (fresh) system database")
    parser.add_argument("--participant", required=True, help="HOST:PORT of the no-op participant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args.database_url, args.participant))


if __name__ == "__main__":
    main()
