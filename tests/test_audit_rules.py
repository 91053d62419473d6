"""The audit's rules (orchestrator.audit), on sagas and rows built by hand:
what each pair of log and barrier rows is called, and that agreeing ones are not."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from compensa.orchestrator.engine.audit import (
    AuditedSaga,
    FindingSides,
    compare_saga,
    finding_sides,
    orphan_rows,
    past_deadline,
)
from compensa.orchestrator.shared import records
from compensa.v1 import barrier_audit_pb2 as B
from compensa.v1 import definition_pb2, participant_pb2

T0 = 1_700_000_000.0
DEFINITION = definition_pb2.SagaDefinition(
    name="trip", version=1, steps=[
        definition_pb2.StepDefinition(name="book", participant="hotel"),
        definition_pb2.StepDefinition(name="pay", participant="bank"),
    ],
    saga_timeout=duration_pb2.Duration(seconds=60),
)
OUTPUT = any_pb2.Any()
OUTPUT.Pack(wrappers_pb2.StringValue(value="room 12"))


def _saga(state: int, book: int, *, output: bytes | None = None) -> AuditedSaga:
    steps = (records.StepRecord("book", state=book, output=output), records.StepRecord("pay"))
    return AuditedSaga(records.SagaRecord("s1", "trip", 1, state, 9, b"", T0, T0 + 5, steps), DEFINITION)


def _row(operation: int, outcome: int, answer: bytes = b"x", step: str = "book", saga: str = "s1") -> B.BarrierRow:
    return B.BarrierRow(
        saga_id=saga, step_name=step, idempotency_key=f"{saga}/{step}", operation=operation, outcome=outcome,
        answer_digest=hashlib.sha256(answer).digest(),
    )


def _succeeded_answer() -> bytes:
    return participant_pb2.ExecuteResponse(
        result=participant_pb2.EXECUTE_RESULT_SUCCEEDED, output=OUTPUT
    ).SerializeToString(deterministic=True)


def _kinds(audited: AuditedSaga, *rows: B.BarrierRow) -> list[str]:
    return [f.kind for f in compare_saga(audited, "hotel", "h:1", rows, settle_grace_before=T0 + 100)]


EXECUTE, COMPENSATE = B.BARRIER_OPERATION_EXECUTE, B.BARRIER_OPERATION_COMPENSATE


def test_agreeing_rows_are_not_reported() -> None:
    succeeded = _saga(records.SUCCEEDED, records.STEP_SUCCEEDED, output=OUTPUT.SerializeToString())
    assert _kinds(succeeded, _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED, _succeeded_answer())) == []
    compensated = _saga(records.COMPENSATED, records.STEP_COMPENSATED)
    assert _kinds(
        compensated, _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED), _row(COMPENSATE, B.BARRIER_OUTCOME_COMPENSATED)
    ) == []
    assert _kinds(
        compensated, _row(EXECUTE, B.BARRIER_OUTCOME_NULL_COMPENSATED),
        _row(COMPENSATE, B.BARRIER_OUTCOME_NULL_COMPENSATED),
    ) == []
    assert _kinds(_saga(records.COMPENSATED, records.STEP_PENDING)) == []
    assert _kinds(_saga(records.COMPENSATED, records.STEP_FAILED), _row(EXECUTE, B.BARRIER_OUTCOME_FAILED)) == []
    # A saga in flight is not compared (its calls may be under way).
    assert _kinds(_saga(records.RUNNING, records.STEP_RUNNING)) == []


def test_each_disagreement_has_its_kind() -> None:
    succeeded = _saga(records.SUCCEEDED, records.STEP_SUCCEEDED, output=OUTPUT.SerializeToString())
    assert _kinds(succeeded) == ["EXECUTE_MISSING"]
    assert _kinds(succeeded, _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED, b"other")) == ["ANSWER_DIFFERS"]
    assert _kinds(succeeded, _row(EXECUTE, B.BARRIER_OUTCOME_FAILED)) == ["ANSWER_DIFFERS"]
    assert _kinds(
        succeeded, _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED, _succeeded_answer()),
        _row(COMPENSATE, B.BARRIER_OUTCOME_COMPENSATED),
    ) == ["COMPENSATE_UNEXPECTED"]
    compensated = _saga(records.COMPENSATED, records.STEP_COMPENSATED)
    assert _kinds(compensated, _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED)) == ["COMPENSATE_MISSING"]
    # Applied after its (null) compensation.
    assert _kinds(
        compensated, _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED), _row(COMPENSATE, B.BARRIER_OUTCOME_NULL_COMPENSATED)
    ) == ["HANGING_EXECUTE"]
    assert _kinds(_saga(records.COMPENSATED, records.STEP_PENDING), _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED)) == [
        "HANGING_EXECUTE"
    ]
    assert _kinds(_saga(records.COMPENSATED, records.STEP_FAILED), _row(EXECUTE, B.BARRIER_OUTCOME_PENDING)) == [
        "HANGING_EXECUTE"
    ]
    assert _kinds(
        _saga(records.COMPENSATED, records.STEP_FAILED), _row(EXECUTE, B.BARRIER_OUTCOME_SETTLED_SUCCEEDED)
    ) == ["SETTLED_NOT_REPORTED"]
    waiting = _saga(records.RUNNING, records.STEP_WAITING)
    assert _kinds(waiting, _row(EXECUTE, B.BARRIER_OUTCOME_SETTLED_SUCCEEDED)) == ["SETTLED_NOT_REPORTED"]
    # Within the grace the participant may be reporting right now.
    recent = compare_saga(
        waiting, "hotel", "h:1", [_row(EXECUTE, B.BARRIER_OUTCOME_SETTLED_SUCCEEDED)], settle_grace_before=T0
    )
    assert recent == []


def test_orphans_are_rows_of_unknown_sagas_or_of_steps_another_participant_serves() -> None:
    known = {"s1": _saga(records.SUCCEEDED, records.STEP_SUCCEEDED)}
    rows = [
        _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED),
        _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED, step="pay"),
        _row(EXECUTE, B.BARRIER_OUTCOME_SUCCEEDED, saga="ghost"),
        _row(COMPENSATE, B.BARRIER_OUTCOME_NULL_COMPENSATED, saga="ghost"),
    ]
    found = orphan_rows(rows, known, "hotel", "h:1")
    assert [(f.kind, f.saga_id, f.step_name) for f in found] == [
        ("ORPHAN_ROW", "s1", "pay"), ("ORPHAN_ROW", "ghost", "book"),
    ]
    assert "the log says: no such saga" in found[1].message


def test_a_saga_in_flight_past_its_saga_timeout_is_past_deadline() -> None:
    running = _saga(records.RUNNING, records.STEP_RUNNING)
    assert past_deadline(running, T0 + 60 + 30, grace=60) is None
    late = past_deadline(running, T0 + 60 + 61, grace=60)
    assert late is not None and late.kind == "PAST_DEADLINE" and late.participant == ""
    assert "the log says: RUNNING 61s after its saga_timeout" in late.message
    assert past_deadline(_saga(records.SUCCEEDED, records.STEP_SUCCEEDED), T0 + 1000, grace=60) is None


def _trip(*steps: definition_pb2.StepDefinition, saga_timeout: int | None = None) -> definition_pb2.SagaDefinition:
    definition = definition_pb2.SagaDefinition(name="trip", version=1, steps=steps)
    if saga_timeout is not None:
        definition.saga_timeout.FromSeconds(saga_timeout)
    return definition


def _step(name: str, kind: int = definition_pb2.STEP_KIND_COMPENSABLE, step_timeout: int | None = None) -> (
    definition_pb2.StepDefinition
):
    step = definition_pb2.StepDefinition(
        name=name, participant="hotel", kind=kind, execute_timeout=duration_pb2.Duration(seconds=10),
        compensate_timeout=duration_pb2.Duration(seconds=10),
    )
    if step_timeout is not None:
        step.step_timeout.FromSeconds(step_timeout)
    return step


def test_past_its_pivot_the_saga_timeout_no_longer_applies() -> None:
    definition = _trip(
        _step("book", definition_pb2.STEP_KIND_PIVOT), _step("pay", definition_pb2.STEP_KIND_RETRIABLE),
        saga_timeout=60,
    )
    # The pivot took effect; pay retries (forever, a retriable step), its next attempt due at T0 + 500.
    steps = (
        records.StepRecord("book", state=records.STEP_SUCCEEDED),
        records.StepRecord("pay", state=records.STEP_RUNNING, attempts=7, next_attempt_at=T0 + 500),
    )
    saga = records.SagaRecord("s1", "trip", 1, records.RUNNING, 9, b"", T0, T0 + 100, steps)
    going_on = AuditedSaga(saga, definition)
    assert past_deadline(going_on, T0 + 400, grace=60) is None
    # Its retry due and its call's timeout (10s) passed, by more than the grace: the engine stopped driving it.
    assert past_deadline(going_on, T0 + 500 + 10 + 59, grace=60) is None
    late = past_deadline(going_on, T0 + 500 + 10 + 61, grace=60)
    assert late is not None and "RUNNING 61s after its step 'pay''s retry timing out" in late.message, late


def test_without_a_saga_timeout_a_saga_past_its_step_timeouts_is_past_deadline() -> None:
    definition = _trip(_step("book", step_timeout=30), _step("pay"))
    steps = (
        records.StepRecord("book", state=records.STEP_WAITING, started_at=T0, next_attempt_at=T0 + 30),
        records.StepRecord("pay"),
    )
    waiting = AuditedSaga(records.SagaRecord("s1", "trip", 1, records.RUNNING, 9, b"", T0, T0 + 1, steps), definition)
    assert past_deadline(waiting, T0 + 30 + 59, grace=60) is None
    late = past_deadline(waiting, T0 + 30 + 61, grace=60)
    assert late is not None and "RUNNING 61s after its step 'book''s step_timeout" in late.message, late
    # A step that waits without a step_timeout has no deadline to be past.
    forever = replace(waiting, definition=_trip(_step("book"), _step("pay")))
    assert past_deadline(forever, T0 + 100_000, grace=60) is None


def test_a_message_splits_into_what_is_wrong_and_each_sides_word() -> None:
    (missing,) = compare_saga(
        _saga(records.SUCCEEDED, records.STEP_SUCCEEDED, output=OUTPUT.SerializeToString()), "hotel", "h:1", [],
        settle_grace_before=T0 + 100,
    )
    sides = finding_sides(missing)
    assert sides.what and "s1" not in sides.what and "EXECUTE_MISSING" not in sides.what
    assert sides.log_says.startswith("SUCCEEDED (sha256:") and sides.participant_says == "no rows"
    assert missing.message.endswith(f"{sides.what}; the log says: {sides.log_says}; the participant says: no rows")
    late = past_deadline(_saga(records.RUNNING, records.STEP_RUNNING), T0 + 200, grace=60)
    assert late is not None and finding_sides(late).log_says.startswith("RUNNING")
    assert finding_sides(replace(missing, message="written by hand")) == FindingSides("written by hand", "", "")
