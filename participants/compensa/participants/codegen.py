"""The protoc plugin protoc-gen-compensa_python: typed participant base
classes and saga starters from participant contracts (see
protos/compensa/v1/contract.proto).

For each FILE.proto to generate that declares a contract service, it writes
FILE_compensa.py beside protoc's FILE_pb2.py:

- per contract service `XParticipant`, a class `XParticipantBase` of the SDK
  (`compensa.participants.typed.TypedParticipant`) with one abstract method per
  step, `async def book_hotel(self, conn, trip: TripInput, ctx: StepContext) ->
  HotelBooking`, earlier outputs the step needs as typed arguments before
  `ctx`, and `undo_book_hotel(self, conn, trip, hotel_booking, ctx)` for a
  compensable step;
- per saga input type `TripInput` of those steps, a starter `TripSaga` for
  clients (`TripSaga(client).execute(TripInput(...))`, for the definition
  "trip" unless told another) whose runs (`TripSagaRun`) return each step's
  output typed: `run.book_hotel()`.

Run it as protoc's `--compensa_python_out=DIR` (the script is installed with
compensa; give protoc `-I"$(compensa codegen --include-path)"`, where
compensa/v1/contract.proto is installed), or as `compensa codegen FILE.proto
--out DIR`, which needs no -I of its own.
"""

from __future__ import annotations

import keyword
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

from compensa.common.contracts import (
    ContractError,
    ContractService,
    ContractStep,
    contract_services,
    kind_name,
    message_locations,
    snake_case,
)
from compensa.participants.typed import SagaRun, TypedParticipant

__all__ = ["generate", "generate_files", "main", "module_of", "output_name"]

_GENERATED_SUFFIX = "_compensa.py"
# Names a generated method must not take: the base classes' own attributes.
_TAKEN_ON_PARTICIPANT = frozenset(dir(TypedParticipant))
_TAKEN_ON_RUN = frozenset(dir(SagaRun))


def module_of(proto_file: str) -> str:
    """The Python module protoc's --python_out makes of `proto_file`."""
    return proto_file.removesuffix(".proto").replace("-", "_").replace("/", ".") + "_pb2"


def output_name(proto_file: str) -> str:
    """The file generated for `proto_file`: travel/v1/trip.proto -> travel/v1/trip_compensa.py."""
    return proto_file.removesuffix(".proto").replace("-", "_") + _GENERATED_SUFFIX


def _identifier(name: str, taken: Iterable[str] = ()) -> str:
    """A Python name for `name` (a step name may hold '-') that is not a
    keyword and not in `taken`."""
    candidate = name.replace("-", "_")
    while keyword.iskeyword(candidate) or candidate in taken:
        candidate += "_"
    return candidate


def _stem(message_name: str) -> str:
    """TripInput -> Trip: what a saga with this input is called."""
    short = message_name.rpartition(".")[2]
    return short.removesuffix("Input") or short


@dataclass
class _Writer:
    """The text of one generated module."""

    locations: dict[str, tuple[str, str]]
    modules: set[str] = field(default_factory=set)
    uses_pending: bool = False
    lines: list[str] = field(default_factory=list)

    def type_of(self, full_name: str) -> str:
        file, relative = self.locations[full_name]
        return f"{self.module(file)}.{relative}"

    def module(self, proto_file: str) -> str:
        """The _pb2 module of `proto_file`, imported by the generated module."""
        module = module_of(proto_file)
        self.modules.add(module)
        return module

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)


def _participant_class(writer: _Writer, service: ContractService) -> str:
    class_name = f"{service.name}Base"
    methods: list[str] = []
    table: list[str] = []
    taken = set(_TAKEN_ON_PARTICIPANT)
    for step in service.steps:
        method = _identifier(step.name, taken)
        taken.add(method)
        undo = _identifier(f"undo_{method}", taken) if step.compensable else None
        if undo is not None:
            taken.add(undo)
        table.extend(_table_entry(writer, step, method, undo))
        methods.extend(_step_methods(writer, step, method, undo))
    writer.add(
        "",
        "",
        f"class {class_name}(TypedParticipant):",
        f'    """The steps of the contract {service.full_name},',
        f"    declared in {service.file}.",
        "",
        "    Subclass this class, implement each method, and serve it as any participant.",
        '    """',
        "",
        # From the descriptor, whose import puts the service in the default
        # pool: server reflection describes it from there.
        "    contract: ClassVar[str] = (",
        f'        {writer.module(service.file)}.DESCRIPTOR.services_by_name["{service.name}"].full_name',
        "    )",
        "    steps: ClassVar[dict[str, TypedStep]] = {",
        *table,
        "    }",
        *methods,
    )
    return class_name


