"""Participant contracts read from descriptors (see protos/compensa/v1/contract.proto).

A contract is a service whose rpcs carry the `compensa.v1.step` option. The
code generator (`compensa.participants.codegen`) and the orchestrator's check of
definitions against stored contracts read contracts here, so both sides agree
on what a contract says and on what makes one invalid.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

from compensa.v1 import contract_pb2, definition_pb2

__all__ = [
    "NAME_PATTERN",
    "ContractError",
    "ContractService",
    "ContractStep",
    "EarlierOutput",
    "contract_services",
    "kind_name",
    "message_locations",
    "proto_include_path",
    "snake_case",
]

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
"""What definition and step names must match (in full): a contract's steps are named as definitions' are."""
_KINDS = frozenset({
    definition_pb2.STEP_KIND_COMPENSABLE, definition_pb2.STEP_KIND_PIVOT, definition_pb2.STEP_KIND_RETRIABLE,
})


#: The file every contract imports, relative to `proto_include_path()`.
CONTRACT_PROTO = "compensa/v1/contract.proto"


def proto_include_path() -> Path:
    """The directory protoc needs on its include path (`-I`) to compile a
    contract: the compensa/v1/*.proto files installed with compensa
    (contract.proto and what it imports). The well-known types
    (google/protobuf/*.proto) come with grpcio-tools, whose
    `python -m grpc_tools.protoc` adds them itself. `compensa codegen` adds this
    directory on its own; `compensa codegen --include-path` prints it."""
    spec = importlib.util.find_spec("compensa.protos")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / CONTRACT_PROTO).is_file():
            return Path(location)
    raise FileNotFoundError(f"{CONTRACT_PROTO} is not installed with compensa (the package compensa.protos)")


class ContractError(ValueError):
    """A participant service whose `compensa.v1.step` options do not make a contract."""


@dataclass(frozen=True)
class EarlierOutput:
    """An earlier step's output a step reads: the step's name and its message's full name."""

    step: str
    type: str


@dataclass(frozen=True)
class ContractStep:
    """One step of a contract; types are full message names without a leading dot."""

    name: str
    method: str
    input_type: str
    output_type: str
    kind: int
    needs: tuple[EarlierOutput, ...]
    #: "" when the undo returns nothing (or the step has no undo).
    undo_output: str
    #: May answer Pending and report its outcome later.
    long_running: bool = False

    @property
    def compensable(self) -> bool:
        return self.kind == definition_pb2.STEP_KIND_COMPENSABLE


@dataclass(frozen=True)
class ContractService:
    """A participant's contract: a service of a .proto file and its steps."""

    full_name: str
    name: str
    file: str
    steps: tuple[ContractStep, ...]

    def step(self, name: str) -> ContractStep | None:
        return next((step for step in self.steps if step.name == name), None)


def snake_case(name: str) -> str:
    """BookHotel -> book_hotel, HTTPCall -> http_call."""
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", spaced).lower()


def kind_name(kind: int) -> str:
    """STEP_KIND_PIVOT -> "pivot"; UNSPECIFIED reads as compensable, as in definitions."""
    if kind == definition_pb2.STEP_KIND_UNSPECIFIED:
        kind = definition_pb2.STEP_KIND_COMPENSABLE
    return definition_pb2.StepKind.Name(definition_pb2.StepKind.ValueType(kind)).removeprefix("STEP_KIND_").lower()


def message_locations(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, tuple[str, str]]:
    """Every message's full name -> (the file declaring it, its name within
    the file's package: "Outer.Inner" for a nested message)."""
    located: dict[str, tuple[str, str]] = {}

    def walk(file: str, prefix: str, messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for declared in messages:
            relative = f"{prefix}{declared.name}"
            located[_full_name(package, relative)] = (file, relative)
            walk(file, f"{relative}.", declared.nested_type)

    for file in files:
        package = file.package
        walk(file.name, "", file.message_type)
    return located


def contract_services(
    files: Sequence[descriptor_pb2.FileDescriptorProto], *, in_files: Iterable[str] | None = None
) -> list[ContractService]:
    """The contract services declared in `files` (or only in those named
    `in_files`), whose types may come from any of `files`; ContractError for
    a service whose step options do not make a contract."""
    known = message_locations(files)
    wanted = None if in_files is None else frozenset(in_files)
    found: list[ContractService] = []
    for file in files:
        if wanted is not None and file.name not in wanted:
            continue
        for service in file.service:
            if any(method.options.HasExtension(contract_pb2.step) for method in service.method):
                found.append(_contract(file, service, known))
    return found


def _contract(
    file: descriptor_pb2.FileDescriptorProto,
    service: descriptor_pb2.ServiceDescriptorProto,
    known: dict[str, tuple[str, str]],
) -> ContractService:
    full_name = _full_name(file.package, service.name)
    steps: list[ContractStep] = []
    for method in service.method:
        where = f"{full_name}.{method.name}"
        if not method.options.HasExtension(contract_pb2.step):
            raise ContractError(
                f"{where}: every rpc of a participant contract is a step; mark it with (compensa.v1.step)"
            )
        if method.client_streaming or method.server_streaming:
            raise ContractError(f"{where}: a step is a unary rpc (no stream)")
        option = method.options.Extensions[contract_pb2.step]
        steps.append(_step(where, method, option, known))
    _check_unique(full_name, steps)
    return ContractService(full_name=full_name, name=service.name, file=file.name, steps=tuple(steps))


def _step(
    where: str,
    method: descriptor_pb2.MethodDescriptorProto,
    option: contract_pb2.StepContract,
    known: dict[str, tuple[str, str]],
) -> ContractStep:
    name = option.name or snake_case(method.name)
    if not NAME_PATTERN.fullmatch(name):
        raise ContractError(
            f"{where}: step name {name!r} is not a definition step name (1-63 lowercase letters, digits, '_', '-',"
            " starting with a letter); set (compensa.v1.step).name"
        )
    if option.kind not in _KINDS:
        raise ContractError(
            f"{where}: (compensa.v1.step).kind is required:"
            " STEP_KIND_COMPENSABLE, STEP_KIND_PIVOT or STEP_KIND_RETRIABLE"
        )
    if option.undo_output and option.kind != definition_pb2.STEP_KIND_COMPENSABLE:
        raise ContractError(
            f"{where}: undo_output is for a compensable step; a {kind_name(option.kind)} step has no undo"
        )
    for type_name, what in ((option.undo_output, "undo_output"), *((need.type, "needs.type") for need in option.needs)):
        if type_name and type_name.lstrip(".") not in known:
            raise ContractError(
                f"{where}: {what} {type_name!r} is not a message declared in the contract's file or its imports"
            )
    needs: list[EarlierOutput] = []
    for need in option.needs:
        if not need.step or not need.type:
            raise ContractError(f"{where}: each of needs gives a step and its output type")
        if need.step == name or any(earlier.step == need.step for earlier in needs):
            raise ContractError(f"{where}: needs names step {need.step!r} twice, or the step itself")
        needs.append(EarlierOutput(step=need.step, type=need.type.lstrip(".")))
    return ContractStep(
        name=name, method=method.name, input_type=method.input_type.lstrip("."),
        output_type=method.output_type.lstrip("."), kind=option.kind, needs=tuple(needs),
        undo_output=option.undo_output.lstrip("."), long_running=option.long_running,
    )


def _check_unique(service: str, steps: Sequence[ContractStep]) -> None:
    seen: set[str] = set()
    for step in steps:
        if step.name in seen:
            raise ContractError(f"{service}: two rpcs are the step {step.name!r}; step names are unique in a contract")
        seen.add(step.name)


def _full_name(package: str, name: str) -> str:
    return f"{package}.{name}" if package else name

