"""A participant's contract read from the participant itself, through its
server reflection (grpc.reflection.v1alpha, which compensa.participants.serve
enables for a participant on generated stubs, listing its contract service):
the file declaring the service whose rpcs carry (compensa.v1.step), with
every file it imports, as `--proto FILE` would have compiled them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from compensa.common.contracts import ContractError, contract_services
from compensa.orchestrator.shared.errors import FailedPrecondition, InvalidArgument
from compensa.v1 import contract_pb2

__all__ = ["read_reflected_contract"]

#: Services every participant lists that are never a contract: not asked about.
_NOT_CONTRACTS = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
        "compensa.v1.ParticipantService",
        "compensa.v1.BarrierAuditService",
    }
)


async def read_reflected_contract(
    channel: grpc.aio.Channel, address: str, *, service: str = "", timeout: float
) -> contract_pb2.ParticipantContract:
    """The contract the participant at `address` (dialled on `channel`)
    describes through server reflection: its one contract service, or
    `service` when it lists several. FailedPrecondition when it cannot be
    reached within `timeout` seconds, serves no reflection or lists no such
    service; InvalidArgument when its service is not a valid contract."""
    reflection = _Reflection(reflection_pb2_grpc.ServerReflectionStub(channel), address, timeout)
    try:
        listed, files = await reflection.listed_files()
    except grpc.aio.AioRpcError as error:
        raise _unreachable(address, error) from None
    try:
        # A file may declare other participants' contracts too: only those listed count.
        found = [contract for contract in contract_services(list(files.values())) if contract.full_name in listed]
    except ContractError as error:
        raise InvalidArgument(f"the participant at {address} lists a service that is not a contract: {error}") from None
    chosen = [contract for contract in found if contract.full_name == service] if service else found
    if len(chosen) != 1:
        names = ", ".join(contract.full_name for contract in found) or "none"
        wanted = f"no contract service {service!r}" if service else "not one contract service"
        raise FailedPrecondition(
            f"the participant at {address} lists {wanted} through server reflection (contract services: {names})"
            + ("; name one with --service" if len(found) > 1 else "; give its contract with --proto FILE instead")
        )
    types = descriptor_pb2.FileDescriptorSet(file=_with_imports(chosen[0].file, files))
    return contract_pb2.ParticipantContract(service=chosen[0].full_name, types=types)


class _Reflection:
    """One reflection stream's questions, each answered in turn."""

    def __init__(self, stub: reflection_pb2_grpc.ServerReflectionStub, address: str, timeout: float) -> None:
        self._stub = stub
        self._address = address
        self._timeout = timeout

    async def listed_files(self) -> tuple[set[str], dict[str, descriptor_pb2.FileDescriptorProto]]:
        """The services listed (but those never a contract), and the files
        declaring them with everything they import, by file name."""
        call = self._stub.ServerReflectionInfo(timeout=self._timeout)
        try:
            # Any text asks for the list ("" would leave the request empty).
            listed = await self._ask(call, reflection_pb2.ServerReflectionRequest(list_services="*"))
            names = [entry.name for entry in listed.list_services_response.service]
            wanted = [name for name in names if name not in _NOT_CONTRACTS]
            files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
            for name in wanted:
                answer = await self._ask(call, reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
                if not answer.HasField("error_response"):
                    self._keep(answer, files)
            # A server may send each file once per stream, or a file without
            # its imports: what is still missing is asked for by name.
            while missing := sorted(_missing_imports(files.values())):
                for file_name in missing:
                    answer = await self._ask(call, reflection_pb2.ServerReflectionRequest(file_by_filename=file_name))
                    if answer.HasField("error_response"):
                        raise FailedPrecondition(
                            f"the participant at {self._address} does not describe {file_name}, which its contract"
                            " imports, through server reflection; give its contract with --proto FILE instead"
                        )
                    self._keep(answer, files)
            await call.done_writing()
            return set(wanted), files
        finally:
            call.cancel()

    async def _ask(self, call: Any, request: reflection_pb2.ServerReflectionRequest) -> Any:
        """The answer to `request` on the stream `call` (grpc_reflection has no types)."""
        await call.write(request)
        answer = await call.read()
        if answer is grpc.aio.EOF:
            raise FailedPrecondition(f"the participant at {self._address} ended its server reflection stream early")
        return answer

    def _keep(self, answer: Any, files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        for serialized in answer.file_descriptor_response.file_descriptor_proto:
            try:
                file = descriptor_pb2.FileDescriptorProto.FromString(serialized)
            except message.DecodeError:
                raise FailedPrecondition(
                    f"the participant at {self._address} answered server reflection with a file that does not decode"
                ) from None
            files.setdefault(file.name, file)


def _missing_imports(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> set[str]:
    present = {file.name: file for file in files}
    return {dependency for file in present.values() for dependency in file.dependency if dependency not in present}


def _with_imports(
    name: str, files: Mapping[str, descriptor_pb2.FileDescriptorProto]
) -> list[descriptor_pb2.FileDescriptorProto]:
    """`name` and every file it imports, directly or not, imports first."""
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(file_name: str) -> None:
        if file_name in seen:
            return
        seen.add(file_name)
        for dependency in files[file_name].dependency:
            visit(dependency)
        ordered.append(files[file_name])

    visit(name)
    return ordered


def _unreachable(address: str, error: grpc.aio.AioRpcError) -> FailedPrecondition:
    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return FailedPrecondition(
            f"the participant at {address} does not serve server reflection (grpc.reflection.v1alpha);"
            " give its contract with --proto FILE instead"
        )
    return FailedPrecondition(
        f"cannot read the contract of the participant at {address} through server reflection:"
        f" {error.code().name}: {error.details() or ''}".rstrip(": ")
        + " (it must be running to be asked; or give its contract with --proto FILE)"
    )
