"""What the commands print: protobuf JSON (--json), text rows and tables,
saga timelines (orchestrator.timeline, in color on a terminal), and the one
line an error is shown as."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import cast

import grpc
from google.protobuf import descriptor, descriptor_pool, json_format
from google.protobuf.message import Message

from compensa.orchestrator.shared import payloads, timeline
from compensa.orchestrator.shared.errors import CompensaError
from compensa.orchestrator.shared.records import ACTIVE_SAGA_STATES
from compensa.orchestrator.shared.timeline import short_duration
from compensa.v1 import definition_pb2, orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2


def error_text(error: BaseException) -> str:
    """`error` for the user: a gRPC error as ``CODE: details``, any other as its message."""
    if isinstance(error, grpc.Call):
        return f"{error.code().name}: {error.details()}"
    return str(error)


class DefinitionTypes:
    """The message types of the definitions sagas were started from, asked
    of the orchestrator once per definition version: --json output decodes
    inputs and outputs of any registered type."""

    def __init__(self, stub: orchestrator_pb2_grpc.OrchestratorServiceStub, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout
        self._pools: dict[tuple[str, int], descriptor_pool.DescriptorPool] = {}

    def saga_json(self, saga: saga_pb2.Saga, *, indent: int | None = None) -> str:
        """`saga` as JSON, its payloads decoded with its definition's types (one line unless `indent`)."""
        key = (saga.definition_name, saga.definition_version)
        pool = self._pools.get(key)
        if pool is None:
            try:
                definition = self._stub.GetDefinition(
                    orchestrator_pb2.GetDefinitionRequest(name=key[0], version=key[1]), timeout=self._timeout
                ).definition
                pool = payloads.pool_of(definition)
            except (grpc.RpcError, CompensaError):
                pool = descriptor_pool.Default()  # shown as type and bytes if unknown
            self._pools[key] = pool
        as_dict = payloads.saga_json_dict(saga, pool)
        return json.dumps(as_dict, indent=indent) if indent else json.dumps(as_dict, separators=(",", ":"))


def print_saga(
    args: argparse.Namespace, saga: saga_pb2.Saga, *, stub: orchestrator_pb2_grpc.OrchestratorServiceStub
) -> None:
    """`saga` as indented JSON with --json, else as its timeline."""
    if args.json:
        print(DefinitionTypes(stub, args.timeout).saga_json(saga, indent=2))
    else:
        print(timeline.format_saga(saga, color=use_color()))


def print_events(
    args: argparse.Namespace,
    events: Iterable[saga_pb2.SagaEvent],
    *,
    with_saga_id: bool = False,
) -> None:
    """Each event as a JSON line with --json, else as a timeline line (after
    its log position and saga id if `with_saga_id`); flushed, for streams."""
    color = use_color()
    for event in events:
        if args.json:
            print(json_line(event), flush=True)
        elif with_saga_id:
            print(f"@{event.position:<6} {event.saga_id}{timeline.format_event(event, color=color)}", flush=True)
        else:
            print(timeline.format_event(event, color=color), flush=True)


def print_alert(args: argparse.Namespace, alert: orchestrator_pb2.Alert) -> None:
    """An alert as a JSON line with --json, else as one line: its log
    position, time, kind, what it is about and its message; flushed."""
    if args.json:
        print(json_line(alert), flush=True)
        return
    kind = orchestrator_pb2.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_")
    if alert.kind == orchestrator_pb2.ALERT_KIND_SAGA:
        about = f"saga {alert.saga_id}" + (f" step {alert.step_name}" if alert.step_name else "")
    elif alert.kind == orchestrator_pb2.ALERT_KIND_EVENT_LOG_HELD_BACK:
        about = "the event log"
    else:
        about = f"participant {alert.participant} at {alert.address}"
    when = alert.raise_time.ToDatetime(datetime.UTC).isoformat(timespec="seconds")
    print(f"@{alert.position:<6} {when} {kind:<{_ALERT_KIND_WIDTH}} {about}: {alert.message}", flush=True)


# The kind column fits the longest kind.
_ALERT_KIND_WIDTH = max(len(name.removeprefix("ALERT_KIND_")) for name in orchestrator_pb2.AlertKind.keys())


def print_saga_table(sagas: Sequence[saga_pb2.Saga]) -> None:
    """The table of `compensa list`: a header, then a saga per line, in aligned columns."""
    rows = [("SAGA ID", "DEFINITION", "STATE", "SEQ", "UPDATED")]
    if not sagas:
        print("(no sagas)")
        return
    for saga in sagas:
        rows.append((
            saga.saga_id,
            f"{saga.definition_name}@{saga.definition_version}",
            timeline.saga_state_name(saga.state),
            str(saga.sequence),
            saga.update_time.ToJsonString() if saga.HasField("update_time") else "",
        ))
    print_table(rows, right_aligned={3})


def print_table(rows: Sequence[Sequence[str]], *, right_aligned: set[int]) -> None:
    """`rows` (the first a header) in columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) if column in right_aligned else cell.ljust(width)
                        for column, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip())


def print_status(response: orchestrator_pb2.SummarizeSagasResponse) -> None:
    """The table of `compensa status`, with a line saying what its counts mean."""
    if not response.states:
        print("(no sagas)")
        return
    read_at = response.read_time.ToNanoseconds() / 1e9
    rows = [("DEFINITION", "STATE", "SAGAS", "STUCK", "UNRESOLVED", "OLDEST CHANGE")]
    for summary in response.states:
        age = read_at - summary.oldest_update_time.ToNanoseconds() / 1e9
        rows.append((
            summary.definition_name,
            timeline.saga_state_name(summary.state),
            str(summary.count),
            str(summary.stuck) if summary.state in ACTIVE_SAGA_STATES else "-",
            str(summary.unresolved) if summary.state == saga_pb2.SAGA_STATE_FAILED else "-",
            f"{short_duration(max(age, 0.0))} ago",
        ))
    print_table(rows, right_aligned={2, 3, 4, 5})
    stuck_for = response.stuck_for.ToNanoseconds() / 1e9
    print(f"stuck: unfinished and unchanged for {short_duration(stuck_for)} (compensa list --stuck"
          f" {short_duration(stuck_for)} lists them); unresolved: FAILED, waiting for retry or resolve")


def definition_dict(definition: definition_pb2.SagaDefinition) -> dict[str, object]:
    """A definition as JSON, its registered types named by file rather than
    written out as descriptors."""
    bare = definition_pb2.SagaDefinition()
    bare.CopyFrom(definition)
    bare.ClearField("types")
    shown = json_dict(bare)
    if definition.types.file:
        shown["types"] = {"files": [file.name for file in definition.types.file]}
    return shown


def json_dict(message: Message) -> dict[str, object]:
    """`message` in the proto3 JSON mapping, with the proto's field names and
    64-bit integers as numbers (`payloads.int64_as_numbers`)."""
    try:
        return payloads.int64_as_numbers(
            json_format.MessageToDict(message, preserving_proto_field_name=True),
            cast(descriptor.Descriptor, message.DESCRIPTOR),
        )
    except json_format.Error as error:  # e.g. a Duration out of JSON's range, stored before it was checked
        raise CompensaError(f"the orchestrator's answer cannot be shown as JSON: {error}") from None


def json_line(message: Message) -> str:
    """`message` as JSON on one line."""
    return json.dumps(json_dict(message), separators=(",", ":"))


def use_color() -> bool:
    """Whether timelines are printed in color: on a terminal, unless NO_COLOR is set."""
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ
