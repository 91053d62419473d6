"""What an audit decides: the saga log against a participant's barrier rows.

Pure: given a saga as the log has it, its definition, and the barrier rows a
participant listed (BarrierAuditService), the discrepancies, each naming what
the log says and what the participant says. The runs that fetch both sides
and alert live in auditor.py.

The rules, for a final saga and each of its steps served by the participant
(E: its Execute row, C: its Compensate row; an Execute is applied when E says
succeeded, pending, or settled as succeeded):
  - the log says SUCCEEDED: E must be there (EXECUTE_MISSING) and have
    succeeded with the answer the log recorded (ANSWER_DIFFERS); no
    Compensate may have undone it (COMPENSATE_UNEXPECTED);
  - the log says COMPENSATED: C must be there (COMPENSATE_MISSING); an
    applied E under a C that found nothing to undo ran after its
    compensation (HANGING_EXECUTE);
  - the log never called the step (PENDING), or its Execute failed: an
    applied E is a HANGING_EXECUTE, or SETTLED_NOT_REPORTED when the
    participant settled a Pending step whose outcome never reached the log;
  - a row for a saga or a step the log does not know is an ORPHAN_ROW.
And for any saga: one in flight past all its deadlines (its saga_timeout
before its pivot, step timeouts, retries due, calls in flight) is PAST_DEADLINE; a
step the log still shows waiting for CompleteStep while the participant has
settled it is SETTLED_NOT_REPORTED.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import any_pb2

from compensa.orchestrator.engine.machine import Plan, last_deadline
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.orchestrator.store import AuditFinding
from compensa.v1 import barrier_audit_pb2, definition_pb2, participant_pb2, saga_pb2

__all__ = [
    "ANSWER_DIFFERS",
    "COMPENSATE_MISSING",
    "COMPENSATE_UNEXPECTED",
    "DISCREPANCY_KINDS",
    "EXECUTE_MISSING",
    "HANGING_EXECUTE",
    "ORPHAN_ROW",
    "PAST_DEADLINE",
    "SETTLED_NOT_REPORTED",
    "AuditedSaga",
    "FindingSides",
    "compare_saga",
    "finding_sides",
    "orphan_rows",
    "past_deadline",
]

EXECUTE_MISSING = "EXECUTE_MISSING"
ANSWER_DIFFERS = "ANSWER_DIFFERS"
COMPENSATE_MISSING = "COMPENSATE_MISSING"
COMPENSATE_UNEXPECTED = "COMPENSATE_UNEXPECTED"
HANGING_EXECUTE = "HANGING_EXECUTE"
ORPHAN_ROW = "ORPHAN_ROW"
SETTLED_NOT_REPORTED = "SETTLED_NOT_REPORTED"
PAST_DEADLINE = "PAST_DEADLINE"
#: Every kind, as `compensa audit` documents them.
DISCREPANCY_KINDS = (
    EXECUTE_MISSING, ANSWER_DIFFERS, COMPENSATE_MISSING, COMPENSATE_UNEXPECTED, HANGING_EXECUTE, ORPHAN_ROW,
    SETTLED_NOT_REPORTED, PAST_DEADLINE,
)

_O = barrier_audit_pb2
_EXECUTE = _O.BARRIER_OPERATION_EXECUTE
_COMPENSATE = _O.BARRIER_OPERATION_COMPENSATE
_APPLIED = frozenset({_O.BARRIER_OUTCOME_SUCCEEDED, _O.BARRIER_OUTCOME_PENDING, _O.BARRIER_OUTCOME_SETTLED_SUCCEEDED})
_SETTLED = frozenset({_O.BARRIER_OUTCOME_SETTLED_SUCCEEDED, _O.BARRIER_OUTCOME_SETTLED_FAILED})
_NOTHING_UNDONE = frozenset({_O.BARRIER_OUTCOME_NULL_COMPENSATED, _O.BARRIER_OUTCOME_NOTHING_TO_UNDO})
_ANSWERED_SUCCESS = frozenset({_O.BARRIER_OUTCOME_SUCCEEDED, _O.BARRIER_OUTCOME_SETTLED_SUCCEEDED})


@dataclass(frozen=True)
class AuditedSaga:
    """A saga as the log has it, with its definition (None: no longer known)."""

    saga: records.SagaRecord
    definition: definition_pb2.SagaDefinition | None

    def step_name_of(self, row: barrier_audit_pb2.BarrierRow) -> str:
        """The step a barrier row is of: its name now, when a move to another
        version renamed the step after the row was written."""
        renamed = None if row.step_name in self.step_names else self.saga.step_keyed(row.step_name)
        return renamed.name if renamed is not None else row.step_name

    @property
    def step_names(self) -> frozenset[str]:
        return frozenset(step.name for step in self.saga.steps)

    def steps_of(self, participant: str) -> list[definition_pb2.StepDefinition]:
        """The steps of the definition that `participant` serves."""
        if self.definition is None:
            return []
        return [step for step in self.definition.steps if step.participant == participant]


def _short(digest: bytes) -> str:
    return f"sha256:{digest.hex()[:16]}" if digest else "no answer"


def _outcome(row: barrier_audit_pb2.BarrierRow) -> str:
    name = barrier_audit_pb2.BarrierOutcome.Name(row.outcome).removeprefix("BARRIER_OUTCOME_").lower()
    operation = "Execute" if row.operation == _EXECUTE else "Compensate"
    return f"{operation} row {name} ({_short(row.answer_digest)})"


def _step_state(step: records.StepRecord) -> str:
    return saga_pb2.StepState.Name(step.state).removeprefix("STEP_STATE_")  # type: ignore[arg-type]


def _expected_digest(step: records.StepRecord) -> bytes | None:
    """The digest of the ExecuteResponse the log recorded as a success; None without an output."""
    if step.output is None:
        return None
    response = participant_pb2.ExecuteResponse(
        result=participant_pb2.EXECUTE_RESULT_SUCCEEDED, output=any_pb2.Any.FromString(step.output)
    )
    return hashlib.sha256(response.SerializeToString(deterministic=True)).digest()


_LOG_SAYS = "; the log says: "
_PARTICIPANT_SAYS = "; the participant says: "


def _subject(kind: str, saga_id: str, step_name: str, participant: str) -> str:
    """How a discrepancy's message begins: its kind, and where it is."""
    where = f" step {step_name!r}" if step_name else ""
    at = f" at {participant}" if participant else ""
    return f"{kind}: saga {saga_id}{where}{at}: "


