"""The null orchestrator: the gRPC work of an orchestrator and nothing else.

It serves the two RPCs the bench's load client uses, exactly as the load
client uses them: StartSaga answers at once and runs the saga's three Execute
calls to the no-op participant (the same requests as null_driver.py); at the
saga's end a SAGA_SUCCEEDED event goes out on every WatchSagas stream. No
persistence, no engine, no log: it is the floor that grpc.aio sets for this
shape (one served call, three client calls, one streamed message per saga)
in one Python process, which the orchestrator's own figures can be read against.

    null_orchestrator.py --participant HOST:PORT --listen HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from common import STEP_NAMES
from null_driver import execute_request

from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, participant_pb2_grpc, saga_pb2

_TIMEOUT_SECONDS = 30.0


class NullOrchestrator(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, participant: str) -> None:
        self._participant = participant_pb2_grpc.ParticipantServiceStub(grpc.aio.insecure_channel(participant))
        self._watchers: list[asyncio.Queue[saga_pb2.SagaEvent]] = []
        # Ends before the first watcher connects wait for it (the orchestrator
        # keeps them in its log).
        self._backlog: list[saga_pb2.SagaEvent] = []
        self._sagas: set[asyncio.Task[None]] = set()
        self._position = 0

    async def StartSaga(
        self, request: orchestrator_pb2.StartSagaRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.StartSagaResponse:
        task = asyncio.create_task(self._run(request.saga_id, request.definition_name))
        self._sagas.add(task)
        task.add_done_callback(self._sagas.discard)
        return orchestrator_pb2.StartSagaResponse(
            saga=saga_pb2.Saga(
                saga_id=request.saga_id, definition_name=request.definition_name, definition_version=1,
                state=saga_pb2.SAGA_STATE_RUNNING, sequence=1, input=request.input,
            ),
            created=True,
        )

    async def _run(self, saga_id: str, definition: str) -> None:
        for step in STEP_NAMES:
            await self._participant.Execute(execute_request(saga_id, step, definition), timeout=_TIMEOUT_SECONDS)
        self._position += 1
        event = saga_pb2.SagaEvent(
            saga_id=saga_id, sequence=8, position=self._position, type=saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED,
            saga_state=saga_pb2.SAGA_STATE_SUCCEEDED, definition_name=definition,
        )
        if not self._watchers:
            self._backlog.append(event)
        for queue in self._watchers:
            queue.put_nowait(event)

    async def WatchSagas(  # type: ignore[override]
        self, request: orchestrator_pb2.WatchSagasRequest, context: grpc.aio.ServicerContext
    ) -> None:
        queue: asyncio.Queue[saga_pb2.SagaEvent] = asyncio.Queue()
        for event in self._backlog:
            queue.put_nowait(event)
        self._backlog.clear()
        self._watchers.append(queue)
        try:
            while True:
                await context.write(orchestrator_pb2.WatchSagasResponse(event=await queue.get()))
        finally:
            self._watchers.remove(queue)


async def main_async(participant: str, listen: str) -> None:
    server = grpc.aio.server()
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(NullOrchestrator(participant), server)
    server.add_insecure_port(listen)
    await server.start()
    print(f"ready {listen}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participant", required=True, help="HOST:PORT of the no-op participant")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    args = parser.parse_args()
    asyncio.run(main_async(args.participant, args.listen))


if __name__ == "__main__":
    main()
