"""A participant whose answers a test scripts, step by step, and which
records every call it receives. No database: tests read `calls`."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, wrappers_pb2

from compensa.v1 import participant_pb2, participant_pb2_grpc

#: Answers: "ok", "pending", "fail" (business), "unavailable", "empty" (an ExecuteResponse
#: without a result, as a participant that forgets to set it), ("sleep", seconds).
Answer = str | tuple[str, float]


@dataclass
class Call:
    operation: str
    saga_id: str
    step: str
    attempt: int
    token: str
    started: float
    finished: float = 0.0


@dataclass
class ScriptedParticipant(participant_pb2_grpc.ParticipantServiceServicer):
    """Answers from `execute_script[step]` / `compensate_script[step]` in
    order; "ok" once a script runs out."""

    execute_script: dict[str, deque[Answer]] = field(default_factory=lambda: defaultdict(deque))
    compensate_script: dict[str, deque[Answer]] = field(default_factory=lambda: defaultdict(deque))
    calls: list[Call] = field(default_factory=list)

    def script(self, operation: str, step: str, *answers: Answer) -> None:
        target = self.execute_script if operation == "execute" else self.compensate_script
        target[step].extend(answers)

    def of(self, operation: str, step: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.operation == operation and (step is None or c.step == step)]

    async def _answer(
        self, operation: str, context: participant_pb2.StepContext, token: str, grpc_context: grpc.aio.ServicerContext
    ) -> str:
        call = Call(operation, context.saga_id, context.step_name, context.attempt, token, time.time())
        self.calls.append(call)
        script = (self.execute_script if operation == "execute" else self.compensate_script)[context.step_name]
        answer: Answer = script.popleft() if script else "ok"
        if isinstance(answer, tuple):
            await asyncio.sleep(answer[1])  # ok-sleep: the scripted participant is slow on purpose
            answer = "ok"
        call.finished = time.time()
        if answer == "unavailable":
            await grpc_context.abort(grpc.StatusCode.UNAVAILABLE, "scripted outage")
        if answer == "fail" and operation == "compensate":
            await grpc_context.abort(grpc.StatusCode.INTERNAL, "scripted compensation failure")
        return answer

    async def Execute(
        self, request: participant_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.ExecuteResponse:
        answer = await self._answer("execute", request.context, request.completion_token, context)
        if answer == "fail":
            await context.abort(grpc.StatusCode.ABORTED, "scripted business failure")
        if answer == "pending":
            return participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_PENDING)
        if answer == "empty":
            return participant_pb2.ExecuteResponse()
        output = any_pb2.Any()
        output.Pack(wrappers_pb2.StringValue(value=f"{request.context.step_name} done"))
        return participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_SUCCEEDED, output=output)

    async def Compensate(
        self, request: participant_pb2.CompensateRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.CompensateResponse:
        await self._answer("compensate", request.context, "", context)
        return participant_pb2.CompensateResponse()


async def serve_scripted(participant: ScriptedParticipant) -> tuple[grpc.aio.Server, str]:
    """Serves `participant` on 127.0.0.1 port 0; returns the server and its address."""
    server = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServiceServicer_to_server(participant, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
