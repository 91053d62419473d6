"""The saga state machine: pure functions of (saga, event, now), no I/O.

The engine persists what `decide` returns before it acts on it, and asks
`due_calls` which participant calls to make. Recovery is the same path as
normal running: load the saga, ask `due_calls`. Any step that is RUNNING and
has no stored outcome is called again with the same idempotency key, which the
participant barrier turns into exactly-once effects.

Rules worth knowing:
- A step is compensated when it is compensable and may have taken effect: it
  SUCCEEDED, or it failed in a way that leaves the effect unknown (transient
  errors exhausted, step timeout, cancelled while running). A business failure
  is answered by the participant with nothing applied, so it is not compensated;
  nor is a step none of whose calls ever left the orchestrator (every attempt
  failed to connect): its compensation is logged as skipped, "never delivered".
- Delivery is tracked per step (records.DELIVERY_*) and errs towards "possibly
  delivered": an attempt is committed as SENDING before it is sent, and only
  the driver that committed it may report it never delivered. A SENDING left
  by a crash therefore counts as possibly delivered.
- Compensation runs in reverse dependency order: a step is undone once every
  step that depends on it is settled; independent steps are undone together.
- Once a non-compensable step (a pivot) may have taken effect the saga only goes
  forward: a later failure, or a pivot whose outcome is unknown, ends in FAILED
  with an alert for a person, never in a silent half-done flow.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from compensa.orchestrator.definitions import DefinitionGraph, backoff_seconds, duration_seconds, retry_waited_seconds
from compensa.orchestrator.shared.records import (
    COMPENSATED,
    COMPENSATING,
    DELIVERY_NONE,
    DELIVERY_POSSIBLE,
    DELIVERY_SENDING,
    FAILED,
    RUNNING,
    STEP_COMPENSATED,
    STEP_COMPENSATING,
    STEP_COMPENSATION_FAILED,
    STEP_FAILED,
    STEP_PENDING,
    STEP_RUNNING,
    STEP_SUCCEEDED,
    STEP_WAITING,
    SUCCEEDED,
    E,
    EventType,
    LogEvent,
    SagaRecord,
    StepRecord,
    takeover_event,
)
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.v1 import definition_pb2, saga_pb2

#: The reason of a step that failed because its step_timeout passed.
STEP_TIMED_OUT = "step timed out"
#: The start of the reason of a step that failed after transient errors (the
#: last error follows): its outcome is unknown, unlike a business failure's.
GAVE_UP_AFTER_ERRORS = re.compile(rf"(retries exhausted|{STEP_TIMED_OUT}) after \d+ attempts: ")
#: The start of the error of an attempt that never left the orchestrator.
NEVER_DELIVERED = "never delivered: "

# --- Inputs -----------------------------------------------------------------


@dataclass(frozen=True)
class ExecuteSucceeded:
    step: str
    output: bytes | None


@dataclass(frozen=True)
class ExecuteFailed:
    """A business failure: not retried, nothing was applied."""

    step: str
    reason: str


@dataclass(frozen=True)
class ExecutePending:
    step: str


@dataclass(frozen=True)
class ExecuteErrored:
    """A transient error; the effect may or may not have happened, unless
    `never_delivered`: the call never left the orchestrator (it could not
    connect), as the driver that committed its SENDING knows."""

    step: str
    error: str
    never_delivered: bool = False


@dataclass(frozen=True)
class AttemptsSending:
    """The driver is about to send the first Execute attempts of these steps
    since their last never-delivered one; committed before they are sent."""

    steps: tuple[str, ...]


@dataclass(frozen=True)
class CompensateSucceeded:
    step: str


@dataclass(frozen=True)
class CompensateErrored:
    step: str
    error: str


@dataclass(frozen=True)
class TimerFired:
    """Time passed: retries may be due, deadlines may have expired."""


@dataclass(frozen=True)
class CancelRequested:
    actor: str
    reason: str


@dataclass(frozen=True)
class RetryRequested:
    actor: str
    reason: str


@dataclass(frozen=True)
class ResolveRequested:
    actor: str
    note: str


@dataclass(frozen=True)
class RetryNowRequested:
    """Steps waiting out a retry backoff make their next attempt now."""

    actor: str
    reason: str


#: What a participant's answer to one call becomes.
StepAnswer = (
    ExecuteSucceeded
    | ExecuteFailed
    | ExecutePending
    | ExecuteErrored
    | CompensateSucceeded
    | CompensateErrored
)

Event = (
    StepAnswer
    | AttemptsSending
    | TimerFired
    | CancelRequested
    | RetryRequested
    | ResolveRequested
    | RetryNowRequested
)


class IllegalTransition(Exception):
    """The event is not allowed in the saga's current state."""


