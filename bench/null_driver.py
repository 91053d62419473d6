"""The null driver: the floor that gRPC alone sets on this machine.

Per saga it makes the three Execute calls to the no-op participant, one after
the other, exactly as the orchestrator would (same request contents, one
channel, a deadline on each call), with no start call and no persistence: the
methodology of the issue's reference figures. Its own CPU is what the bench
reports as "CPU per saga" for this row.

With --steps 1 each "saga" is a single Execute call: the participant side of
run.py uses it to time calls to one participant.

Speaks the run protocol of bench/common.py on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import grpc
from common import STEP_NAMES, saga_input, serve_commands, timed_run
from google.protobuf import timestamp_pb2

from compensa.v1 import participant_pb2, participant_pb2_grpc

_TIMEOUT_SECONDS = 30.0


def execute_request(saga_id: str, step: str, definition_name: str) -> participant_pb2.ExecuteRequest:
    """The ExecuteRequest the orchestrator sends for `step` of a bench saga."""
    return participant_pb2.ExecuteRequest(
        context=participant_pb2.StepContext(
            saga_id=saga_id, step_name=step, idempotency_key=f"{saga_id}/{step}", attempt=1,
            definition_name=definition_name, definition_version=1,
            deadline=timestamp_pb2.Timestamp(seconds=int(time.time() + _TIMEOUT_SECONDS)),
        ),
        saga_input=saga_input(),
    )


class NullDriver:
    """Runs sagas that are nothing but their three participant calls."""

    def __init__(self, participant: str, steps: int = len(STEP_NAMES)) -> None:
        self._channel = grpc.aio.insecure_channel(participant)
        self._stub = participant_pb2_grpc.ParticipantServiceStub(self._channel)
        self._steps = STEP_NAMES[:steps]

    async def _saga(self, saga_id: str) -> None:
        for step in self._steps:
            response = await self._stub.Execute(execute_request(saga_id, step, "bench"), timeout=_TIMEOUT_SECONDS)
            succeeded = (participant_pb2.EXECUTE_RESULT_SUCCEEDED, participant_pb2.EXECUTE_RESULT_UNSPECIFIED)
            if response.result not in succeeded:
                raise RuntimeError(f"step {step} answered {response.result}")

    async def run(self, command: dict[str, Any]) -> str:
        return await timed_run(command, self._saga, (grpc.aio.AioRpcError, RuntimeError))


async def main_async(participant: str, steps: int) -> None:
    driver = NullDriver(participant, steps)
    await serve_commands(driver.run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--participant", required=True, help="HOST:PORT of the no-op participant")
    parser.add_argument("--steps", type=int, choices=range(1, len(STEP_NAMES) + 1), default=len(STEP_NAMES),
                        help="Execute calls per saga (default 3; 1 measures single calls)")
    args = parser.parse_args()
    asyncio.run(main_async(args.participant, args.steps))


if __name__ == "__main__":
    main()
