"""Definitions checked against participants' stored contracts (see
protos/compensa/v1/contract.proto): every step on a participant with a
contract must be one of its steps, accept the saga's input type, have its
kind, and depend on the earlier steps whose outputs it needs (of the types
it needs, when their participants have contracts too)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from google.protobuf import message

from compensa.common.contracts import ContractError, ContractService, contract_services, kind_name
from compensa.orchestrator.definitions._graph import ancestors
from compensa.orchestrator.definitions._validation import MAX_REFERENCE_CHARS
from compensa.orchestrator.shared.errors import FailedPrecondition, InvalidArgument
from compensa.orchestrator.shared.payloads import build_pool
from compensa.v1 import contract_pb2, definition_pb2

__all__ = [
    "ContractMismatch",
    "check_against_contracts",
    "contract_change_breaks",
    "contract_mismatches",
    "forced_contract_message",
    "read_contract",
    "stored_contract",
]


class ContractMismatch(FailedPrecondition):
    """A definition and a participant's contract do not fit; the message names
    the definition, the step, the participant, and what each says."""

    reason = "CONTRACT_MISMATCH"


def read_contract(name: str, contract: contract_pb2.ParticipantContract) -> ContractService:
    """The contract service `contract` names (or the one it declares);
    InvalidArgument when it is not a contract."""
    if not contract.types.file:
        raise InvalidArgument(f"participant {name!r}: the contract has no files (compile its .proto with its imports)")
    build_pool(contract.types)  # InvalidArgument unless the files form a complete, consistent schema
    try:
        services = contract_services(contract.types.file)
    except ContractError as error:
        raise InvalidArgument(f"participant {name!r}: the contract is not one: {error}") from None
    if contract.service:
        chosen = [service for service in services if service.full_name == contract.service]
    else:
        chosen = services
    if len(chosen) != 1:
        declared = ", ".join(service.full_name for service in services) or "none"
        wanted = f"no contract service {contract.service!r}" if contract.service else "not one contract service"
        raise InvalidArgument(
            f"participant {name!r}: the contract's files declare {wanted} (services with (compensa.v1.step) rpcs:"
            f" {declared}); name one with `--service`"
        )
    if len(chosen[0].full_name) > MAX_REFERENCE_CHARS:
        raise InvalidArgument(
            f"participant {name!r}: the contract service's full name is longer than {MAX_REFERENCE_CHARS} characters"
        )
    return chosen[0]


@functools.lru_cache(maxsize=256)
def stored_contract(name: str, serialized: bytes) -> ContractService:
    """A contract as the store keeps it (validated when it was stored); read
    once per content, as every registration and listing reads them all."""
    try:
        contract = contract_pb2.ParticipantContract.FromString(serialized)
    except message.DecodeError:
        raise InvalidArgument(f"participant {name!r}: the stored contract does not decode") from None
    return read_contract(name, contract)


def check_against_contracts(
    definition: definition_pb2.SagaDefinition, contracts: Mapping[str, ContractService]
) -> None:
    """ContractMismatch listing every way `definition` (normalized) does not
    fit the `contracts` of the participants it names (by participant name);
    steps on participants without a contract are not checked."""
    mismatches = contract_mismatches(definition, contracts)
    if mismatches:
        raise ContractMismatch("; ".join(mismatch for _, mismatch in mismatches))


def contract_mismatches(
    definition: definition_pb2.SagaDefinition, contracts: Mapping[str, ContractService]
) -> list[tuple[str, str]]:
    """Every way `definition` (normalized) does not fit `contracts`, as (step
    name, a message naming the definition, the step, the participant and what
    each says)."""
    mismatches: list[tuple[str, str]] = []
    outputs = {
        step.name: found.output_type
        for step in definition.steps
        if (contract := contracts.get(step.participant)) is not None and (found := contract.step(step.name))
    }
    for step in definition.steps:
        contract = contracts.get(step.participant)
        if contract is None:
            continue
        where = (
            f"definition {definition.name!r} step {step.name!r}: participant {step.participant!r}"
            f" ({contract.full_name})"
        )
        wrong: list[str] = []
        declared = contract.step(step.name)
        if declared is None:
            steps = ", ".join(repr(each.name) for each in contract.steps)
            mismatches.append((step.name, f"{where} has no step {step.name!r}; its steps are {steps}"))
            continue
        if declared.input_type != definition.input_type:
            wrong.append(
                f"{where} accepts a saga input of type {declared.input_type}; the definition's input_type is"
                f" {definition.input_type}"
            )
        if kind_name(declared.kind) != kind_name(step.kind):
            wrong.append(
                f"{where} is {kind_name(declared.kind)} in the contract; the definition says {kind_name(step.kind)}"
            )
        if declared.long_running and not step.long_running:
            wrong.append(
                f"{where} is long-running in the contract (it may answer Pending); the definition's step must say"
                " long_running: true"
            )
        earlier = ancestors(definition, step.name)
        for need in declared.needs:
            if need.step not in earlier:
                wrong.append(
                    f"{where} needs the output of step {need.step!r} (a {need.type}), and the definition does not"
                    f" make it depend on {need.step!r}"
                )
            elif need.step in outputs and outputs[need.step] != need.type:
                wrong.append(
                    f"{where} needs a {need.type} from step {need.step!r}, whose contract says it outputs a"
                    f" {outputs[need.step]}"
                )
        mismatches.extend((step.name, mismatch) for mismatch in wrong)
    return mismatches


def contract_change_breaks(
    definitions: Sequence[definition_pb2.SagaDefinition], contracts: Mapping[str, ContractService]
) -> list[tuple[str, str, str]]:
    """(definition name, step name, message) for each way one of
    `definitions` (registered versions) does not fit `contracts`; a mismatch
    several versions share is listed once."""
    breaks: dict[str, tuple[str, str, str]] = {}
    for definition in definitions:
        for step, mismatch in contract_mismatches(definition, contracts):
            breaks.setdefault(mismatch, (definition.name, step, mismatch))
    return list(breaks.values())


def forced_contract_message(
    participant: str, service: str, actor: str, breaks: Sequence[tuple[str, str, str]]
) -> str:
    """What a forced contract change is logged and alerted as: who stored it,
    the definitions and steps it breaks, and each mismatch."""
    steps: dict[str, list[str]] = {}
    for definition, step, _ in breaks:
        named = steps.setdefault(definition, [])
        if step not in named:
            named.append(step)
    broken = ", ".join(
        f"definition {definition!r} (step{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))})"
        for definition, names in steps.items()
    )
    mismatches = "; ".join(mismatch for _, _, mismatch in breaks)
    return (
        f"participant {participant!r}: contract {service} stored by {actor} with force, though it breaks"
        f" {broken}: {mismatches}"
    )