# --- Outputs ----------------------------------------------------------------


@dataclass(frozen=True)
class CallExecute:
    step: str
    attempt: int
    timeout: float


@dataclass(frozen=True)
class CallCompensate:
    step: str
    attempt: int
    timeout: float


Call = CallExecute | CallCompensate


@dataclass(frozen=True)
class Transition:
    """The saga after an event, and the log entries that record the change."""

    saga: SagaRecord
    events: tuple[LogEvent, ...]
    changed_steps: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.events)


def taken_over(saga: SagaRecord, transition: Transition, *, by: str, previous: str, why: str, now: float) -> Transition:
    """`transition` (decided on `saga`) preceded by the TAKEN_OVER event of
    `takeover_event`, so that both are written together."""
    first = takeover_event(saga, by=by, previous=previous, why=why, now=now)
    later = tuple(replace(event, sequence=event.sequence + 1) for event in transition.events)
    moved = replace(transition.saga, sequence=transition.saga.sequence + 1)
    return Transition(moved, (first, *later), transition.changed_steps)


# --- The machine ------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A definition prepared for the machine: steps by name and the graph."""

    definition: definition_pb2.SagaDefinition
    steps: Mapping[str, definition_pb2.StepDefinition]
    dependencies: Mapping[str, frozenset[str]]
    dependents: Mapping[str, frozenset[str]]
    ancestors: Mapping[str, frozenset[str]]
    # Topological; ties in definition order.
    order: tuple[str, ...]
    saga_timeout: float | None

    @classmethod
    def of(cls, definition: definition_pb2.SagaDefinition) -> Plan:
        """Indexes a validated, normalized definition (depends_on filled in)."""
        graph = DefinitionGraph.of(definition)
        return cls(
            definition=definition,
            steps={step.name: step for step in definition.steps},
            dependencies=graph.dependencies,
            dependents=graph.dependents,
            ancestors=graph.ancestors,
            order=graph.order,
            saga_timeout=duration_seconds(definition.saga_timeout) if definition.HasField("saga_timeout") else None,
        )

    def compensable(self, name: str) -> bool:
        return self.steps[name].kind in (definition_pb2.STEP_KIND_COMPENSABLE, definition_pb2.STEP_KIND_UNSPECIFIED)


def new_saga(
    plan: Plan, *, saga_id: str, input: bytes, now: float
) -> Transition:
    """A saga just started: its first steps are RUNNING."""
    saga = SagaRecord(
        saga_id=saga_id,
        definition_name=plan.definition.name,
        definition_version=plan.definition.version,
        state=RUNNING,
        sequence=0,
        input=input,
        created_at=now,
        updated_at=now,
        steps=tuple(StepRecord(name=name) for name in plan.order),
    )
    builder = _Builder(plan, saga, now)
    builder.log(E.EVENT_TYPE_SAGA_STARTED)
    builder.advance()
    return builder.result()


def decide(plan: Plan, saga: SagaRecord, event: Event, now: float) -> Transition:
    """Applies `event` to `saga`. Raises IllegalTransition for an operator
    action the state does not allow; stale participant answers (for a step
    that already moved on) change nothing."""
    builder = _Builder(plan, saga, now)
    builder.apply(event)
    builder.advance()
    return builder.result()


def due_calls(plan: Plan, saga: SagaRecord, now: float) -> list[Call]:
    """Participant calls that should be in flight now."""
    calls: list[Call] = []
    for step in saga.steps:
        if step.next_attempt_at is not None and step.next_attempt_at > now:
            continue
        definition = plan.steps[step.name]
        if step.state == STEP_RUNNING and saga.state == RUNNING:
            timeout = duration_seconds(definition.execute_timeout)
            deadline = _step_deadline(plan, step)
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - now))
            calls.append(CallExecute(step.name, step.attempts + 1, timeout))
        elif step.state == STEP_COMPENSATING:
            calls.append(
                CallCompensate(step.name, step.compensate_attempts + 1, duration_seconds(definition.compensate_timeout))
            )
    return calls


