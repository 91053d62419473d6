"""A client for services that start sagas and wait for them.

The generated stub is enough to call the orchestrator; this adds what callers
otherwise get wrong: a start that may be retried safely (the saga id is chosen
once, before the first try, so a retry after a lost answer finds the saga the
first try created), a replica at capacity waited out (RESOURCE_EXHAUSTED
with a google.rpc.RetryInfo is tried again after the delay it names), and a
wait that survives the orchestrator restarting or a replica going away (the
watch resumes after the last sequence it delivered, so no event is missed or
seen twice).

    async with SagaClient("127.0.0.1:50051") as client:
        saga = await client.execute("checkout", CheckoutInput(order_id="o-1", ...))
        if saga.state != saga_pb2.SAGA_STATE_SUCCEEDED: ...
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from compensa.common.retry import Backoff
from compensa.common.tls import TlsFiles
from compensa.orchestrator.shared.records import FINAL_SAGA_STATES
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

#: Answers after which the same call may simply be made again (a stopping
#: replica ends its streams with UNAVAILABLE too). CANCELLED is not among
#: them: this client never cancels its own calls, so a CANCELLED it did not
#: cause is an answer to report, not a reason to try again.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
T = TypeVar("T")
#: Waits between tries of a call, and between reconnections of a watch.
_RETRY_BACKOFF = Backoff(initial=0.05, cap=2.0)


class SagaClient:
    """Starts sagas on an orchestrator (any replica) and follows them."""

    def __init__(
        self,
        target: str,
        *,
        tls: TlsFiles | None = None,
        call_timeout: float = 10.0,
        retry_for: float = 60.0,
    ) -> None:
        """`target` is HOST:PORT (or a gRPC target naming several replicas);
        each call has `call_timeout`, and a call answered UNAVAILABLE or
        DEADLINE_EXCEEDED is retried with backoff for up to `retry_for` seconds,
        and one refused with a retry delay (RESOURCE_EXHAUSTED: the replica
        is at capacity) after that delay, within the same time."""
        self._channel = (
            grpc.aio.secure_channel(target, tls.channel_credentials)
            if tls is not None
            else grpc.aio.insecure_channel(target)
        )
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)
        self._call_timeout = call_timeout
        self._retry_for = retry_for

    async def __aenter__(self) -> SagaClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def start(
        self, definition: str, input: Message, *, saga_id: str | None = None, version: int = 0
    ) -> saga_pb2.Saga:
        """Starts a saga of `definition` (its latest version unless `version`)
        with `input` and returns it as created. Without `saga_id` one is made
        here, once, so retries cannot start a second saga."""
        packed = any_pb2.Any()
        packed.Pack(input)
        request = orchestrator_pb2.StartSagaRequest(
            saga_id=saga_id or str(uuid.uuid4()), definition_name=definition, definition_version=version,
            input=packed,
        )
        response: orchestrator_pb2.StartSagaResponse = await self._retrying(
            lambda: self.stub.StartSaga(request, timeout=self._call_timeout)
        )
        return response.saga

    async def get(self, saga_id: str) -> saga_pb2.Saga:
        request = orchestrator_pb2.GetSagaRequest(saga_id=saga_id)
        response: orchestrator_pb2.GetSagaResponse = await self._retrying(
            lambda: self.stub.GetSaga(request, timeout=self._call_timeout)
        )
        return response.saga

    async def cancel(self, saga_id: str, *, reason: str = "", actor: str = "") -> saga_pb2.Saga:
        """Asks a running saga to stop and compensate; returns it as the
        cancel left it (COMPENSATING, or FAILED with an alert when a pivot
        ran meanwhile). Safe to retry: a saga already compensating is
        returned as it is. FAILED_PRECONDITION when it cannot be cancelled
        (it ended, or a step that cannot be undone has run)."""
        request = orchestrator_pb2.CancelSagaRequest(saga_id=saga_id, reason=reason, actor=actor)
        response: orchestrator_pb2.CancelSagaResponse = await self._retrying(
            lambda: self.stub.CancelSaga(request, timeout=self._call_timeout)
        )
        return response.saga

    async def complete_step(
        self, completion_token: str, *, output: Message | None = None, failure_reason: str = ""
    ) -> saga_pb2.Saga:
        """Reports the outcome of a long-running step (its Execute answered
        PENDING): succeeded with `output`, or failed when `failure_reason` is
        given. Safe to retry: the same report twice is accepted."""
        request = orchestrator_pb2.CompleteStepRequest(
            completion_token=completion_token,
            result=orchestrator_pb2.COMPLETION_RESULT_FAILED if failure_reason
            else orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED,
            failure_reason=failure_reason,
        )
        if output is not None:
            request.output.Pack(output)
        response: orchestrator_pb2.CompleteStepResponse = await self._retrying(
            lambda: self.stub.CompleteStep(request, timeout=self._call_timeout)
        )
        return response.saga

    async def events(self, saga_id: str, *, after_sequence: int = 0) -> AsyncIterator[saga_pb2.SagaEvent]:
        """Every event of the saga after `after_sequence`, in order, until its
        final event; reconnects (to whichever replica answers) and resumes
        after the last event it yielded when the stream breaks."""
        last = after_sequence
        waits = _RETRY_BACKOFF.waits()
        while True:
            request = orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, after_sequence=last, replay_history=True)
            try:
                async for response in self.stub.WatchSaga(request):
                    waits.reset()
                    event = response.event
                    if event.sequence <= last:
                        continue
                    last = event.sequence
                    yield event
                    if event.saga_state in FINAL_SAGA_STATES:
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise
            # Broken, or ended by a stopping server before the final event.
            await waits.sleep()

    async def result(self, saga_id: str) -> saga_pb2.Saga:
        """Waits until the saga ends (SUCCEEDED, COMPENSATED or FAILED) and returns it."""
        async for _ in self.events(saga_id):
            pass
        return await self.get(saga_id)

    async def execute(
        self, definition: str, input: Message, *, saga_id: str | None = None, version: int = 0
    ) -> saga_pb2.Saga:
        """Starts a saga and waits for its end."""
        started = await self.start(definition, input, saga_id=saga_id, version=version)
        if started.state in FINAL_SAGA_STATES:
            return started
        return await self.result(started.saga_id)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._retry_for
        waits = _RETRY_BACKOFF.waits()
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                asked = retry_delay(error)
                if asked is None and error.code() not in RETRYABLE:
                    raise
                delay = waits.next() if asked is None else asked
                if loop.time() + delay > give_up:
                    raise
            await asyncio.sleep(delay)


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The wait, in seconds, the server asked for before the same call is
    made again (its google.rpc.RetryInfo); None if it asked for none."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                details = Status.FromString(value).details
            except DecodeError:
                return None  # not a status this client can read: no delay was asked for
            for detail in details:
                info = RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.ToNanoseconds() / 1e9
    return None
