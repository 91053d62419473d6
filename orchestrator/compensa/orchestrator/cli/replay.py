"""The commands that replay sagas' logs through the state machine: replay
(one saga, under its own version or a definition file) and plan (every saga
in flight against a definition file, classified; nothing changes)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

from compensa.orchestrator.api.history_checks import check_history
from compensa.orchestrator.cli.connection import open_channel
from compensa.orchestrator.cli.exit_codes import EXIT_DIVERGED, EXIT_OK
from compensa.orchestrator.cli.output import json_line
from compensa.orchestrator.definitions import load_definition_file
from compensa.orchestrator.shared import payloads
from compensa.orchestrator.shared.errors import CompensaError
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.v1 import bulk_pb2, definition_pb2, orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2


def _definition(path: Path, proto_modules: list[str]) -> definition_pb2.SagaDefinition:
    payloads.import_proto_modules(proto_modules)
    return load_definition_file(path)


def replay(args: argparse.Namespace) -> int:
    """`compensa replay ID [--definition FILE]`: the saga's log through the
    machine; exit 1 if it diverges (or, under its own version, ends elsewhere)."""
    if args.map and not args.definition:
        raise CompensaError("--map renames steps for --definition FILE; give the file too")
    definition = _definition(args.definition, args.proto_module) if args.definition else None
    renames = dict(args.map)
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        history = stub.GetSagaHistory(
            orchestrator_pb2.GetSagaHistoryRequest(saga_id=args.saga_id), timeout=args.timeout
        ).history
    check = check_history(history, definition, renames=renames)
    if args.json:
        print(json.dumps({
            "saga_id": check.saga_id,
            "definition_version": check.definition_version,
            "events": check.events,
            "replays": check.ok,
            "diverging_sequence": check.divergence.sequence if check.divergence else 0,
            "reason": check.divergence.reason if check.divergence else "",
            "differences": list(check.differences),
        }, separators=(",", ":")))
    else:
        against = f"definition file {args.definition}" if args.definition else "its own version"
        print(f"{check.summary()} (replayed under {against})")
    return EXIT_OK if check.ok else EXIT_DIVERGED


def plan(args: argparse.Namespace) -> int:
    """`compensa plan FILE`: each selected saga in flight classified against
    the definition in FILE; changes nothing."""
    definition = _definition(args.definition_file, args.proto_module)
    request = orchestrator_pb2.PlanMigrationRequest(
        definition=definition,
        definition_version=args.definition_version,
        state=args.state or saga_pb2.SAGA_STATE_UNSPECIFIED,
        saga_ids=args.saga,
        step_mappings=[bulk_pb2.StepMapping(old_step=old, new_step=new) for old, new in args.map],
        page_size=args.page_size,
        filter=args.filter,
    )
    counts: dict[str, int] = {}
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if not args.json:
            print(f"{'SAGA':<40} {'VERSION':>7} {'STATE':<12} {'VERDICT':<24} {'EVENT':>5}  REASON")
        while True:
            response = stub.PlanMigration(request, timeout=args.timeout)
            for planned in response.plans:
                verdict = _verdict_name(planned.verdict)
                counts[verdict] = counts.get(verdict, 0) + 1
                print(json_line(planned) if args.json else _plan_row(planned, verdict))
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
    if not args.json:
        print(_totals(counts))
    return EXIT_OK


def _verdict_name(verdict: int) -> str:
    return str(orchestrator_pb2.MigrationVerdict.Name(verdict)).removeprefix("MIGRATION_VERDICT_")  # type: ignore[arg-type]


def _plan_row(planned: orchestrator_pb2.SagaMigrationPlan, verdict: str) -> str:
    state = saga_state_name(planned.state)
    event = str(planned.diverging_sequence) if planned.diverging_sequence else "-"
    return (
        f"{planned.saga_id:<40} {planned.definition_version:>7} {state:<12} {verdict:<24} {event:>5}  {planned.reason}"
    )


def _totals(counts: Mapping[str, int]) -> str:
    if not counts:
        return "no saga in flight matches"
    return "; ".join(f"{verdict.lower().replace('_', ' ')}: {count}" for verdict, count in sorted(counts.items()))
