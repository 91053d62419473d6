"""The rows both stores build from records and records from rows: one
place for the mapping between SagaRecord, its steps, events and alerts and
the tables of schema.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from compensa.orchestrator.shared.errors import RejectedWrite
from compensa.orchestrator.shared.records import LogEvent, SagaRecord, StepRecord
from compensa.orchestrator.store.base import SAGA_ALERT, SagaWrite, StoredAlert, StoredEvent
from compensa.orchestrator.store.schema import alerts
from compensa.v1 import saga_pb2

ALERT_RAISED = saga_pb2.EVENT_TYPE_ALERT_RAISED


def rejected(error: Exception) -> RejectedWrite:
    """A flush failure tied to the values written, not to the connection: the
    same flush without the offending write would land."""
    first_line = str(error).partition("\n")[0][:200]
    return RejectedWrite(f"the database refused a value of this change ({type(error).__name__}: {first_line})")


def step_row(saga_id: str, position: int, step: StepRecord) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "step_name": step.name,
        "position": position,
        "state": step.state,
        "attempts": step.attempts,
        "compensate_attempts": step.compensate_attempts,
        "output": step.output,
        "last_error": step.last_error,
        "effect_uncertain": step.effect_uncertain,
        "delivery": step.delivery,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "next_attempt_at": step.next_attempt_at,
        "idempotency_name": step.idempotency_name or None,
    }


def event_row(saga: SagaRecord, event: LogEvent, position: int) -> dict[str, Any]:
    return {
        "saga_id": saga.saga_id,
        "sequence": event.sequence,
        "position": position,
        "type": event.type,
        "time": event.time,
        "saga_state": event.saga_state,
        "step_name": event.step_name,
        "step_state": event.step_state,
        "attempt": event.attempt,
        "message": event.message,
        "actor": event.actor,
        "definition_name": saga.definition_name,
    }


def saga_alert(saga: SagaRecord, event: LogEvent, event_position: int, position: int) -> StoredAlert:
    return StoredAlert(
        position=position, kind=SAGA_ALERT, raised_at=event.time, message=event.message, saga_id=saga.saga_id,
        sequence=event.sequence, event_position=event_position, definition_name=saga.definition_name,
        step_name=event.step_name,
    )


def alert_row(alert: StoredAlert) -> dict[str, Any]:
    return {column.name: getattr(alert, column.name) for column in alerts.columns}


def outbox_row(alert: StoredAlert) -> dict[str, Any]:
    return {"position": alert.position, "attempts": 0, "next_attempt_at": alert.raised_at, "last_error": ""}


def stored_alert(row: sa.Row[Any]) -> StoredAlert:
    return StoredAlert(**{column.name: getattr(row, column.name) for column in alerts.columns})


def stored_event(row: sa.Row[Any]) -> StoredEvent:
    return StoredEvent(
        saga_id=row.saga_id,
        definition_name=row.definition_name,
        position=row.position,
        event=LogEvent(
            sequence=row.sequence,
            type=row.type,
            time=row.time,
            saga_state=row.saga_state,
            step_name=row.step_name,
            step_state=row.step_state,
            attempt=row.attempt,
            message=row.message,
            actor=row.actor,
        ),
    )


def saga_from_rows(row: sa.Row[Any], step_rows: Sequence[sa.Row[Any]]) -> SagaRecord:
    return SagaRecord(
        saga_id=row.saga_id,
        definition_name=row.definition_name,
        definition_version=row.definition_version,
        state=row.state,
        sequence=row.sequence,
        input=row.input,
        created_at=row.created_at,
        updated_at=row.updated_at,
        failure_reason=row.failure_reason,
        resolution_note=row.resolution_note,
        trace_parent=row.trace_parent,
        steps=tuple(
            StepRecord(
                name=step.step_name,
                state=step.state,
                attempts=step.attempts,
                compensate_attempts=step.compensate_attempts,
                output=step.output,
                last_error=step.last_error,
                effect_uncertain=step.effect_uncertain,
                delivery=step.delivery,
                started_at=step.started_at,
                finished_at=step.finished_at,
                next_attempt_at=step.next_attempt_at,
                idempotency_name=step.idempotency_name or "",
            )
            for step in sorted(step_rows, key=lambda s: s.position)
        ),
    )


def saga_values(write: SagaWrite) -> dict[str, Any]:
    saga = write.saga
    return {
        "state": saga.state,
        "sequence": saga.sequence,
        "updated_at": saga.updated_at,
        "failure_reason": saga.failure_reason,
        "resolution_note": saga.resolution_note,
        "due_at": write.due_at,
        "owner": None if write.release else write.owner,
        "lease_until": None if write.release else write.lease_until,
    }