def pivot_in_effect(plan: Plan, steps: Iterable[StepRecord]) -> StepRecord | None:
    """The pivot, if it may have taken effect: it succeeded, is in flight or
    waiting, or failed with its outcome unknown. From then on the saga can
    only go forward."""
    for step in steps:
        if plan.steps[step.name].kind != definition_pb2.STEP_KIND_PIVOT:
            continue
        if step.state in (STEP_SUCCEEDED, STEP_WAITING) or (
            step.state == STEP_RUNNING and step.delivery != DELIVERY_NONE
        ) or failed_with_unknown_effect(step):
            return step
    return None


def failed_with_unknown_effect(step: StepRecord) -> bool:
    """FAILED without knowing whether it took effect: its last attempt got no
    answer and some attempt may have reached the participant."""
    return step.state == STEP_FAILED and step.effect_uncertain and step.delivery != DELIVERY_NONE


def never_delivered(step: StepRecord) -> bool:
    """FAILED after attempts none of which left the orchestrator: nothing to undo."""
    return step.state == STEP_FAILED and step.effect_uncertain and step.delivery == DELIVERY_NONE


def executes_to_mark(saga: SagaRecord, calls: Iterable[Call]) -> tuple[str, ...]:
    """The steps among `calls` whose Execute must be committed as SENDING
    (AttemptsSending) before it is sent."""
    return tuple(
        call.step for call in calls
        if isinstance(call, CallExecute) and saga.step(call.step).delivery == DELIVERY_NONE
    )


def newly_sending(before: SagaRecord | None, after: SagaRecord) -> set[str]:
    """Steps `after` has as SENDING that `before` (None: a new saga) did not:
    the attempts the writer of this transition may report never delivered."""
    return {
        step.name for step in after.steps
        if step.delivery == DELIVERY_SENDING and (before is None or before.step(step.name).delivery != DELIVERY_SENDING)
    }


def deadline_at(plan: Plan, saga: SagaRecord) -> float | None:
    """The earliest step or saga timeout still ahead of a RUNNING saga; when
    it passes, TimerFired changes the saga."""
    if saga.state != RUNNING:
        return None
    times: list[float] = []
    for step in saga.steps:
        if step.state in (STEP_RUNNING, STEP_WAITING):
            deadline = _step_deadline(plan, step)
            if deadline is not None:
                times.append(deadline)
    if plan.saga_timeout is not None and pivot_in_effect(plan, saga.steps) is None:
        times.append(saga.created_at + plan.saga_timeout)
    return min(times) if times else None


def wake_at(plan: Plan, saga: SagaRecord) -> float | None:
    """When the saga next needs attention without any answer arriving: a
    retry falls due or a timeout passes."""
    if saga.is_final:
        return None
    times = [
        step.next_attempt_at
        for step in saga.steps
        if step.next_attempt_at is not None and step.state in (STEP_RUNNING, STEP_COMPENSATING)
    ]
    deadline = deadline_at(plan, saga)
    if deadline is not None:
        times.append(deadline)
    return min(times) if times else None


def last_deadline(plan: Plan, saga: SagaRecord) -> tuple[float, str] | None:
    """When every deadline ahead of an unfinished saga will have passed, and
    which is last: its saga_timeout (before its pivot took effect), each step's
    step_timeout, each retry due and each call in flight ending by its timeout;
    at each the engine changes the saga. None for a final saga, or one with
    nothing ahead that ends its wait (a step WAITING without a step_timeout)."""
    if saga.is_final:
        return None
    times: list[tuple[float, str]] = []
    if saga.state == RUNNING and plan.saga_timeout is not None and pivot_in_effect(plan, saga.steps) is None:
        times.append((saga.created_at + plan.saga_timeout, "saga_timeout"))
    for step in saga.steps:
        definition = plan.steps.get(step.name)
        if definition is None:
            continue
        ends: list[tuple[float, str]] = []
        if step.state in (STEP_RUNNING, STEP_WAITING):
            deadline = _step_deadline(plan, step)
            if deadline is not None:
                ends.append((deadline, f"step {step.name!r}'s step_timeout"))
        calling = step.state == STEP_COMPENSATING or (step.state == STEP_RUNNING and saga.state == RUNNING)
        if calling:
            # The call is sent when due, and answered or timed out within its timeout.
            sent_by = max(step.next_attempt_at or saga.updated_at, saga.updated_at)
            timeout = definition.compensate_timeout if step.state == STEP_COMPENSATING else definition.execute_timeout
            what = "retry" if step.next_attempt_at is not None else "call"
            ends.append((sent_by + duration_seconds(timeout), f"step {step.name!r}'s {what} timing out"))
        if ends:
            times.append(min(ends))
    return max(times) if times else None