def _finding(
    audited: AuditedSaga, participant: str, address: str, step_name: str, kind: str, what: str, log: str,
    theirs: str,
) -> AuditFinding:
    saga = audited.saga
    subject = _subject(kind, saga.saga_id, step_name, participant)
    return AuditFinding(
        participant=participant, saga_id=saga.saga_id, step_name=step_name, kind=kind,
        message=f"{subject}{what}{_LOG_SAYS}{log}{_PARTICIPANT_SAYS}{theirs}",
        definition_name=saga.definition_name, address=address,
    )


class _Found(Protocol):
    """A discrepancy, found now (AuditFinding) or recorded (RecordedAuditFinding)."""

    @property
    def kind(self) -> str: ...
    @property
    def saga_id(self) -> str: ...
    @property
    def step_name(self) -> str: ...
    @property
    def participant(self) -> str: ...
    @property
    def message(self) -> str: ...


@dataclass(frozen=True)
class FindingSides:
    """A discrepancy's message in its parts: what is wrong, and each side's word."""

    what: str
    log_says: str
    participant_says: str


def finding_sides(found: _Found) -> FindingSides:
    """The parts of a discrepancy's message as the audit writes it (a
    message in another form is all `what`)."""
    head, found_log, rest = found.message.partition(_LOG_SAYS)
    log_says, found_theirs, theirs = rest.rpartition(_PARTICIPANT_SAYS)
    if not found_log or not found_theirs:
        return FindingSides(found.message, "", "")
    return FindingSides(
        head.removeprefix(_subject(found.kind, found.saga_id, found.step_name, found.participant)), log_says, theirs
    )


def compare_saga(
    audited: AuditedSaga, participant: str, address: str, rows: Iterable[barrier_audit_pb2.BarrierRow], *,
    settle_grace_before: float,
) -> list[AuditFinding]:
    """The discrepancies between `audited` and the rows `participant` keeps of it.

    A saga still in flight is compared only for steps settled at the
    participant and still waiting in the log, if the saga has not changed
    since `settle_grace_before` (the participant may be reporting right now)."""
    saga = audited.saga
    by_step: dict[str, dict[int, barrier_audit_pb2.BarrierRow]] = {}
    for row in rows:
        by_step.setdefault(audited.step_name_of(row), {})[row.operation] = row
    findings: list[AuditFinding] = []
    for step_definition in audited.steps_of(participant):
        name = step_definition.name
        try:
            step = saga.step(name)
        except KeyError:
            continue
        kept = by_step.get(name, {})
        execute, compensate = kept.get(_EXECUTE), kept.get(_COMPENSATE)
        log = f"{_step_state(step)}" + (f" ({_short(d)})" if (d := _expected_digest(step)) else "")
        found = _compare_step(saga, step, execute, compensate, settle_grace_before)
        if found is not None:
            kind, what, theirs = found
            findings.append(_finding(audited, participant, address, name, kind, what, log, theirs))
    return findings