def _table_entry(writer: _Writer, step: ContractStep, method: str, undo: str | None) -> list[str]:
    entry = [
        f'        "{step.name}": TypedStep(',
        f'            method="{method}",',
        f"            input={writer.type_of(step.input_type)},",
        f"            output={writer.type_of(step.output_type)},",
    ]
    if step.needs:
        entry.append("            needs=(")
        entry.extend(f'                ("{need.step}", {writer.type_of(need.type)}),' for need in step.needs)
        entry.append("            ),")
    if step.long_running:
        entry.append("            long_running=True,")
    if undo is not None:
        entry.append(f'            undo="{undo}",')
    if step.undo_output:
        entry.append(f"            undo_output={writer.type_of(step.undo_output)},")
    entry.append("        ),")
    return entry


def _step_methods(writer: _Writer, step: ContractStep, method: str, undo: str | None) -> list[str]:
    used = {"self", "conn", "ctx"}
    saga_input = _identifier(snake_case(_stem(step.input_type)), used)
    used.add(saga_input)
    needs: list[str] = []
    for need in step.needs:
        name = _identifier(need.step, used)
        used.add(name)
        needs.append(f"        {name}: {writer.type_of(need.type)},")
    if step.long_running:
        writer.uses_pending = True
    pending_doc = ""
    if step.long_running:
        pending_doc = ",\n        or Pending(output) and reports the outcome later with the completion token"
    needs_doc = f"Receives the outputs of {', '.join(repr(need.step) for need in step.needs)}." if step.needs else ""
    lines = [
        "",
        "    @abc.abstractmethod",
        f"    async def {method}(",
        "        self,",
        "        conn: AsyncConnection,",
        f"        {saga_input}: {writer.type_of(step.input_type)},",
        *needs,
        *([f"        {_identifier('completion_token', used)}: str,"] if step.long_running else []),
        "        ctx: StepContext,",
        f"    ) -> {writer.type_of(step.output_type)}{' | Pending' if step.long_running else ''}:",
        f'        """Step "{step.name}" ({kind_name(step.kind)}), the rpc {step.method}.',
        "",
        f"        Applies its effect through `conn` and returns its output{pending_doc}.",
        *([f"        {needs_doc}"] if needs_doc else []),
        '        """',
    ]
    if undo is None:
        return lines
    executed = _identifier(snake_case(step.output_type.rpartition(".")[2]), used)
    executed_type = writer.type_of(step.output_type) + (" | None" if step.long_running else "")
    undo_returns = writer.type_of(step.undo_output) if step.undo_output else "None"
    undo_doc = f'        """Undoes step "{step.name}" through `conn`, given what its Execute returned."""'
    if step.long_running:
        undo_doc = "\n".join([
            f'        """Undoes step "{step.name}" through `conn`, given what its Execute returned: the',
            "        output of its Pending, else the output its outcome was reported with, else None.",
            '        """',
        ])
    return [
        *lines,
        "",
        "    @abc.abstractmethod",
        f"    async def {undo}(",
        "        self,",
        "        conn: AsyncConnection,",
        f"        {saga_input}: {writer.type_of(step.input_type)},",
        f"        {executed}: {executed_type},",
        *needs,
        "        ctx: StepContext,",
        f"    ) -> {undo_returns}:",
        undo_doc,
    ]


