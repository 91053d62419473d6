"""`compensa audit`: asks the orchestrator to audit the saga log against every
participant's barrier records (AuditSagas, orchestrator.auditor: a durable
job), follows the job until it is done, then prints what it found."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import uuid

import grpc
from google.protobuf import timestamp_pb2

from compensa.orchestrator.cli.connection import no_orchestrator_text, open_channel
from compensa.orchestrator.cli.exit_codes import EXIT_DISCREPANCIES, EXIT_OK
from compensa.orchestrator.cli.output import json_line
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc

# A call the orchestrator could not answer is made again this long after.
_AGAIN_SECONDS = 1.0


def audit(args: argparse.Namespace) -> int:
    """`compensa audit`: prints what the audit found; exit status 1 when it found discrepancies."""
    request = orchestrator_pb2.AuditSagasRequest(
        definition_name=args.definition, participants=args.participant
    )
    if args.since is not None:
        since = args.since if isinstance(args.since, datetime.datetime) else (
            datetime.datetime.now(datetime.UTC) - args.since
        )
        request.since.CopyFrom(timestamp_pb2.Timestamp(seconds=int(since.timestamp())))
    for field in ("barrier_retention", "settle_grace", "clock_skew_margin"):
        value = getattr(args, field)
        if value is not None:
            getattr(request, field).CopyFrom(value)
    request.audit_id = f"audit-{uuid.uuid4().hex[:16]}"
    response = _follow(args, request, time.monotonic() + args.wait.ToNanoseconds() / 1e9)
    if args.json:
        print(json_line(response))
    else:
        _print_text(response)
    found = any(each.discrepancies for each in response.participants) or bool(response.saga_discrepancies)
    return EXIT_DISCREPANCIES if found else EXIT_OK


def _follow(
    args: argparse.Namespace, request: orchestrator_pb2.AuditSagasRequest, deadline: float
) -> orchestrator_pb2.AuditSagasResponse:
    """The audit's report. The job goes on when the replica answering dies (another carries it
    on): the call is made again with the job's id, and follows it, until `deadline`."""
    reached = False
    while True:
        with open_channel(args) as channel:
            try:
                return orchestrator_pb2_grpc.OrchestratorServiceStub(channel).AuditSagas(
                    request, timeout=max(0.001, deadline - time.monotonic())
                )
            except grpc.RpcError as error:
                assert isinstance(error, grpc.Call)
                # Nothing listening at the first call: said at once; a call cut off: followed again.
                nothing_there = no_orchestrator_text(error, args.address) is not None
                reached = reached or not nothing_there
                if error.code() != grpc.StatusCode.UNAVAILABLE or not reached or time.monotonic() >= deadline:
                    raise
        print(f"audit {request.audit_id}: the orchestrator is unavailable; following the audit again", file=sys.stderr)
        time.sleep(_AGAIN_SECONDS)


def _rfc3339(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(datetime.UTC).isoformat(timespec="milliseconds")


def _print_text(response: orchestrator_pb2.AuditSagasResponse) -> None:
    for each in response.participants:
        if not each.audited:
            print(f"{each.participant} ({each.address}): not audited: {each.not_audited_reason}")
            continue
        verdict = f"{len(each.discrepancies)} discrepancies" if each.discrepancies else "clean"
        print(f"{each.participant} ({each.address}): {each.sagas} sagas, {each.rows} rows: {verdict}")
        if each.HasField("audited_clean_through"):
            print(f"  audited clean through sagas created up to {_rfc3339(each.audited_clean_through)}")
        if each.HasField("purge_watermark"):
            print(f"  may delete barrier rows created before {_rfc3339(each.purge_watermark)}")
        for found in each.discrepancies:
            print(f"  {found.message}")
    for found in response.saga_discrepancies:
        print(found.message)
    if not response.participants:
        print("no participants with a stored address to audit")
