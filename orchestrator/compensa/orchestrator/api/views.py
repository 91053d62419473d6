"""Stored records turned into the API's messages."""

from __future__ import annotations

from compensa.orchestrator.engine.auditor import AuditReport
from compensa.orchestrator.engine.messages import event_message, saga_message
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import AuditFinding, StoredAlert, StoredEvent
from compensa.v1 import orchestrator_pb2, saga_pb2

__all__ = ["EventViews", "alert_message", "audit_report_message", "event_message", "saga_message"]


class EventViews:
    """API views of log events, each built once however many streams send it.

    Keyed by saga and log position, which name one event forever (a position
    alone does not once sagas are partitioned over databases, each with its
    own log); the oldest views are dropped first.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._views: dict[tuple[str, int], saga_pb2.SagaEvent] = {}

    def of(self, stored: StoredEvent) -> saga_pb2.SagaEvent:
        key = (stored.saga_id, stored.position)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self._size:
                del self._views[next(iter(self._views))]
            view = self._views[key] = event_message(stored)
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
