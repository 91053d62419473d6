"""BarrierAuditService for a participant built on the SDK: its barrier rows,
read-only, as digests, and the purge watermark its orchestrator sets (see
`compensa.participants.retention`). Served beside ParticipantService by
`compensa.participants.serving.start_server`."""

from __future__ import annotations

import datetime
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from compensa.participants.retention import (
    AuditedRow,
    BadPageToken,
    RowQuery,
    list_rows,
    raise_watermark,
)
from compensa.participants.sdk import InvalidRequest, Participant, status_of
from compensa.v1 import barrier_audit_pb2, barrier_audit_pb2_grpc

__all__ = ["MAX_PAGE_SIZE", "MAX_SAGA_IDS", "WATERMARK_AHEAD_LIMIT", "BarrierAudit"]

_R = TypeVar("_R")

MAX_PAGE_SIZE = 1000
_DEFAULT_PAGE_SIZE = 500
MAX_SAGA_IDS = 1000
#: How far ahead of this participant's clock a purge watermark may be (the
#: orchestrator's clock may run a little ahead; its own watermark is already
#: behind it by its commit lag and clock-skew margin). A stray call further
#: ahead would purge the rows of sagas never audited, and the watermark never moves back.
WATERMARK_AHEAD_LIMIT = datetime.timedelta(seconds=60)

_OPERATIONS = {
    "execute": barrier_audit_pb2.BARRIER_OPERATION_EXECUTE,
    "compensate": barrier_audit_pb2.BARRIER_OPERATION_COMPENSATE,
}
_OUTCOMES = {
    None: barrier_audit_pb2.BARRIER_OUTCOME_IN_PROGRESS,
    "succeeded": barrier_audit_pb2.BARRIER_OUTCOME_SUCCEEDED,
    "pending": barrier_audit_pb2.BARRIER_OUTCOME_PENDING,
    "failed": barrier_audit_pb2.BARRIER_OUTCOME_FAILED,
    "null_compensated": barrier_audit_pb2.BARRIER_OUTCOME_NULL_COMPENSATED,
    "compensated": barrier_audit_pb2.BARRIER_OUTCOME_COMPENSATED,
    "nothing_to_undo": barrier_audit_pb2.BARRIER_OUTCOME_NOTHING_TO_UNDO,
    "settled_succeeded": barrier_audit_pb2.BARRIER_OUTCOME_SETTLED_SUCCEEDED,
    "settled_failed": barrier_audit_pb2.BARRIER_OUTCOME_SETTLED_FAILED,
}


def _timestamp(moment: datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _moment(stamp: timestamp_pb2.Timestamp) -> datetime.datetime:
    return stamp.ToDatetime(datetime.UTC)


def _row_message(row: AuditedRow) -> barrier_audit_pb2.BarrierRow:
    return barrier_audit_pb2.BarrierRow(
        saga_id=row.saga_id, step_name=row.step_name, idempotency_key=row.idempotency_key,
        operation=_OPERATIONS.get(row.operation, barrier_audit_pb2.BARRIER_OPERATION_UNSPECIFIED),
        outcome=_OUTCOMES.get(row.outcome, barrier_audit_pb2.BARRIER_OUTCOME_UNSPECIFIED),
        answer_digest=row.answer_digest, create_time=_timestamp(row.created_at),
    )


def _row_query(request: barrier_audit_pb2.ListBarrierRowsRequest) -> tuple[RowQuery, int]:
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"page_size {request.page_size} is out of range: use 1 to {MAX_PAGE_SIZE} (0: 500)")
    if len(request.saga_ids) > MAX_SAGA_IDS:
        raise InvalidRequest(f"{len(request.saga_ids)} saga_ids: send at most {MAX_SAGA_IDS} per request")
    query = RowQuery(
        saga_ids=tuple(request.saga_ids),
        created_from=_moment(request.create_time_from) if request.HasField("create_time_from") else None,
        created_to=_moment(request.create_time_to) if request.HasField("create_time_to") else None,
    )
    return query, request.page_size or _DEFAULT_PAGE_SIZE


class BarrierAudit(barrier_audit_pb2_grpc.BarrierAuditServiceServicer):
    """BarrierAuditService over `participant`'s barrier table (grpc.aio)."""

    def __init__(self, participant: Participant) -> None:
        self._participant = participant

    async def ListBarrierRows(
        self,
        request: barrier_audit_pb2.ListBarrierRowsRequest,
        context: grpc.aio.ServicerContext[Any, barrier_audit_pb2.ListBarrierRowsResponse],
    ) -> barrier_audit_pb2.ListBarrierRowsResponse:
        """A page of barrier rows (see the service's contract)."""
        participant = self._participant

        async def page() -> barrier_audit_pb2.ListBarrierRowsResponse:
            query, page_size = _row_query(request)
            try:
                rows, next_token = await list_rows(
                    participant.engine, participant.barrier, query, request.page_token, page_size,
                    participant.database_timeout,
                )
            except BadPageToken as error:
                raise InvalidRequest(str(error)) from None
            await participant.refresh_purge_watermark()
            response = barrier_audit_pb2.ListBarrierRowsResponse(
                rows=[_row_message(row) for row in rows], next_page_token=next_token
            )
            if participant.purge_watermark is not None:
                response.purge_watermark.CopyFrom(_timestamp(participant.purge_watermark))
            return response

        return await _answered(page(), context)

    async def SetPurgeWatermark(
        self,
        request: barrier_audit_pb2.SetPurgeWatermarkRequest,
        context: grpc.aio.ServicerContext[Any, barrier_audit_pb2.SetPurgeWatermarkResponse],
    ) -> barrier_audit_pb2.SetPurgeWatermarkResponse:
        """Moves the purge watermark forward (see the service's contract)."""
        participant = self._participant

        async def set_watermark() -> barrier_audit_pb2.SetPurgeWatermarkResponse:
            if not request.HasField("purge_before"):
                raise InvalidRequest("purge_before is required: rows created before it may be deleted")
            purge_before = _moment(request.purge_before)
            latest = datetime.datetime.now(datetime.UTC) + WATERMARK_AHEAD_LIMIT
            if purge_before > latest:
                raise InvalidRequest(
                    f"purge_before {purge_before.isoformat()} is ahead of this participant's clock"
                    f" ({latest.isoformat()} with the {WATERMARK_AHEAD_LIMIT.total_seconds():.0f}s allowed for"
                    " clock skew): it would purge rows of sagas not yet audited, and a watermark never moves back;"
                    " send one derived from rows already audited (check the clocks)"
                )
            in_force = await raise_watermark(
                participant.engine, participant.barrier_watermark, purge_before, participant.database_timeout
            )
            participant.purge_watermark = in_force
            return barrier_audit_pb2.SetPurgeWatermarkResponse(purge_watermark=_timestamp(in_force))

        return await _answered(set_watermark(), context)


async def _answered(work: Awaitable[_R], context: grpc.aio.ServicerContext[Any, Any]) -> _R:
    """`work`'s result, or its error as the call's status (`sdk.status_of`)."""
    try:
        return await work
    except Exception as error:
        code, details = status_of(error)
        await context.abort(code, details)
        raise  # context.abort raises; this is never reached