def _retries_exhausted(policy: definition_pb2.RetryPolicy, attempts: int) -> bool:
    """Whether failed attempt `attempts` is the policy's last: its attempts are
    used up, or the next wait would take the waits past give_up_after."""
    if policy.max_attempts and attempts >= policy.max_attempts:
        return True
    return policy.HasField("give_up_after") and (
        retry_waited_seconds(policy, attempts) > duration_seconds(policy.give_up_after)
    )


def _step_deadline(plan: Plan, step: StepRecord) -> float | None:
    definition = plan.steps[step.name]
    if step.started_at is None or not definition.HasField("step_timeout"):
        return None
    return step.started_at + duration_seconds(definition.step_timeout)


class _Builder:
    """Accumulates one transition: the changed steps and the log entries."""

    def __init__(self, plan: Plan, saga: SagaRecord, now: float) -> None:
        self.plan = plan
        self.now = now
        self.state = saga.state
        self.failure_reason = saga.failure_reason
        self.resolution_note = saga.resolution_note
        self.original = saga
        self.steps = {step.name: step for step in saga.steps}
        self.events: list[LogEvent] = []
        self.touched: dict[str, None] = {}

    # -- bookkeeping

    def log(
        self, type: EventType, step: StepRecord | None = None, *, message: str = "", actor: str = "", attempt: int = 0
    ) -> None:
        self.events.append(
            LogEvent(
                sequence=self.original.sequence + len(self.events) + 1,
                type=type,
                time=self.now,
                saga_state=self.state,
                step_name=step.name if step else "",
                step_state=step.state if step else saga_pb2.STEP_STATE_UNSPECIFIED,
                attempt=attempt,
                message=message,
                actor=actor,
            )
        )

    def set_step(self, step: StepRecord, **changes: object) -> StepRecord:
        updated = dataclasses.replace(step, **changes)  # type: ignore[arg-type]
        self.steps[step.name] = updated
        self.touched[step.name] = None
        return updated

    def result(self) -> Transition:
        if not self.events:
            return Transition(self.original, ())
        saga = replace(
            self.original,
            state=self.state,
            sequence=self.original.sequence + len(self.events),
            updated_at=self.now,
            failure_reason=self.failure_reason,
            resolution_note=self.resolution_note,
            steps=tuple(self.steps[name] for name in self.plan.order),
        )
        return Transition(saga, tuple(self.events), tuple(self.touched))

    def past_pivot(self) -> StepRecord | None:
        return pivot_in_effect(self.plan, self.steps.values())

    # -- events

    def apply(self, event: Event) -> None:
        match event:
            case ExecuteSucceeded(step=name, output=output):
                step = self.steps[name]
                if step.state not in (STEP_RUNNING, STEP_WAITING):
                    return
                step = self.set_step(
                    step, state=STEP_SUCCEEDED, output=output, finished_at=self.now, next_attempt_at=None,
                    effect_uncertain=False, delivery=DELIVERY_POSSIBLE,
                )
                self.log(E.EVENT_TYPE_STEP_SUCCEEDED, step, attempt=step.attempts + 1)
            case ExecutePending(step=name):
                step = self.steps[name]
                if step.state != STEP_RUNNING:
                    return
                if not self.plan.steps[name].long_running:
                    # Nobody could report its outcome (it got no completion
                    # token): a protocol error, retried like a transient one.
                    step = self.set_step(step, delivery=DELIVERY_POSSIBLE)
                    self.execute_errored(step, "answered PENDING but the step is not long_running")
                    return
                step = self.set_step(step, state=STEP_WAITING, next_attempt_at=None, delivery=DELIVERY_POSSIBLE)
                self.log(E.EVENT_TYPE_STEP_WAITING, step, attempt=step.attempts + 1)
            case ExecuteFailed(step=name, reason=reason):
                step = self.steps[name]
                if step.state not in (STEP_RUNNING, STEP_WAITING):
                    return
                step = self.set_step(step, delivery=DELIVERY_POSSIBLE)
                self.fail_step(step, reason, uncertain=False)
            case ExecuteErrored(step=name, error=error, never_delivered=unsent):
                step = self.steps[name]
                if step.state != STEP_RUNNING:
                    return
                # Only the SENDING its driver committed can go back to NONE;
                # anything else (a SENDING left by a crash) may have gone out.
                delivered = DELIVERY_NONE if unsent and step.delivery == DELIVERY_SENDING else DELIVERY_POSSIBLE
                step = self.set_step(step, delivery=delivered)
                self.execute_errored(step, (NEVER_DELIVERED if delivered == DELIVERY_NONE else "") + error)
            case AttemptsSending(steps=names):
                for name in names:
                    step = self.steps[name]
                    if step.state == STEP_RUNNING and step.delivery == DELIVERY_NONE:
                        # Logged: the event moves the sequence that guards every write.
                        step = self.set_step(step, delivery=DELIVERY_SENDING)
                        self.log(E.EVENT_TYPE_STEP_ATTEMPT_SENDING, step, attempt=step.attempts + 1)
            case CompensateSucceeded(step=name):
                step = self.steps[name]
                if step.state != STEP_COMPENSATING:
                    return
                step = self.set_step(step, state=STEP_COMPENSATED, next_attempt_at=None, finished_at=self.now)
                self.log(E.EVENT_TYPE_STEP_COMPENSATED, step, attempt=step.compensate_attempts + 1)
            case CompensateErrored(step=name, error=error):
                step = self.steps[name]
                if step.state != STEP_COMPENSATING:
                    return
                self.compensate_errored(step, error)
            case TimerFired():
                self.expire_deadlines()
            case CancelRequested(actor=actor, reason=reason):
                self.cancel(actor, reason)
            case RetryRequested(actor=actor, reason=reason):
                self.operator_retry(actor, reason)
            case ResolveRequested(actor=actor, note=note):
                self.resolve(actor, note)
            case RetryNowRequested(actor=actor, reason=reason):
                self.skip_backoff(actor, reason)

    def execute_errored(self, step: StepRecord, error: str) -> None:
        definition = self.plan.steps[step.name]
        attempts = step.attempts + 1
        if _retries_exhausted(definition.retry, attempts):
            step = self.set_step(step, attempts=attempts, last_error=error)
            self.fail_step(step, f"retries exhausted after {attempts} attempts: {error}", uncertain=True)
            return
        due = self.now + backoff_seconds(definition.retry, attempts)
        deadline = _step_deadline(self.plan, step)
        if deadline is not None and due >= deadline:
            step = self.set_step(step, attempts=attempts, last_error=error)
            self.fail_step(step, f"{STEP_TIMED_OUT} after {attempts} attempts: {error}", uncertain=True)
            return
        step = self.set_step(step, attempts=attempts, last_error=error, next_attempt_at=due)
        self.log(E.EVENT_TYPE_STEP_RETRY_SCHEDULED, step, attempt=attempts, message=error)
        self.alert_if_due(step, definition.retry, attempts, "execution", error)

    def compensate_errored(self, step: StepRecord, error: str) -> None:
        definition = self.plan.steps[step.name]
        policy = definition.compensate_retry if definition.HasField("compensate_retry") else definition.retry
        attempts = step.compensate_attempts + 1
        if _retries_exhausted(policy, attempts):
            step = self.set_step(
                step, state=STEP_COMPENSATION_FAILED, compensate_attempts=attempts, last_error=error,
                next_attempt_at=None,
            )
            self.log(
                E.EVENT_TYPE_STEP_COMPENSATION_FAILED, step, attempt=attempts,
                message=f"compensation failed after {attempts} attempts: {error}",
            )
            return
        step = self.set_step(
            step, compensate_attempts=attempts, last_error=error,
            next_attempt_at=self.now + backoff_seconds(policy, attempts),
        )
        self.log(E.EVENT_TYPE_STEP_COMPENSATE_RETRY_SCHEDULED, step, attempt=attempts, message=error)
        self.alert_if_due(step, policy, attempts, "compensation", error)

    def alert_if_due(
        self, step: StepRecord, policy: definition_pb2.RetryPolicy, attempts: int, what: str, error: str
    ) -> None:
        """Raises the policy's alert once, at the failed attempt after which
        the waits so far first reach alert_after; retrying goes on."""
        if not policy.HasField("alert_after"):
            return
        threshold = duration_seconds(policy.alert_after)
        waited = retry_waited_seconds(policy, attempts - 1)
        if waited < threshold or retry_waited_seconds(policy, attempts - 2) >= threshold:
            return
        until = (
            f"until it succeeds or {policy.give_up_after.ToJsonString()} of waiting have passed"
            if policy.HasField("give_up_after") else f"up to {policy.max_attempts} attempts"
        )
        self.log(
            E.EVENT_TYPE_ALERT_RAISED, step, attempt=attempts,
            message=f"{what} of step {step.name!r} still failing after {attempts} attempts "
                    f"({waited:.0f}s of waiting): {error}; retrying {until}",
        )

    def fail_step(self, step: StepRecord, reason: str, *, uncertain: bool) -> None:
        step = self.set_step(
            step, state=STEP_FAILED, last_error=reason, effect_uncertain=uncertain, finished_at=self.now,
            next_attempt_at=None,
        )
        self.log(E.EVENT_TYPE_STEP_FAILED, step, attempt=step.attempts if uncertain else step.attempts + 1,
                 message=reason)
        if self.state == RUNNING:
            self.stop_forward(f"step {step.name!r} failed: {reason}")

    def expire_deadlines(self) -> None:
        if self.state != RUNNING:
            return
        # The saga timeout bounds the part that can still be undone; past the
        # pivot only step limits apply, so the flow can finish going forward.
        if (
            self.plan.saga_timeout is not None
            and self.now >= self.original.created_at + self.plan.saga_timeout
            and self.past_pivot() is None
        ):
            self.stop_forward("saga timed out")
            return
        for name in self.plan.order:
            step = self.steps[name]
            deadline = _step_deadline(self.plan, step)
            if step.state in (STEP_RUNNING, STEP_WAITING) and deadline is not None and self.now >= deadline:
                self.fail_step(step, STEP_TIMED_OUT, uncertain=True)
                if self.state != RUNNING:
                    return

    def stop_forward(self, reason: str) -> None:
        """The saga cannot complete: compensate, or fail if past a pivot."""
        self.failure_reason = reason
        pivot = self.past_pivot()
        if pivot is not None:
            self.state = FAILED
            self.log(E.EVENT_TYPE_SAGA_FAILED, message=reason)
            self.log(
                E.EVENT_TYPE_ALERT_RAISED,
                message=f"{reason}; step {pivot.name!r} cannot be undone, so a person must finish or repair the flow",
            )
            return
        self.state = COMPENSATING
        # Steps still running are abandoned; their late answers are ignored,
        # and the participant barrier blocks a late Execute after Compensate.
        for name in self.plan.order:
            step = self.steps[name]
            if step.state in (STEP_RUNNING, STEP_WAITING):
                self.set_step(
                    step, state=STEP_FAILED, effect_uncertain=True, last_error="abandoned: " + reason,
                    next_attempt_at=None, finished_at=self.now,
                )
        self.log(E.EVENT_TYPE_COMPENSATION_STARTED, message=reason)
        for name in reversed(self.plan.order):
            step = self.steps[name]
            if self.plan.compensable(name) and never_delivered(step):
                self.log(
                    E.EVENT_TYPE_STEP_COMPENSATION_SKIPPED, step,
                    message=NEVER_DELIVERED + "no Execute attempt reached the participant, so there is nothing to undo",
                )

    def cancel(self, actor: str, reason: str) -> None:
        if self.state == COMPENSATING or self.state == COMPENSATED:
            return
        if self.state != RUNNING:
            raise IllegalTransition(f"saga is {saga_state_name(self.state)}; only a running saga can be cancelled")
        pivot = self.past_pivot()
        if pivot is not None:
            raise IllegalTransition(
                f"step {pivot.name!r} cannot be undone and has run or is running; the saga can only go forward"
            )
        message = f"cancelled: {reason}" if reason else "cancelled"
        self.log(E.EVENT_TYPE_CANCEL_REQUESTED, message=reason, actor=actor)
        self.stop_forward(message)

    def operator_retry(self, actor: str, reason: str) -> None:
        if self.state != FAILED or self.resolution_note:
            raise IllegalTransition(
                "only a FAILED saga that is not resolved can be retried; this one is "
                + ("resolved" if self.resolution_note else saga_state_name(self.state))
            )
        self.log(E.EVENT_TYPE_OPERATOR_RETRIED, message=reason, actor=actor)
        if any(step.state == STEP_COMPENSATION_FAILED for step in self.steps.values()):
            self.state = COMPENSATING
            for name in self.plan.order:
                step = self.steps[name]
                if step.state == STEP_COMPENSATION_FAILED:
                    self.set_step(step, state=STEP_COMPENSATING, compensate_attempts=0, next_attempt_at=None)
            self.log(E.EVENT_TYPE_COMPENSATION_STARTED, message="operator retry")
            return
        # Failed going forward past a pivot: run the failed steps again.
        self.state = RUNNING
        self.failure_reason = ""
        # A pivot whose outcome was unknown is asked again with the same key,
        # so the participant answers what it did.
        for name in self.plan.order:
            step = self.steps[name]
            if step.state == STEP_FAILED:
                self.set_step(
                    step, state=STEP_RUNNING, attempts=0, next_attempt_at=None, effect_uncertain=False,
                    started_at=self.now,
                )

    def resolve(self, actor: str, note: str) -> None:
        if self.state != FAILED:
            raise IllegalTransition(
                f"saga is {saga_state_name(self.state)}; only a FAILED saga can be resolved by hand"
            )
        if self.resolution_note:
            raise IllegalTransition("saga is already resolved")
        self.resolution_note = note
        self.log(E.EVENT_TYPE_OPERATOR_RESOLVED, message=note, actor=actor)

    def skip_backoff(self, actor: str, reason: str) -> None:
        waiting = [
            step for step in self.steps.values()
            if step.next_attempt_at is not None and step.next_attempt_at > self.now
            and (step.state, self.state) in ((STEP_RUNNING, RUNNING), (STEP_COMPENSATING, COMPENSATING))
        ]
        if not waiting:
            raise IllegalTransition(
                f"saga is {saga_state_name(self.state)} and no step of it waits out a retry backoff;"
                " nothing to retry now"
            )
        for step in waiting:
            self.set_step(step, next_attempt_at=self.now)
        self.log(E.EVENT_TYPE_BACKOFF_SKIPPED, message=reason, actor=actor)

    # -- moving on

    def advance(self) -> None:
        """Starts what can start and finishes what is finished."""
        if self.state == RUNNING:
            self.start_ready_steps()
            if all(step.state == STEP_SUCCEEDED for step in self.steps.values()):
                self.state = SUCCEEDED
                self.log(E.EVENT_TYPE_SAGA_SUCCEEDED)
        if self.state == COMPENSATING:
            self.start_ready_compensations()
            self.finish_compensation()

    def start_ready_steps(self) -> None:
        for name in self.plan.order:
            step = self.steps[name]
            if step.state != STEP_PENDING:
                continue
            if all(self.steps[need].state == STEP_SUCCEEDED for need in self.plan.dependencies[name]):
                # Committed before the first attempt is sent, by the driver that sends it.
                step = self.set_step(step, state=STEP_RUNNING, started_at=self.now, delivery=DELIVERY_SENDING)
                self.log(E.EVENT_TYPE_STEP_STARTED, step, attempt=1)

    def needs_compensation(self, step: StepRecord) -> bool:
        if not self.plan.compensable(step.name):
            return False
        return step.state == STEP_SUCCEEDED or failed_with_unknown_effect(step)

    def settled(self, step: StepRecord) -> bool:
        """Nothing more will happen to this step during compensation."""
        return not self.needs_compensation(step) and step.state != STEP_COMPENSATING

    def start_ready_compensations(self) -> None:
        for name in reversed(self.plan.order):
            step = self.steps[name]
            if not self.needs_compensation(step):
                continue
            if all(self.settled(self.steps[later]) for later in self.plan.dependents[name]):
                step = self.set_step(step, state=STEP_COMPENSATING, next_attempt_at=None)
                self.log(E.EVENT_TYPE_STEP_COMPENSATING, step, attempt=1, message=self.failure_reason)

    def finish_compensation(self) -> None:
        steps: Sequence[StepRecord] = list(self.steps.values())
        if any(step.state == STEP_COMPENSATING or self.needs_compensation(step) for step in steps):
            return
        failed = [step.name for step in steps if step.state == STEP_COMPENSATION_FAILED]
        if failed:
            self.state = FAILED
            message = f"compensation of {', '.join(failed)} failed; a person must act (compensa retry / resolve)"
            self.log(E.EVENT_TYPE_SAGA_FAILED, message=message)
            self.log(E.EVENT_TYPE_ALERT_RAISED, message=message)
            return
        self.state = COMPENSATED
        self.log(E.EVENT_TYPE_SAGA_COMPENSATED, message=self.failure_reason)
