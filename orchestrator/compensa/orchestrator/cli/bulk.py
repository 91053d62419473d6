"""`compensa bulk ...`: bulk actions run by the server (start with a filter,
--dry-run to count first; list, get, pause, resume, cancel)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from compensa.orchestrator.cli.connection import open_channel
from compensa.orchestrator.cli.exit_codes import EXIT_OK
from compensa.orchestrator.cli.output import json_line, print_saga_table, print_table
from compensa.orchestrator.shared.errors import CompensaError
from compensa.orchestrator.shared.selection import ACTIONS
from compensa.v1 import bulk_pb2, orchestrator_pb2_grpc


def run(args: argparse.Namespace) -> int:
    """`compensa bulk COMMAND`."""
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        match args.bulk_command:
            case "start":
                _start(args, stub)
            case "list":
                _list(args, stub)
            case "get":
                answer = stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=args.id), timeout=args.timeout)
                _print_job(args, answer.bulk_action, answer.problems)
            case "pause":
                request = bulk_pb2.PauseBulkActionRequest(bulk_action_id=args.id)
                _print_job(args, stub.PauseBulkAction(request, timeout=args.timeout).bulk_action)
            case "resume":
                resume = bulk_pb2.ResumeBulkActionRequest(bulk_action_id=args.id)
                _print_job(args, stub.ResumeBulkAction(resume, timeout=args.timeout).bulk_action)
            case _:  # "cancel"
                cancel = bulk_pb2.CancelBulkActionRequest(bulk_action_id=args.id)
                _print_job(args, stub.CancelBulkAction(cancel, timeout=args.timeout).bulk_action)
    return EXIT_OK


def _start(args: argparse.Namespace, stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    if args.action == "move" and not args.to_version:
        raise CompensaError("move needs --to-version N: the version the sagas move to")
    if args.action != "move" and (args.to_version or args.map):
        raise CompensaError(f"--to-version and --map are for move, not {args.action}")
    answer = stub.StartBulkAction(
        bulk_pb2.StartBulkActionRequest(
            kind=ACTIONS[args.action], filter=args.filter, note=args.note, actor=args.actor,
            validate_only=args.dry_run, max_sagas_per_second=args.rate, request_id=args.request_id,
            to_version=args.to_version,
            step_mappings=[bulk_pb2.StepMapping(old_step=old, new_step=new) for old, new in args.map],
        ),
        timeout=args.timeout,
    )
    if args.json:
        print(json_line(answer))
        return
    if args.dry_run:
        if not answer.selected_count:
            print(f"the filter selects no saga that {args.action} applies to: nothing would be done")
            return
        print(f"{args.action} would act on {answer.selected_count} sagas; for example:")
        print_saga_table(answer.sample)
        print("(dry run: nothing was done)")
        return
    _print_job(args, answer.bulk_action)
    print(f"follow it with: compensa bulk get {answer.bulk_action.bulk_action_id}")


def _list(args: argparse.Namespace, stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    request = bulk_pb2.ListBulkActionsRequest(page_size=args.page_size)
    listed: list[bulk_pb2.BulkAction] = []  # without --json, printed at the end in aligned columns
    while True:
        response = stub.ListBulkActions(request, timeout=args.timeout)
        for job in response.bulk_actions:
            if args.json:
                print(json_line(job))
            else:
                listed.append(job)
        if not args.all or not response.next_page_token:
            break
        request.page_token = response.next_page_token
    if args.json:
        return
    if listed:
        _print_jobs(listed)
    else:
        print("(no bulk actions)")
    if response.next_page_token:
        print(f"(more: --all, or page token {response.next_page_token})", file=sys.stderr)


def _name(enum: type, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower().replace("_", "-")  # type: ignore[attr-defined,no-any-return]


def _print_jobs(jobs: Sequence[bulk_pb2.BulkAction]) -> None:
    """Jobs in aligned columns: id, action, state, progress, filter."""
    rows = [("ID", "ACTION", "STATE", "DONE", "SKIPPED", "FAILED", "PENDING", "SELECTED", "FILTER")]
    for job in jobs:
        rows.append((
            job.bulk_action_id, _name(bulk_pb2.BulkActionKind, job.kind, "BULK_ACTION_KIND_"),
            _name(bulk_pb2.BulkActionState, job.state, "BULK_ACTION_STATE_"), str(job.done_count),
            str(job.skipped_count), str(job.failed_count), str(job.pending_count), str(job.selected_count), job.filter,
        ))
    print_table(rows, right_aligned={3, 4, 5, 6, 7})


def _print_job(
    args: argparse.Namespace, job: bulk_pb2.BulkAction, problems: Sequence[bulk_pb2.BulkActionItem] = ()
) -> None:
    if args.json:
        print(json_line(job))
        for item in problems:
            print(json_line(item))
        return
    _print_jobs([job])
    print(f"started by {job.started_by} at {job.create_time.ToJsonString()}"
          + (f" on replica {job.replica}" if job.replica else "") + (f"; note: {job.note}" if job.note else ""))
    if job.kind == bulk_pb2.BULK_ACTION_KIND_MOVE:
        renames = ", ".join(f"{mapping.old_step}={mapping.new_step}" for mapping in job.step_mappings)
        print(f"moves sagas to version {job.to_version}" + (f", steps renamed {renames}" if renames else ""))
    for item in problems:
        outcome = _name(bulk_pb2.BulkItemOutcome, item.outcome, "BULK_ITEM_OUTCOME_")
        print(f"  {outcome:<7}  {item.saga_id}  {item.reason}")
