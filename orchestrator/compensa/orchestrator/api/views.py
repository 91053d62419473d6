"""Stored records turned into the API's messages."""

from __future__ import annotations

from google.protobuf import any_pb2

from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.auditor import AuditReport
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import AuditFinding, SagaFlow, StoredAlert, StoredEvent
from compensa.v1 import orchestrator_pb2, saga_pb2


def _attempts_made(step: records.StepRecord) -> int:
    """Execute attempts started: the failed ones, plus the one that answered
    (or is in flight) unless the last attempt itself ended the step."""
    if step.started_at is None:
        return 0
    return step.attempts + (0 if step.effect_uncertain else 1)


def saga_message(
    saga: records.SagaRecord, plan: machine.Plan | None = None, flow: SagaFlow | None = None
) -> saga_pb2.Saga:
    """The API view of a saga; `flow` adds its priority and what it waits
    for (a call held back for capacity is no attempt)."""
    waiting = {wait.step_name: wait for wait in flow.waits} if flow is not None else {}
    key_wait = waiting.pop("", None)
    message = saga_pb2.Saga(
        saga_id=saga.saga_id,
        definition_name=saga.definition_name,
        definition_version=saga.definition_version,
        state=saga.state,  # type: ignore[arg-type]
        sequence=saga.sequence,
        input=any_pb2.Any.FromString(saga.input),
        create_time=timestamp(saga.created_at),
        update_time=timestamp(saga.updated_at),
        failure_reason=saga.failure_reason,
        resolution_note=saga.resolution_note,
        waiting_for=key_wait.reason if key_wait is not None and not saga.is_final else "",
        priority=flow.priority if flow is not None else 0,
    )
    for step in saga.steps:
        wait = waiting.get(step.name) if step.state in (records.STEP_RUNNING, records.STEP_COMPENSATING) else None
        view = message.steps.add(
            name=step.name,
            state=step.state,
            attempts=step.attempts if wait is not None and step.state == records.STEP_RUNNING else _attempts_made(step),
            compensate_attempts=step.compensate_attempts + (1 if step.state == records.STEP_COMPENSATED else 0),
            last_error=step.last_error,
            start_time=timestamp(step.started_at),
            finish_time=timestamp(step.finished_at),
            next_attempt_time=timestamp(step.next_attempt_at),
            participant=plan.steps[step.name].participant if plan else "",
            waiting_for=wait.reason if wait is not None else "",
            waiting_since=timestamp(wait.since if wait is not None else None),
        )
        if step.output is not None:
            view.output.CopyFrom(any_pb2.Any.FromString(step.output))
    return message


def event_message(stored: StoredEvent) -> saga_pb2.SagaEvent:
    """The API view of a log entry."""
    event = stored.event
    return saga_pb2.SagaEvent(
        saga_id=stored.saga_id,
        sequence=event.sequence,
        type=event.type,  # type: ignore[arg-type]
        time=timestamp(event.time),
        saga_state=event.saga_state,  # type: ignore[arg-type]
        step_name=event.step_name,
        step_state=event.step_state,  # type: ignore[arg-type]
        attempt=event.attempt,
        message=event.message,
        actor=event.actor,
        definition_name=stored.definition_name,
        position=stored.position,
    )


class EventViews:
    """API views of log events, each built once however many streams send it.

    Keyed by log position, which names one event forever; the oldest views
    are dropped first.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._views: dict[int, saga_pb2.SagaEvent] = {}

    def of(self, stored: StoredEvent) -> saga_pb2.SagaEvent:
        view = self._views.get(stored.position)
        if view is None:
            if len(self._views) >= self._size:
                del self._views[next(iter(self._views))]
            view = self._views[stored.position] = event_message(stored)
        return view


def alert_message(alert: StoredAlert) -> orchestrator_pb2.Alert:
    """The API view of an entry of the alert log."""
    return orchestrator_pb2.Alert(
        position=alert.position, alert_id=alert.alert_id,
        kind=orchestrator_pb2.AlertKind.Value("ALERT_KIND_" + alert.kind), message=alert.message,
        raise_time=timestamp(alert.raised_at), saga_id=alert.saga_id, definition_name=alert.definition_name,
        step_name=alert.step_name, sequence=alert.sequence, event_position=alert.event_position,
        participant=alert.participant, address=alert.address,
    )


def _discrepancy_message(found: AuditFinding) -> orchestrator_pb2.AuditDiscrepancy:
    return orchestrator_pb2.AuditDiscrepancy(
        kind=found.kind, participant=found.participant, saga_id=found.saga_id,
        definition_name=found.definition_name, step_name=found.step_name, message=found.message,
    )


def audit_report_message(report: AuditReport) -> orchestrator_pb2.AuditSagasResponse:
    """The API view of an audit run."""
    return orchestrator_pb2.AuditSagasResponse(
        participants=[
            orchestrator_pb2.ParticipantAudit(
                participant=each.participant, address=each.address, audited=each.audited,
                not_audited_reason=each.reason, sagas=each.sagas, rows=each.rows,
                discrepancies=[_discrepancy_message(found) for found in each.findings],
                audited_clean_through=timestamp(each.clean_through[0] if each.clean_through else None),
                purge_watermark=timestamp(each.purge_before),
            )
            for each in report.participants
        ],
        saga_discrepancies=[_discrepancy_message(found) for found in report.saga_findings],
    )
