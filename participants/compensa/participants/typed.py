"""What code generated from a participant contract stands on (see
protos/compensa/v1/contract.proto and `compensa codegen`).

A generated base class subclasses `TypedParticipant` and lists its steps in
`steps`; `TypedParticipant` dispatches each call by `StepContext.step_name`
to the step's method, unpacks the saga input and the earlier outputs the step
needs into their types, and checks that the method returned its contract's
output type (`WrongOutputType` otherwise). A generated starter subclasses
`SagaStarter`, and its runs (`SagaRun`) read each step's output typed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, message
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.participants.sdk import Participant, ParticipantError, Pending, WrongOutputType, unpack_as
from compensa.v1 import participant_pb2, saga_pb2

__all__ = [
    "ContractMismatch",
    "SagaRun",
    "SagaStarter",
    "StartsSagas",
    "TypedParticipant",
    "TypedStep",
    "WrongOutputType",
]

_M = TypeVar("_M", bound=message.Message)
_Input = TypeVar("_Input", bound=message.Message)
_Run = TypeVar("_Run", bound="SagaRun")


class ContractMismatch(ParticipantError):
    """A call the contract does not fit: a step it does not declare, or
    without an earlier output the step needs (the definition names the wrong
    participant or step, or lacks a dependency): FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class TypedStep:
    """A step of a generated base class: its methods' names and its types."""

    method: str
    input: type[message.Message]
    output: type[message.Message]
    #: (step name, type) of each earlier output the methods receive, in order.
    needs: tuple[tuple[str, type[message.Message]], ...] = ()
    #: The undo's method name; None for a pivot or retriable step.
    undo: str | None = None
    undo_output: type[message.Message] | None = None
    #: The method also gets the completion token, and may return Pending.
    long_running: bool = False


def _type_name(value: object) -> str:
    if isinstance(value, message.Message):
        return value.DESCRIPTOR.full_name
    return "None" if value is None else type(value).__qualname__


class TypedParticipant(Participant):
    """A participant whose steps are typed methods (generated from a contract)."""

    #: The contract service's full name, e.g. "travel.v1.HotelParticipant".
    contract: ClassVar[str] = ""
    #: Step name -> its methods and types; filled in by the generated class.
    steps: ClassVar[dict[str, TypedStep]] = {}

    def _typed_step(self, request_context: participant_pb2.StepContext) -> TypedStep:
        step = self.steps.get(request_context.step_name)
        if step is None:
            declared = ", ".join(sorted(self.steps)) or "none"
            raise ContractMismatch(
                f"step {request_context.step_name!r} is not in the contract {self.contract} (its steps: {declared});"
                " check the definition's step names and participants"
            )
        return step

    def _needed(
        self, step_name: str, step: TypedStep, outputs: Mapping[str, any_pb2.Any]
    ) -> list[message.Message]:
        needed: list[message.Message] = []
        for name, cls in step.needs:
            if name not in outputs:
                raise ContractMismatch(
                    f"step {step_name!r} needs the output of step {name!r} (contract {self.contract}), and the call"
                    f" has none: in the definition, {step_name!r} must depend on {name!r}"
                )
            needed.append(unpack_as(outputs[name], cls))
        return needed

    def _method(self, name: str) -> Callable[..., Awaitable[object]]:
        method: Callable[..., Awaitable[object]] = getattr(self, name)
        return method

    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> message.Message | Pending:
        step = self._typed_step(request.context)
        needs = self._needed(request.context.step_name, step, request.step_outputs)
        token = [request.completion_token] if step.long_running else []
        output = await self._method(step.method)(
            conn, unpack_as(request.saga_input, step.input), *needs, *token, request.context
        )
        if step.long_running and isinstance(output, Pending):
            if output.output is not None:
                self._checked(request.context.step_name, output.output, step.output, step.method)
            return output
        return self._checked(request.context.step_name, output, step.output, step.method)

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> message.Message | None:
        step = self._typed_step(request.context)
        if step.undo is None:
            return await super().compensate_step(conn, request)
        needs = self._needed(request.context.step_name, step, request.step_outputs)
        executed: message.Message | None = None
        # A long-running step may have answered Pending with no output, and no
        # outcome with one reported since: its undo is told so with None.
        if request.execute_output.type_url or not step.long_running:
            executed = unpack_as(request.execute_output, step.output)
        details = await self._method(step.undo)(
            conn, unpack_as(request.saga_input, step.input), executed, *needs, request.context
        )
        if step.undo_output is None:
            if details is not None:
                raise WrongOutputType(
                    f"the undo of step {request.context.step_name!r} ({type(self).__name__}.{step.undo}) returned a"
                    f" {_type_name(details)}; its contract says it returns nothing (no undo_output)"
                )
            return None
        return self._checked(request.context.step_name, details, step.undo_output, step.undo)

    def _checked(
        self, step_name: str, returned: object, expected: type[message.Message], method: str
    ) -> message.Message:
        if type(returned) is not expected:
            raise WrongOutputType(
                f"step {step_name!r} ({type(self).__name__}.{method}) returned a {_type_name(returned)};"
                f" its contract {self.contract} says {expected.DESCRIPTOR.full_name}"
            )
        assert isinstance(returned, message.Message)
        return returned


class StartsSagas(Protocol):
    """What a starter calls: `compensa.orchestrator.client.SagaClient` is one."""

    async def start(
        self, definition: str, input: message.Message, *, saga_id: str | None = None, version: int = 0
    ) -> saga_pb2.Saga: ...

    async def execute(
        self, definition: str, input: message.Message, *, saga_id: str | None = None, version: int = 0
    ) -> saga_pb2.Saga: ...

    async def result(self, saga_id: str) -> saga_pb2.Saga: ...


class SagaRun:
    """A saga as the orchestrator answered it; generated subclasses add one
    method per step that returns its output typed (None until it has one)."""

    def __init__(self, saga: saga_pb2.Saga) -> None:
        self.saga = saga

    @property
    def saga_id(self) -> str:
        return self.saga.saga_id

    @property
    def state(self) -> saga_pb2.SagaState.ValueType:
        return self.saga.state

    @property
    def succeeded(self) -> bool:
        return self.saga.state == saga_pb2.SAGA_STATE_SUCCEEDED

    def _output(self, step_name: str, cls: type[_M]) -> _M | None:
        for step in self.saga.steps:
            if step.name == step_name and step.HasField("output"):
                return unpack_as(step.output, cls)
        return None


class SagaStarter(Generic[_Input, _Run]):
    """Starts sagas of one definition with a typed input; answers typed runs."""

    #: The definition's name unless the constructor is given another.
    definition_name: ClassVar[str] = ""
    run_type: type[_Run]

    def __init__(self, client: StartsSagas, *, definition_name: str | None = None) -> None:
        self.client = client
        self.definition = definition_name or self.definition_name

    async def start(self, input: _Input, *, saga_id: str | None = None, version: int = 0) -> _Run:
        """Starts a saga (see SagaClient.start) and returns it as created."""
        return self.run_type(await self.client.start(self.definition, input, saga_id=saga_id, version=version))

    async def execute(self, input: _Input, *, saga_id: str | None = None, version: int = 0) -> _Run:
        """Starts a saga and waits for its end (see SagaClient.execute)."""
        return self.run_type(await self.client.execute(self.definition, input, saga_id=saga_id, version=version))

    async def result(self, saga_id: str) -> _Run:
        """Waits until the saga ends and returns it."""
        return self.run_type(await self.client.result(saga_id))

