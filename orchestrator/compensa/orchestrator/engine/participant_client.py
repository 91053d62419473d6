"""Calls to participants: one channel per target, a deadline on every call,
and the outcome contract of participant.proto turned into machine events."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import grpc

from compensa.common.tls import TlsFiles
from compensa.orchestrator.engine import machine
from compensa.orchestrator.shared.limits import stored_text
from compensa.orchestrator.shared.metrics import Metrics
from compensa.v1 import participant_pb2, participant_pb2_grpc

_BUSINESS_FAILURE = grpc.StatusCode.ABORTED
# gRPC core fails a call with these details when it could pick no connection
# for it (the name did not resolve, or no address accepted a connection): the
# call was never written to any transport. Any other failure, UNAVAILABLE
# included ("Socket closed", a reset), may come after the request went out.
_NEVER_SENT_DETAILS = ("failed to connect to all addresses", "errors resolving", "DNS resolution failed")


def never_sent(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call certainly never left this process."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and (error.details() or "").startswith(_NEVER_SENT_DETAILS)


_EXECUTE_RESULTS = frozenset(
    {
        participant_pb2.EXECUTE_RESULT_SUCCEEDED,
        participant_pb2.EXECUTE_RESULT_FAILED,
        participant_pb2.EXECUTE_RESULT_PENDING,
    }
)


class ParticipantClient:
    """Keeps one grpc.aio channel per participant address."""

    def __init__(
        self, addresses: dict[str, str], *, max_message_bytes: int, metrics: Metrics, tls: TlsFiles | None = None,
        max_output_bytes: int | None = None,
    ) -> None:
        self._addresses = dict(addresses)
        # A larger output is not stored: it would make the saga too large to read back.
        self._max_output_bytes = max_output_bytes if max_output_bytes is not None else max_message_bytes
        self._metrics = metrics
        self._credentials = tls.channel_credentials if tls is not None else None
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._stubs: dict[str, participant_pb2_grpc.ParticipantServiceAsyncStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def address_of(self, participant: str) -> str:
        """A participant name's stored address, else the name as HOST:PORT."""
        return self._addresses.get(participant, participant)

    def knows(self, participant: str) -> bool:
        """Whether calls to `participant` have somewhere to go: a stored
        address, or a name that is itself HOST:PORT."""
        return participant in self._addresses or ":" in participant

    def use_addresses(self, addresses: Mapping[str, str]) -> None:
        """Calls from now on go to these addresses (the stored participants).
        Channels are kept per address, so a changed address gets a new one."""
        self._addresses = dict(addresses)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The one channel to `address` (health probes share it with the calls)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = (
                grpc.aio.secure_channel(address, self._credentials, options=self._options)
                if self._credentials is not None
                else grpc.aio.insecure_channel(address, options=self._options)
            )
        return channel

    async def reconnect(self, participants: Iterable[str]) -> None:
        """Drops the channel to each of these participants that is not
        connected, so the next call connects afresh: an operator's retry
        after a participant came back must not fail on the error of a
        connection attempt made before (gRPC waits up to minutes between
        attempts). Calls queued on a dropped channel end CANCELLED."""
        for address in {self.address_of(participant) for participant in participants}:
            channel = self._channels.get(address)
            if channel is None or channel.get_state() == grpc.ChannelConnectivity.READY:
                continue
            del self._channels[address]
            self._stubs.pop(address, None)
            await channel.close()

    def _stub(self, participant: str) -> participant_pb2_grpc.ParticipantServiceAsyncStub:
        address = self.address_of(participant)
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = participant_pb2_grpc.ParticipantServiceStub(self.channel(address))
        return stub

    async def execute(
        self, participant: str, request: participant_pb2.ExecuteRequest, timeout: float,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> machine.StepAnswer:
        step = request.context.step_name
        began = time.perf_counter()
        try:
            response: participant_pb2.ExecuteResponse = await self._stub(participant).Execute(
                request, timeout=timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            self._metrics.called(participant, "Execute", "failed" if code == _BUSINESS_FAILURE else code.name,
                                 time.perf_counter() - began)
            if code == _BUSINESS_FAILURE:
                return machine.ExecuteFailed(step, stored_text(error.details() or "aborted by participant"))
            return machine.ExecuteErrored(
                step, stored_text(f"{code.name}: {error.details()}"), never_delivered=never_sent(error)
            )
        if response.result not in _EXECUTE_RESULTS:
            # A participant that forgot to set `result`: not a success to
            # take on trust, but a participant error, retried like a transient one.
            name = participant_pb2.ExecuteResult.Name(response.result) if response.result in (
                participant_pb2.ExecuteResult.values()) else str(response.result)
            self._metrics.called(participant, "Execute", "NO_RESULT", time.perf_counter() - began)
            return machine.ExecuteErrored(
                step, f"participant answered without a result ({name}); set ExecuteResponse.result"
            )
        failed = response.result == participant_pb2.EXECUTE_RESULT_FAILED
        self._metrics.called(participant, "Execute", "failed" if failed else "ok", time.perf_counter() - began)
        if failed:
            return machine.ExecuteFailed(step, stored_text(response.failure_reason or "failed by participant"))
        if response.result == participant_pb2.EXECUTE_RESULT_PENDING:
            return machine.ExecutePending(step)
        size = response.output.ByteSize()
        if size > self._max_output_bytes:
            # The effect may have happened: an error (retried, then compensated), not a business failure.
            return machine.ExecuteErrored(
                step,
                f"the participant's output is {size} bytes; the orchestrator stores at most {self._max_output_bytes}",
            )
        output = response.output.SerializeToString(deterministic=True) if response.HasField("output") else None
        return machine.ExecuteSucceeded(step, output)

    async def compensate(
        self, participant: str, request: participant_pb2.CompensateRequest, timeout: float,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> machine.StepAnswer:
        step = request.context.step_name
        began = time.perf_counter()
        try:
            await self._stub(participant).Compensate(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            self._metrics.called(participant, "Compensate", error.code().name, time.perf_counter() - began)
            return machine.CompensateErrored(step, stored_text(f"{error.code().name}: {error.details()}"))
        self._metrics.called(participant, "Compensate", "ok", time.perf_counter() - began)
        return machine.CompensateSucceeded(step)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