def _compare_step(
    saga: records.SagaRecord, step: records.StepRecord, execute: barrier_audit_pb2.BarrierRow | None,
    compensate: barrier_audit_pb2.BarrierRow | None, settle_grace_before: float,
) -> tuple[str, str, str] | None:
    """(kind, what is wrong, the participant's side) of one step, or None when both agree."""
    theirs = "; ".join(_outcome(row) for row in (execute, compensate) if row is not None) or "no rows"
    settled = execute is not None and execute.outcome in _SETTLED
    if not saga.is_final:
        if step.state == records.STEP_WAITING and settled and saga.updated_at < settle_grace_before:
            return SETTLED_NOT_REPORTED, "settled at the participant but never reported; the log still waits", theirs
        return None
    applied = execute is not None and execute.outcome in _APPLIED
    state = step.state
    if state == records.STEP_SUCCEEDED:
        if execute is None:
            return EXECUTE_MISSING, "the log says the step succeeded, but there is no Execute row", theirs
        if execute.outcome not in _APPLIED:
            return ANSWER_DIFFERS, "the log says the step succeeded, the participant did not apply it", theirs
        expected = _expected_digest(step)
        if execute.outcome in _ANSWERED_SUCCESS and expected is not None and execute.answer_digest != expected:
            return ANSWER_DIFFERS, "the participant's answer differs from the one the log recorded", theirs
        if compensate is not None and compensate.outcome == _O.BARRIER_OUTCOME_COMPENSATED:
            return COMPENSATE_UNEXPECTED, "the log says the step succeeded, but the participant undid it", theirs
        return None
    if state == records.STEP_COMPENSATED:
        if compensate is None:
            return COMPENSATE_MISSING, "the log says the step was compensated, but there is no Compensate row", theirs
        if applied and compensate.outcome in _NOTHING_UNDONE:
            return HANGING_EXECUTE, "an Execute applied after its compensation, never undone", theirs
        expected = _expected_digest(step)
        if (
            execute is not None and execute.outcome == _O.BARRIER_OUTCOME_SUCCEEDED and expected is not None
            and execute.answer_digest != expected
        ):
            return ANSWER_DIFFERS, "the participant's answer differs from the one the log recorded", theirs
        return None
    if state in (records.STEP_PENDING, records.STEP_FAILED) and applied:
        if settled:
            return SETTLED_NOT_REPORTED, "settled as succeeded at the participant but never reported", theirs
        never = "never called it" if state == records.STEP_PENDING else "says its Execute failed"
        return HANGING_EXECUTE, f"an applied Execute, never undone, for a step the log {never}", theirs
    return None


def orphan_rows(
    rows: Sequence[barrier_audit_pb2.BarrierRow], known: dict[str, AuditedSaga], participant: str, address: str,
) -> list[AuditFinding]:
    """The rows whose saga the log does not know (not in `known`), or whose
    step its definition does not give to `participant`."""
    findings: list[AuditFinding] = []
    reported: set[tuple[str, str]] = set()
    for row in rows:
        if (row.saga_id, row.step_name) in reported:
            continue
        audited = known.get(row.saga_id)
        if audited is None:
            what, log = "a row for a saga the orchestrator does not know", "no such saga"
            audited = AuditedSaga(
                records.SagaRecord(row.saga_id, "", 0, 0, 0, b"", 0.0, 0.0, ()), None
            )
        elif audited.step_name_of(row) not in {step.name for step in audited.steps_of(participant)}:
            what, log = f"a row for a step {participant} does not serve in this saga", "no such step here"
        else:
            continue
        reported.add((row.saga_id, row.step_name))
        findings.append(
            _finding(audited, participant, address, row.step_name, ORPHAN_ROW, what, log, _outcome(row))
        )
    return findings


def past_deadline(audited: AuditedSaga, now: float, grace: float) -> AuditFinding | None:
    """PAST_DEADLINE for a saga in flight more than `grace` seconds past all its
    deadlines as the engine knows them (machine.last_deadline): its saga_timeout
    before its pivot, its steps' step_timeouts, retries and calls in flight."""
    saga, definition = audited.saga, audited.definition
    if saga.is_final or definition is None:
        return None
    last = last_deadline(Plan.of(definition), saga)
    if last is None or last[0] + grace >= now:
        return None
    deadline, which = last
    return _finding(
        audited, "", "", "", PAST_DEADLINE, "in flight past all its deadlines",
        f"{saga_state_name(saga.state)} {now - deadline:.0f}s after its {which}", "(not asked)",
    )