def _starters(writer: _Writer, services: Sequence[ContractService]) -> list[str]:
    by_input: dict[str, list[ContractStep]] = {}
    for service in services:
        for step in service.steps:
            by_input.setdefault(step.input_type, []).append(step)
    names: list[str] = []
    for input_type, steps in by_input.items():
        stem = _stem(input_type)
        run_class, starter_class = f"{stem}SagaRun", f"{stem}Saga"
        methods: list[str] = []
        taken = set(_TAKEN_ON_RUN)
        for step in steps:
            if _identifier(step.name) in taken:
                raise ContractError(
                    f"two contracts of one file have a step {step.name!r} for the input {input_type}; rename one"
                )
            method = _identifier(step.name, taken)
            taken.add(method)
            output = writer.type_of(step.output_type)
            methods.extend([
                "",
                f"    def {method}(self) -> {output} | None:",
                f'        """The output of step "{step.name}", once it has one."""',
                f'        return self._output("{step.name}", {output})',
            ])
        typed_input = writer.type_of(input_type)
        writer.add(
            "",
            "",
            f"class {run_class}(SagaRun):",
            f'    """A saga whose input is a {input_type}, with its steps\' outputs typed."""',
            *methods,
            "",
            "",
            f"class {starter_class}(",
            f"    SagaStarter[{typed_input}, {run_class}],",
            "):",
            f'    """Starts sagas of the definition "{snake_case(stem)}" (or `definition_name`)',
            f'    with a {input_type}."""',
            "",
            f'    definition_name: ClassVar[str] = "{snake_case(stem)}"',
            f"    run_type = {run_class}",
        )
        names.extend([run_class, starter_class])
    return names


def generate_files(
    files: Sequence[descriptor_pb2.FileDescriptorProto], to_generate: Iterable[str]
) -> dict[str, str]:
    """Generated file name -> content, for each of `to_generate` (names of
    `files`, which hold their imports too) that declares a contract service.
    ContractError for a contract that is not one."""
    locations = message_locations(files)
    generated: dict[str, str] = {}
    for name in to_generate:
        services = contract_services(files, in_files=[name])
        if not services:
            continue
        writer = _Writer(locations)
        exported = [_participant_class(writer, service) for service in services]
        exported.extend(_starters(writer, services))
        generated[output_name(name)] = _module_text(name, writer, exported)
    return generated


def _module_text(proto_file: str, writer: _Writer, exported: Sequence[str]) -> str:
    header = [
        f'"""Generated by protoc-gen-compensa_python from {proto_file}. Do not edit.',
        "",
        "Participant base classes and saga starters of its contracts (see compensa/v1/contract.proto).",
        '"""',
        "",
        # As mypy-protobuf's: whether a project's own _pb2 modules are first-party
        # is the project's setting, so no import order suits every project.
        "# isort: skip_file",
        "",
        "from __future__ import annotations",
        "",
        "import abc",
        "from typing import ClassVar",
        "",
        *(f"import {module}" for module in sorted(writer.modules) if not _ours(module)),
        "from sqlalchemy.ext.asyncio import AsyncConnection",
        "",
        *(f"import {module}" for module in sorted(writer.modules) if _ours(module)),
        *(["from compensa.participants.sdk import Pending"] if writer.uses_pending else []),
        "from compensa.participants.typed import SagaRun, SagaStarter, TypedParticipant, TypedStep",
        "from compensa.v1.participant_pb2 import StepContext",
        "",
        "__all__ = [",
        *(f'    "{name}",' for name in sorted(exported)),
        "]",
    ]
    return "\n".join([*header, *writer.lines]) + "\n"


def _ours(module: str) -> bool:
    """First-party to isort, so imported in the last block: every module but
    protobuf's own (the well-known types), as generated code sits in the
    project that generated it."""
    return not module.startswith("google.protobuf.")


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    """protoc's request -> the plugin's response (an error for a contract that is not one)."""
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    try:
        generated = generate_files(request.proto_file, request.file_to_generate)
    except ContractError as error:
        response.error = str(error)
        return response
    for name, content in generated.items():
        response.file.add(name=name, content=content)
    return response


def main() -> None:
    """The protoc plugin's entry point: a CodeGeneratorRequest on stdin, the response on stdout."""
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
