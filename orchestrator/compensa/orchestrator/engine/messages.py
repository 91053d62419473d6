"""A saga and its log entries as the API's messages: what the API shows,
and what replay and the moves to another version read (a SagaHistory)."""

from __future__ import annotations

from google.protobuf import any_pb2

from compensa.orchestrator.engine import machine
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import SagaFlow, StoredEvent
from compensa.v1 import saga_pb2

__all__ = ["event_message", "saga_message"]


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
