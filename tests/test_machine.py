"""The saga state machine, table-driven: every transition, no database, no network.

Time is explicit: every call passes `now`, so backoffs, step timeouts and saga
timeouts are exact numbers here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
from google.protobuf import duration_pb2

import compensa.checkout.v1.checkout_pb2  # noqa: F401  (registers the input_type the definitions name)
from compensa.examples import DEFINITIONS_DIR
from compensa.orchestrator.definitions import load_definition_file, validate_definition
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.machine import (
    Call,
    CallCompensate,
    CallExecute,
    CancelRequested,
    CompensateErrored,
    CompensateSucceeded,
    Event,
    ExecuteErrored,
    ExecuteFailed,
    ExecutePending,
    ExecuteSucceeded,
    IllegalTransition,
    Plan,
    ResolveRequested,
    RetryRequested,
    TimerFired,
    Transition,
)
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.records import SagaRecord
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.v1 import definition_pb2, saga_pb2

S = saga_pb2
D = definition_pb2
DEFINITIONS = DEFINITIONS_DIR
T0 = 1_000.0

COMPENSABLE = D.STEP_KIND_COMPENSABLE
PIVOT = D.STEP_KIND_PIVOT
RETRIABLE = D.STEP_KIND_RETRIABLE


# --- building definitions -----------------------------------------------------


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def _policy(max_attempts: int, initial: float = 1.0, multiplier: float = 2.0, maximum: float = 10.0) -> D.RetryPolicy:
    return D.RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=_seconds(initial),
        backoff_multiplier=multiplier,
        max_backoff=_seconds(maximum),
    )


def _step(
    name: str,
    *,
    kind: int = COMPENSABLE,
    depends_on: Sequence[str] = (),
    independent: bool = False,
    retry: D.RetryPolicy | None = None,
    compensate_retry: D.RetryPolicy | None = None,
    step_timeout: float | None = None,
    long_running: bool = False,
) -> D.StepDefinition:
    step = D.StepDefinition(
        name=name,
        participant=f"{name}-service",
        kind=kind,  # type: ignore[arg-type]
        depends_on=list(depends_on),
        independent=independent,
        long_running=long_running,
        retry=retry or _policy(3),
        compensate_retry=compensate_retry or _policy(3, initial=2.0),
    )
    if step_timeout is not None:
        step.step_timeout.CopyFrom(_seconds(step_timeout))
    return step


def _plan(*steps: D.StepDefinition, saga_timeout: float | None = None) -> Plan:
    definition = D.SagaDefinition(name="test", input_type="compensa.checkout.v1.CheckoutInput", steps=list(steps))
    if saga_timeout is not None:
        definition.saga_timeout.CopyFrom(_seconds(saga_timeout))
    return Plan.of(validate_definition(definition))


def _file_plan(file_name: str) -> Plan:
    return Plan.of(load_definition_file(DEFINITIONS / file_name))


def _chain(*names: str, **options: object) -> Plan:
    return _plan(*(_step(name, **options) for name in names))  # type: ignore[arg-type]


# --- driving the machine --------------------------------------------------------


@dataclass
class Run:
    """One saga driven through the machine; checks the log after every change."""

    plan: Plan
    saga: SagaRecord
    log: list[records.LogEvent] = field(default_factory=list)

    @classmethod
    def start(cls, plan: Plan, now: float = T0) -> Run:
        transition = machine.new_saga(plan, saga_id="saga-1", input=b"input", now=now)
        run = cls(plan, replace(transition.saga, sequence=0))
        run._record(transition)
        return run

    def send(self, event: Event, now: float) -> Transition:
        transition = machine.decide(self.plan, self.saga, event, now)
        self._record(transition)
        return transition

    def _record(self, transition: Transition) -> None:
        before = self.saga.sequence
        if not transition.changed:
            assert transition.saga == self.saga
            assert transition.changed_steps == ()
        sequences = [event.sequence for event in transition.events]
        assert sequences == list(range(before + 1, before + 1 + len(sequences)))
        assert transition.saga.sequence == before + len(sequences)
        self.saga = transition.saga
        self.log.extend(transition.events)

    def state(self, step: str) -> int:
        return self.saga.step(step).state

    def states(self) -> dict[str, int]:
        return {step.name: step.state for step in self.saga.steps}

    def calls(self, now: float) -> list[machine.Call]:
        return machine.due_calls(self.plan, self.saga, now)


def _types(transition: Transition) -> list[tuple[int, str]]:
    return [(event.type, event.step_name) for event in transition.events]


# --- start and success -------------------------------------------------------------


def test_start_runs_the_first_step_and_logs_from_sequence_one() -> None:
    plan = _chain("a", "b", "c")
    transition = machine.new_saga(plan, saga_id="s", input=b"x", now=T0)
    saga = transition.saga
    assert saga.state == records.RUNNING
    assert [(s.name, s.state) for s in saga.steps] == [
        ("a", S.STEP_STATE_RUNNING), ("b", S.STEP_STATE_PENDING), ("c", S.STEP_STATE_PENDING)
    ]
    assert saga.step("a").started_at == T0
    assert _types(transition) == [(S.EVENT_TYPE_SAGA_STARTED, ""), (S.EVENT_TYPE_STEP_STARTED, "a")]
    assert [event.sequence for event in transition.events] == [1, 2]
    assert saga.sequence == 2
    assert transition.changed_steps == ("a",)
    assert machine.due_calls(plan, saga, T0) == [CallExecute("a", 1, 10.0)]


def test_parallel_definition_starts_both_independent_steps() -> None:
    plan = _file_plan("checkout-parallel.yaml")
    run = Run.start(plan)
    assert run.states() == {
        "reserve_stock": S.STEP_STATE_RUNNING,
        "fraud_check": S.STEP_STATE_RUNNING,
        "charge_card": S.STEP_STATE_PENDING,
        "ship_order": S.STEP_STATE_PENDING,
    }
    assert [(e.type, e.step_name, e.sequence) for e in run.log] == [
        (S.EVENT_TYPE_SAGA_STARTED, "", 1),
        (S.EVENT_TYPE_STEP_STARTED, "reserve_stock", 2),
        (S.EVENT_TYPE_STEP_STARTED, "fraud_check", 3),
    ]
    assert {call.step for call in run.calls(T0)} == {"reserve_stock", "fraud_check"}
    # charge_card waits for both.
    run.send(ExecuteSucceeded("reserve_stock", b"r"), T0 + 1)
    assert run.state("charge_card") == S.STEP_STATE_PENDING
    run.send(ExecuteSucceeded("fraud_check", b"f"), T0 + 2)
    assert run.state("charge_card") == S.STEP_STATE_RUNNING


def test_success_chain_ends_succeeded_with_a_contiguous_log() -> None:
    run = Run.start(_file_plan("checkout.yaml"))
    now = T0
    while not run.saga.is_final:
        (call,) = run.calls(now)
        assert isinstance(call, CallExecute) and call.attempt == 1
        now += 1
        run.send(ExecuteSucceeded(call.step, call.step.encode()), now)
    assert run.saga.state == records.SUCCEEDED
    assert all(step.state == S.STEP_STATE_SUCCEEDED for step in run.saga.steps)
    assert run.saga.step("charge_card").output == b"charge_card"
    assert [e.sequence for e in run.log] == list(range(1, len(run.log) + 1))
    assert run.saga.sequence == run.log[-1].sequence
    assert run.log[-1].type == S.EVENT_TYPE_SAGA_SUCCEEDED
    assert run.calls(now + 100) == []
    assert machine.wake_at(run.plan, run.saga) is None
    assert machine.deadline_at(run.plan, run.saga) is None


# --- transient errors ----------------------------------------------------------------


def test_transient_error_schedules_a_retry_after_the_backoff() -> None:
    run = Run.start(_plan(_step("a", retry=_policy(4, initial=1.0, multiplier=2.0, maximum=3.0))))
    transition = run.send(ExecuteErrored("a", "UNAVAILABLE"), T0 + 5)
    assert _types(transition) == [(S.EVENT_TYPE_STEP_RETRY_SCHEDULED, "a")]
    assert transition.events[0].attempt == 1
    step = run.saga.step("a")
    assert (step.state, step.attempts, step.next_attempt_at) == (S.STEP_STATE_RUNNING, 1, T0 + 6)
    assert step.last_error == "UNAVAILABLE"
    assert run.calls(T0 + 5.999) == []
    assert machine.wake_at(run.plan, run.saga) == T0 + 6
    assert run.calls(T0 + 6) == [CallExecute("a", 2, 10.0)]
    run.send(ExecuteErrored("a", "UNAVAILABLE"), T0 + 6)
    assert run.saga.step("a").next_attempt_at == T0 + 8  # 1s * 2
    run.send(ExecuteErrored("a", "UNAVAILABLE"), T0 + 8)
    assert run.saga.step("a").next_attempt_at == T0 + 11  # 4s capped at 3s
    assert run.calls(T0 + 11) == [CallExecute("a", 4, 10.0)]


def test_exhausted_retries_fail_the_step_as_uncertain_and_compensate_it() -> None:
    run = Run.start(_plan(_step("a"), _step("b", retry=_policy(2))))
    run.send(ExecuteSucceeded("a", b"a"), T0 + 1)
    run.send(ExecuteErrored("b", "DEADLINE_EXCEEDED"), T0 + 2)
    transition = run.send(ExecuteErrored("b", "DEADLINE_EXCEEDED"), T0 + 3)
    assert _types(transition) == [
        (S.EVENT_TYPE_STEP_FAILED, "b"),
        (S.EVENT_TYPE_COMPENSATION_STARTED, ""),
        (S.EVENT_TYPE_STEP_COMPENSATING, "b"),
    ]
    assert run.saga.state == records.COMPENSATING
    assert run.saga.step("b").effect_uncertain
    assert "retries exhausted after 2 attempts" in run.saga.step("b").last_error
    # b may have taken effect, so it is undone first; a waits for it.
    assert run.states() == {"a": S.STEP_STATE_SUCCEEDED, "b": S.STEP_STATE_COMPENSATING}
    assert run.calls(T0 + 3) == [CallCompensate("b", 1, 10.0)]


def test_a_step_never_delivered_is_not_compensated_and_its_skip_is_logged() -> None:
    run = Run.start(_plan(_step("a"), _step("b", retry=_policy(2))))
    run.send(ExecuteSucceeded("a", b"a"), T0 + 1)
    assert run.saga.step("b").delivery == records.DELIVERY_SENDING  # committed before the first send
    run.send(ExecuteErrored("b", "UNAVAILABLE: refused", never_delivered=True), T0 + 2)
    assert run.saga.step("b").delivery == records.DELIVERY_NONE
    assert machine.executes_to_mark(run.saga, run.calls(T0 + 10)) == ("b",)
    marked = run.send(machine.AttemptsSending(("b",)), T0 + 10)
    assert _types(marked) == [(S.EVENT_TYPE_STEP_ATTEMPT_SENDING, "b")]
    transition = run.send(ExecuteErrored("b", "UNAVAILABLE: refused", never_delivered=True), T0 + 11)
    assert _types(transition) == [
        (S.EVENT_TYPE_STEP_FAILED, "b"),
        (S.EVENT_TYPE_COMPENSATION_STARTED, ""),
        (S.EVENT_TYPE_STEP_COMPENSATION_SKIPPED, "b"),
        (S.EVENT_TYPE_STEP_COMPENSATING, "a"),
    ]
    assert "never delivered" in transition.events[2].message
    assert run.states() == {"a": S.STEP_STATE_COMPENSATING, "b": S.STEP_STATE_FAILED}


@pytest.mark.parametrize("first_never_delivered", [True, False])
def test_a_step_any_of_whose_attempts_may_have_arrived_is_compensated(first_never_delivered: bool) -> None:
    """Once an attempt may have reached the participant, later refused
    connections do not make the step "never delivered"."""
    run = Run.start(_plan(_step("a", retry=_policy(3))))
    run.send(ExecuteErrored("a", "UNAVAILABLE: refused", never_delivered=first_never_delivered), T0 + 1)
    if first_never_delivered:
        run.send(machine.AttemptsSending(("a",)), T0 + 5)
    run.send(ExecuteErrored("a", "DEADLINE_EXCEEDED"), T0 + 6)
    assert run.saga.step("a").delivery == records.DELIVERY_POSSIBLE
    assert machine.executes_to_mark(run.saga, run.calls(T0 + 20)) == ()
    run.send(ExecuteErrored("a", "UNAVAILABLE: refused", never_delivered=True), T0 + 20)
    assert run.states() == {"a": S.STEP_STATE_COMPENSATING}


def test_a_sending_step_answered_without_knowing_counts_as_possibly_delivered() -> None:
    """A SENDING left by a crash: the driver that took over does not know
    whether the first send went out, so it reports no never-delivered."""
    run = Run.start(_plan(_step("a", retry=_policy(1))))
    run.send(ExecuteErrored("a", "UNAVAILABLE: refused", never_delivered=False), T0 + 1)
    assert run.states() == {"a": S.STEP_STATE_COMPENSATING}


def test_business_failure_is_not_compensated() -> None:
    run = Run.start(_chain("a", "b"))
    run.send(ExecuteSucceeded("a", b"a"), T0 + 1)
    transition = run.send(ExecuteFailed("b", "card declined"), T0 + 2)
    assert _types(transition) == [
        (S.EVENT_TYPE_STEP_FAILED, "b"),
        (S.EVENT_TYPE_COMPENSATION_STARTED, ""),
        (S.EVENT_TYPE_STEP_COMPENSATING, "a"),
    ]
    step = run.saga.step("b")
    assert (step.state, step.effect_uncertain) == (S.STEP_STATE_FAILED, False)
    assert run.saga.failure_reason == "step 'b' failed: card declined"
    run.send(CompensateSucceeded("a"), T0 + 3)
    assert run.saga.state == records.COMPENSATED
    assert run.state("b") == S.STEP_STATE_FAILED  # never compensated


# --- compensation order and retries ---------------------------------------------------


def test_compensation_runs_in_reverse_order_of_a_chain() -> None:
    run = Run.start(_chain("a", "b", "c", "d"))
    for index, name in enumerate("abc"):
        run.send(ExecuteSucceeded(name, None), T0 + index)
    run.send(ExecuteFailed("d", "no"), T0 + 10)
    undone: list[str] = []
    now = T0 + 10
    while run.saga.state == records.COMPENSATING:
        calls = run.calls(now)
        assert len(calls) == 1 and isinstance(calls[0], CallCompensate)
        undone.append(calls[0].step)
        now += 1
        run.send(CompensateSucceeded(calls[0].step), now)
    assert undone == ["c", "b", "a"]
    assert run.saga.state == records.COMPENSATED
    assert run.log[-1].type == S.EVENT_TYPE_SAGA_COMPENSATED
    assert run.log[-1].message == "step 'd' failed: no"
    assert [s.state for s in run.saga.steps] == [S.STEP_STATE_COMPENSATED] * 3 + [S.STEP_STATE_FAILED]
    assert machine.wake_at(run.plan, run.saga) is None


def test_independent_compensations_start_together() -> None:
    run = Run.start(_file_plan("checkout-parallel.yaml"))
    run.send(ExecuteSucceeded("reserve_stock", b"r"), T0 + 1)
    run.send(ExecuteSucceeded("fraud_check", b"f"), T0 + 1)
    transition = run.send(ExecuteFailed("charge_card", "declined"), T0 + 2)
    compensating = {e.step_name for e in transition.events if e.type == S.EVENT_TYPE_STEP_COMPENSATING}
    assert compensating == {"reserve_stock", "fraud_check"}
    assert {c.step for c in run.calls(T0 + 2)} == {"reserve_stock", "fraud_check"}
    run.send(CompensateSucceeded("fraud_check"), T0 + 3)
    assert run.saga.state == records.COMPENSATING
    run.send(CompensateSucceeded("reserve_stock"), T0 + 4)
    assert run.saga.state == records.COMPENSATED


def test_parallel_branch_is_abandoned_and_compensated_when_the_other_fails() -> None:
    run = Run.start(_file_plan("checkout-parallel.yaml"))
    transition = run.send(ExecuteFailed("fraud_check", "fraud"), T0 + 1)
    step = run.saga.step("reserve_stock")
    # reserve_stock was in flight: it may have reserved, so it is undone.
    assert step.effect_uncertain and step.last_error.startswith("abandoned: ")
    assert run.state("reserve_stock") == S.STEP_STATE_COMPENSATING
    assert run.state("fraud_check") == S.STEP_STATE_FAILED
    assert set(transition.changed_steps) == {"reserve_stock", "fraud_check"}


def test_compensate_errors_are_retried_by_compensate_retry_then_fail_the_saga_with_an_alert() -> None:
    run = Run.start(_plan(
        _step("a", retry=_policy(2, initial=1.0), compensate_retry=_policy(3, initial=5.0, multiplier=3.0, maximum=60)),
        _step("b"),
    ))
    run.send(ExecuteSucceeded("a", None), T0)
    run.send(ExecuteFailed("b", "no"), T0 + 1)
    transition = run.send(CompensateErrored("a", "UNAVAILABLE"), T0 + 2)
    assert _types(transition) == [(S.EVENT_TYPE_STEP_COMPENSATE_RETRY_SCHEDULED, "a")]
    step = run.saga.step("a")
    assert (step.state, step.compensate_attempts, step.next_attempt_at) == (S.STEP_STATE_COMPENSATING, 1, T0 + 7)
    assert run.calls(T0 + 6.9) == []
    assert machine.wake_at(run.plan, run.saga) == T0 + 7
    assert run.calls(T0 + 7) == [CallCompensate("a", 2, 10.0)]
    run.send(CompensateErrored("a", "UNAVAILABLE"), T0 + 7)
    assert run.saga.step("a").next_attempt_at == T0 + 22  # 5s * 3
    transition = run.send(CompensateErrored("a", "UNAVAILABLE"), T0 + 22)
    assert _types(transition) == [
        (S.EVENT_TYPE_STEP_COMPENSATION_FAILED, "a"),
        (S.EVENT_TYPE_SAGA_FAILED, ""),
        (S.EVENT_TYPE_ALERT_RAISED, ""),
    ]
    assert run.saga.state == records.FAILED
    assert run.state("a") == S.STEP_STATE_COMPENSATION_FAILED
    assert run.saga.step("a").compensate_attempts == 3
    assert run.calls(T0 + 1_000) == []
    assert machine.wake_at(run.plan, run.saga) is None


def test_a_compensation_bounded_by_time_alerts_at_its_threshold_and_retries_on_to_compensated() -> None:
    policy = _policy(0, initial=1.0, multiplier=2.0, maximum=8.0)
    policy.alert_after.CopyFrom(_seconds(20))
    policy.give_up_after.CopyFrom(_seconds(3600))
    run = Run.start(_plan(_step("a", compensate_retry=policy), _step("b")))
    run.send(ExecuteSucceeded("a", None), T0)
    run.send(ExecuteFailed("b", "no"), T0)
    now = T0
    alerts: list[int] = []
    # Waits 1, 2, 4, 8, 8, ...: 15s waited after 4 failures, 23s after 5.
    for attempt in range(1, 51):
        transition = run.send(CompensateErrored("a", "UNAVAILABLE: connection refused"), now)
        alerts += [event.attempt for event in transition.events if event.type == S.EVENT_TYPE_ALERT_RAISED]
        assert run.saga.state == records.COMPENSATING, attempt
        step = run.saga.step("a")
        assert step.next_attempt_at is not None
        now = step.next_attempt_at
    # Once, when the waits passed alert_after; the saga keeps compensating.
    assert alerts == [6]
    alert = next(event for event in run.log if event.type == S.EVENT_TYPE_ALERT_RAISED)
    assert alert.step_name == "a" and "still failing after 6 attempts" in alert.message
    assert "UNAVAILABLE: connection refused" in alert.message
    # The participant is back: the saga ends on its own.
    run.send(CompensateSucceeded("a"), now)
    assert run.saga.state == records.COMPENSATED


def test_a_compensation_gives_up_once_its_waits_would_pass_give_up_after() -> None:
    policy = _policy(0, initial=10.0, multiplier=1.0, maximum=10.0)
    policy.give_up_after.CopyFrom(_seconds(35))
    run = Run.start(_plan(_step("a", compensate_retry=policy), _step("b")))
    run.send(ExecuteSucceeded("a", None), T0)
    run.send(ExecuteFailed("b", "no"), T0)
    for attempt in range(1, 4):  # waits 10, 20, 30 <= 35
        run.send(CompensateErrored("a", "UNAVAILABLE"), T0 + 10 * attempt)
        assert run.saga.state == records.COMPENSATING
    transition = run.send(CompensateErrored("a", "UNAVAILABLE"), T0 + 40)  # a 4th wait: 40 > 35
    assert _types(transition) == [
        (S.EVENT_TYPE_STEP_COMPENSATION_FAILED, "a"),
        (S.EVENT_TYPE_SAGA_FAILED, ""),
        (S.EVENT_TYPE_ALERT_RAISED, ""),
    ]
    assert run.saga.step("a").compensate_attempts == 4


# --- timeouts -----------------------------------------------------------------------------


def test_step_timeout_fails_the_step_as_uncertain_and_compensates_it() -> None:
    run = Run.start(_plan(_step("a"), _step("b", step_timeout=30.0)))
    run.send(ExecuteSucceeded("a", None), T0 + 10)
    assert machine.deadline_at(run.plan, run.saga) == T0 + 40
    assert machine.wake_at(run.plan, run.saga) == T0 + 40
    # The call's own deadline is cut to what is left of the step's.
    assert run.calls(T0 + 35) == [CallExecute("b", 1, 5.0)]
    assert not run.send(TimerFired(), T0 + 39.999).changed
    transition = run.send(TimerFired(), T0 + 40)
    assert _types(transition) == [
        (S.EVENT_TYPE_STEP_FAILED, "b"),
        (S.EVENT_TYPE_COMPENSATION_STARTED, ""),
        (S.EVENT_TYPE_STEP_COMPENSATING, "b"),
    ]
    assert run.saga.step("b").effect_uncertain
    assert run.saga.failure_reason == "step 'b' failed: step timed out"
    assert machine.deadline_at(run.plan, run.saga) is None


def test_retry_that_would_land_after_the_step_timeout_fails_the_step_at_once() -> None:
    run = Run.start(_plan(_step("a", step_timeout=12.0, retry=_policy(5, initial=5.0, multiplier=2.0, maximum=60))))
    run.send(ExecuteErrored("a", "UNAVAILABLE"), T0 + 1)  # retry at T0 + 6
    transition = run.send(ExecuteErrored("a", "UNAVAILABLE"), T0 + 6)  # retry would be T0 + 16 > T0 + 12
    assert transition.events[0].type == S.EVENT_TYPE_STEP_FAILED
    assert run.saga.step("a").effect_uncertain
    assert run.state("a") == S.STEP_STATE_COMPENSATING


def test_saga_timeout_abandons_running_steps_and_compensates() -> None:
    run = Run.start(_plan(_step("a"), _step("b"), saga_timeout=60.0))
    assert machine.deadline_at(run.plan, run.saga) == T0 + 60
    run.send(ExecuteSucceeded("a", None), T0 + 10)
    assert not run.send(TimerFired(), T0 + 59).changed
    transition = run.send(TimerFired(), T0 + 60)
    assert _types(transition) == [
        (S.EVENT_TYPE_COMPENSATION_STARTED, ""),
        (S.EVENT_TYPE_STEP_COMPENSATING, "b"),
    ]
    assert run.saga.failure_reason == "saga timed out"
    assert run.saga.step("b").effect_uncertain
    assert run.state("a") == S.STEP_STATE_SUCCEEDED  # waits for b


# --- long-running steps ---------------------------------------------------------------


def test_pending_step_waits_then_succeeds() -> None:
    run = Run.start(_plan(_step("a", long_running=True, step_timeout=3600.0), _step("b")))
    transition = run.send(ExecutePending("a"), T0 + 1)
    assert _types(transition) == [(S.EVENT_TYPE_STEP_WAITING, "a")]
    assert run.state("a") == S.STEP_STATE_WAITING
    assert run.calls(T0 + 1_000) == []  # nobody calls a waiting step again
    assert machine.wake_at(run.plan, run.saga) == T0 + 3600  # only its timeout wakes it
    run.send(ExecuteSucceeded("a", b"done"), T0 + 500)
    assert run.state("a") == S.STEP_STATE_SUCCEEDED
    assert run.state("b") == S.STEP_STATE_RUNNING


def test_step_timeout_while_waiting_fails_the_step() -> None:
    run = Run.start(_plan(_step("a", long_running=True, step_timeout=1800.0)))
    run.send(ExecutePending("a"), T0 + 1)
    assert machine.wake_at(run.plan, run.saga) == T0 + 1800
    transition = run.send(TimerFired(), T0 + 1800)
    assert transition.events[0].type == S.EVENT_TYPE_STEP_FAILED
    assert run.saga.step("a").effect_uncertain
    assert run.state("a") == S.STEP_STATE_COMPENSATING
    # The late completion is stale.
    assert not run.send(ExecuteSucceeded("a", b"late"), T0 + 1801).changed


def test_pending_from_a_step_that_is_not_long_running_does_not_strand_the_saga() -> None:
    run = Run.start(_plan(_step("a")))
    run.send(ExecutePending("a"), T0 + 1)
    stranded = not run.calls(T0 + 1) and machine.wake_at(run.plan, run.saga) is None and not run.saga.is_final
    assert not stranded, run.saga
    assert run.state("a") == S.STEP_STATE_RUNNING
    assert run.log[-1].type == S.EVENT_TYPE_STEP_RETRY_SCHEDULED


def test_waiting_step_can_report_a_business_failure() -> None:
    run = Run.start(_plan(_step("a", long_running=True, step_timeout=3600.0)))
    run.send(ExecutePending("a"), T0 + 1)
    run.send(ExecuteFailed("a", "held and refused"), T0 + 2)
    assert run.saga.state == records.COMPENSATED
    assert run.saga.step("a").effect_uncertain is False


# --- pivots -------------------------------------------------------------------------------


def _pivot_plan(**pivot_options: object) -> Plan:
    return _plan(
        _step("reserve"),
        _step("ship", kind=PIVOT, **pivot_options),  # type: ignore[arg-type]
        _step("notify", kind=RETRIABLE),
        saga_timeout=3600.0,
    )


def test_failure_after_the_pivot_fails_the_saga_with_an_alert_and_compensates_nothing() -> None:
    run = Run.start(_pivot_plan())
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    run.send(ExecuteSucceeded("ship", None), T0 + 2)
    transition = run.send(ExecuteFailed("notify", "bad address"), T0 + 3)
    assert _types(transition) == [
        (S.EVENT_TYPE_STEP_FAILED, "notify"),
        (S.EVENT_TYPE_SAGA_FAILED, ""),
        (S.EVENT_TYPE_ALERT_RAISED, ""),
    ]
    assert "'ship' cannot be undone" in transition.events[-1].message
    assert run.saga.state == records.FAILED
    assert run.state("reserve") == S.STEP_STATE_SUCCEEDED
    assert run.calls(T0 + 100) == []


def test_cancel_after_the_pivot_is_illegal() -> None:
    run = Run.start(_pivot_plan())
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    run.send(ExecuteSucceeded("ship", None), T0 + 2)
    with pytest.raises(IllegalTransition, match="cannot be undone"):
        machine.decide(run.plan, run.saga, CancelRequested("ops", "changed my mind"), T0 + 3)


def test_pivot_with_an_uncertain_outcome_fails_the_saga_with_an_alert() -> None:
    run = Run.start(_pivot_plan(retry=_policy(1)))
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    transition = run.send(ExecuteErrored("ship", "DEADLINE_EXCEEDED"), T0 + 2)
    assert [e.type for e in transition.events] == [
        S.EVENT_TYPE_STEP_FAILED, S.EVENT_TYPE_SAGA_FAILED, S.EVENT_TYPE_ALERT_RAISED
    ]
    assert run.state("reserve") == S.STEP_STATE_SUCCEEDED  # not compensated: ship may have happened


def test_pivot_business_failure_compensates_the_steps_before_it() -> None:
    run = Run.start(_pivot_plan())
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    run.send(ExecuteFailed("ship", "no carrier"), T0 + 2)
    assert run.saga.state == records.COMPENSATING
    assert run.state("reserve") == S.STEP_STATE_COMPENSATING


def test_pivot_step_timeout_fails_the_saga_with_an_alert() -> None:
    run = Run.start(_pivot_plan(step_timeout=60.0))
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    run.send(TimerFired(), T0 + 61)
    assert run.saga.state == records.FAILED
    assert run.log[-1].type == S.EVENT_TYPE_ALERT_RAISED


def test_cancel_while_the_pivot_runs_does_not_compensate_around_it() -> None:
    run = Run.start(_pivot_plan())
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    assert run.state("ship") == S.STEP_STATE_RUNNING
    try:
        run.send(CancelRequested("ops", "stop"), T0 + 2)
    except IllegalTransition:
        return  # refusing is a correct answer too
    # Accepted: ship may have happened, so undoing reserve would leave a shipped,
    # unreserved order. The saga must stop for a person instead.
    assert run.saga.state == records.FAILED
    assert run.state("reserve") == S.STEP_STATE_SUCCEEDED


def test_saga_timeout_does_not_stop_a_running_pivot() -> None:
    # Past the point of no return only step limits apply: the pivot's own
    # deadline and retries decide, so the flow can finish going forward.
    run = Run.start(_pivot_plan())
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    assert machine.deadline_at(run.plan, run.saga) is None
    assert not run.send(TimerFired(), T0 + 3600).changed
    assert run.saga.state == records.RUNNING
    assert run.state("ship") == S.STEP_STATE_RUNNING
    assert run.state("reserve") == S.STEP_STATE_SUCCEEDED


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_abandons_running_steps_and_compensates() -> None:
    run = Run.start(_file_plan("checkout-parallel.yaml"))
    run.send(ExecuteSucceeded("fraud_check", None), T0 + 1)
    transition = run.send(CancelRequested("alice", "customer called"), T0 + 2)
    assert [e.type for e in transition.events[:2]] == [
        S.EVENT_TYPE_CANCEL_REQUESTED, S.EVENT_TYPE_COMPENSATION_STARTED
    ]
    assert transition.events[0].actor == "alice"
    assert transition.events[0].saga_state == records.RUNNING
    assert run.saga.state == records.COMPENSATING
    assert run.saga.failure_reason == "cancelled: customer called"
    reserve = run.saga.step("reserve_stock")
    assert reserve.effect_uncertain and reserve.state == S.STEP_STATE_COMPENSATING
    assert run.state("fraud_check") == S.STEP_STATE_COMPENSATING
    assert run.state("charge_card") == S.STEP_STATE_PENDING
    # The abandoned call's late answer changes nothing.
    assert not run.send(ExecuteSucceeded("reserve_stock", b"late"), T0 + 3).changed


@pytest.mark.parametrize("final_answer", ["none", "compensated"])
def test_cancel_while_compensating_or_compensated_is_a_no_op(final_answer: str) -> None:
    run = Run.start(_chain("a", "b"))
    run.send(ExecuteSucceeded("a", None), T0)
    run.send(ExecuteFailed("b", "no"), T0 + 1)
    if final_answer == "compensated":
        run.send(CompensateSucceeded("a"), T0 + 2)
        assert run.saga.state == records.COMPENSATED
    else:
        assert run.saga.state == records.COMPENSATING
    transition = run.send(CancelRequested("ops", "again"), T0 + 3)
    assert not transition.changed
    assert transition.saga is run.saga


def test_cancel_of_a_succeeded_saga_is_illegal() -> None:
    run = Run.start(_chain("a"))
    run.send(ExecuteSucceeded("a", None), T0)
    assert run.saga.state == records.SUCCEEDED
    with pytest.raises(IllegalTransition, match="SUCCEEDED"):
        machine.decide(run.plan, run.saga, CancelRequested("ops", ""), T0 + 1)


# --- operator retry and resolve -------------------------------------------------------------


def _compensation_failed_run() -> Run:
    run = Run.start(_plan(_step("a", compensate_retry=_policy(2)), _step("b")))
    run.send(ExecuteSucceeded("a", None), T0)
    run.send(ExecuteFailed("b", "no"), T0 + 1)
    run.send(CompensateErrored("a", "down"), T0 + 2)
    run.send(CompensateErrored("a", "down"), T0 + 5)
    assert run.saga.state == records.FAILED
    return run


def test_operator_retry_of_a_failed_compensation_compensates_again_from_scratch() -> None:
    run = _compensation_failed_run()
    transition = run.send(RetryRequested("bob", "service is back"), T0 + 100)
    assert _types(transition) == [(S.EVENT_TYPE_OPERATOR_RETRIED, ""), (S.EVENT_TYPE_COMPENSATION_STARTED, "")]
    assert transition.events[0].actor == "bob"
    step = run.saga.step("a")
    assert (step.state, step.compensate_attempts, step.next_attempt_at) == (S.STEP_STATE_COMPENSATING, 0, None)
    assert run.saga.state == records.COMPENSATING
    assert run.calls(T0 + 100) == [CallCompensate("a", 1, 10.0)]
    run.send(CompensateSucceeded("a"), T0 + 101)
    assert run.saga.state == records.COMPENSATED


def test_operator_retry_past_the_pivot_runs_the_failed_step_again() -> None:
    run = Run.start(_pivot_plan())
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    run.send(ExecuteSucceeded("ship", None), T0 + 2)
    run.send(ExecuteFailed("notify", "bad address"), T0 + 3)
    run.send(RetryRequested("ops", "fixed the address"), T0 + 10)
    assert run.saga.state == records.RUNNING
    assert run.saga.failure_reason == ""
    assert run.calls(T0 + 10) == [CallExecute("notify", 1, 10.0)]
    run.send(ExecuteSucceeded("notify", None), T0 + 11)
    assert run.saga.state == records.SUCCEEDED


def test_saga_timeout_no_longer_applies_once_the_pivot_succeeded() -> None:
    run = Run.start(_pivot_plan())
    run.send(ExecuteSucceeded("reserve", None), T0 + 1)
    run.send(ExecuteSucceeded("ship", None), T0 + 2)
    assert not run.send(TimerFired(), T0 + 3600).changed
    assert run.saga.state == records.RUNNING
    assert run.calls(T0 + 3600) == [CallExecute("notify", 1, 10.0)]
    run.send(ExecuteSucceeded("notify", None), T0 + 3601)
    assert run.saga.state == records.SUCCEEDED


def _saga_in(state: str) -> Run:
    run = Run.start(_chain("a", "b"))
    if state == "RUNNING":
        return run
    run.send(ExecuteSucceeded("a", None), T0)
    if state == "SUCCEEDED":
        run.send(ExecuteSucceeded("b", None), T0 + 1)
        return run
    run.send(ExecuteFailed("b", "no"), T0 + 1)
    if state == "COMPENSATED":
        run.send(CompensateSucceeded("a"), T0 + 2)
    return run


@pytest.mark.parametrize("state", ["RUNNING", "COMPENSATING", "SUCCEEDED", "COMPENSATED"])
@pytest.mark.parametrize("action", [RetryRequested("ops", "r"), ResolveRequested("ops", "fixed by hand")])
def test_retry_and_resolve_need_a_failed_saga(state: str, action: Event) -> None:
    run = _saga_in(state)
    assert saga_state_name(run.saga.state) == state
    with pytest.raises(IllegalTransition, match=state):
        machine.decide(run.plan, run.saga, action, T0 + 50)


def test_resolve_records_the_note_once_and_blocks_retry() -> None:
    run = _compensation_failed_run()
    transition = run.send(ResolveRequested("carol", "refunded by hand"), T0 + 200)
    assert _types(transition) == [(S.EVENT_TYPE_OPERATOR_RESOLVED, "")]
    assert (transition.events[0].actor, transition.events[0].message) == ("carol", "refunded by hand")
    assert run.saga.resolution_note == "refunded by hand"
    assert run.saga.state == records.FAILED
    with pytest.raises(IllegalTransition, match="already resolved"):
        machine.decide(run.plan, run.saga, ResolveRequested("carol", "again"), T0 + 201)
    with pytest.raises(IllegalTransition, match="resolved"):
        machine.decide(run.plan, run.saga, RetryRequested("carol", "retry"), T0 + 202)


# --- stale answers ------------------------------------------------------------------------------


def _abandoned() -> Run:
    """reserve_stock abandoned (FAILED, uncertain) and now COMPENSATING; fraud_check FAILED."""
    run = Run.start(_file_plan("checkout-parallel.yaml"))
    run.send(ExecuteFailed("fraud_check", "fraud"), T0 + 1)
    return run


def _compensated() -> Run:
    run = _abandoned()
    run.send(CompensateSucceeded("reserve_stock"), T0 + 2)
    return run


def _succeeded_first() -> Run:
    run = Run.start(_file_plan("checkout.yaml"))
    run.send(ExecuteSucceeded("reserve_stock", b"r"), T0 + 1)
    return run


STALE: list[tuple[str, Callable[[], Run], Event]] = [
    ("succeeded for a business-failed step", _abandoned, ExecuteSucceeded("fraud_check", b"late")),
    ("succeeded for an abandoned step", _abandoned, ExecuteSucceeded("reserve_stock", b"late")),
    ("failed for an abandoned step", _abandoned, ExecuteFailed("fraud_check", "late")),
    ("errored for an abandoned step", _abandoned, ExecuteErrored("fraud_check", "late")),
    ("pending for an abandoned step", _abandoned, ExecutePending("fraud_check")),
    ("compensated for a compensated step", _compensated, CompensateSucceeded("reserve_stock")),
    ("compensate error for a compensated step", _compensated, CompensateErrored("reserve_stock", "x")),
    ("compensated for a step never compensating", _abandoned, CompensateSucceeded("charge_card")),
    ("succeeded twice", _succeeded_first, ExecuteSucceeded("reserve_stock", b"again")),
    ("errored after success", _succeeded_first, ExecuteErrored("reserve_stock", "late")),
    ("answer for a pending step", _succeeded_first, ExecuteSucceeded("ship_order", b"early")),
    ("timer with nothing due", _succeeded_first, TimerFired()),
]


@pytest.mark.parametrize(("setup", "event"), [(s, e) for _, s, e in STALE], ids=[i for i, _, _ in STALE])
def test_stale_answers_change_nothing(setup: Callable[[], Run], event: Event) -> None:
    run = setup()
    transition = machine.decide(run.plan, run.saga, event, T0 + 10)
    assert not transition.changed
    assert transition.saga == run.saga
    assert transition.changed_steps == ()


# --- random walks --------------------------------------------------------------------------------


def _walk_plans() -> list[Plan]:
    return [
        _file_plan("checkout.yaml"),
        _file_plan("checkout-parallel.yaml"),
        _plan(
            _step("a", independent=True, step_timeout=20.0, retry=_policy(3, initial=1.0)),
            _step("b", independent=True, long_running=True, step_timeout=40.0),
            _step("c", depends_on=["a", "b"], compensate_retry=_policy(2, initial=1.0)),
            _step("d", depends_on=["a"], retry=_policy(2, initial=3.0)),
            saga_timeout=90.0,
        ),
    ]


def _check_invariants(plan: Plan, saga: SagaRecord, log: Sequence[records.LogEvent]) -> None:
    assert [e.sequence for e in log] == list(range(1, len(log) + 1))
    assert saga.sequence == len(log)
    for step in saga.steps:
        if step.state in (S.STEP_STATE_COMPENSATING, S.STEP_STATE_COMPENSATED, S.STEP_STATE_COMPENSATION_FAILED):
            assert step.started_at is not None, f"{step.name} compensated but never started"
            assert plan.compensable(step.name), f"{step.name} is not compensable"
        if step.state == S.STEP_STATE_PENDING:
            assert step.started_at is None
    if saga.state == records.SUCCEEDED:
        assert all(step.state == S.STEP_STATE_SUCCEEDED for step in saga.steps)
    if saga.state == records.COMPENSATED:
        for step in saga.steps:
            may_have_acted = step.state == S.STEP_STATE_SUCCEEDED or (
                step.state == S.STEP_STATE_FAILED and step.effect_uncertain
            )
            assert not (plan.compensable(step.name) and may_have_acted), f"{step.name} left uncompensated"
            assert plan.compensable(step.name) or not may_have_acted, f"compensated around pivot {step.name}"
            assert step.state not in (S.STEP_STATE_RUNNING, S.STEP_STATE_WAITING, S.STEP_STATE_COMPENSATING)
    if saga.is_final:
        assert machine.due_calls(plan, saga, float("inf")) == []
        assert machine.wake_at(plan, saga) is None
    if saga.state == records.COMPENSATING:
        assert not any(s.state in (S.STEP_STATE_RUNNING, S.STEP_STATE_WAITING) for s in saga.steps)


def _pivot_may_run(plan: Plan, saga: SagaRecord) -> bool:
    return any(
        not plan.compensable(step.name) and step.state in (S.STEP_STATE_RUNNING, S.STEP_STATE_WAITING)
        for step in saga.steps
    )


def _random_walk(rng: random.Random, plan: Plan, *, avoid_running_pivot: bool) -> SagaRecord:
    """Random answers to due calls and timer ticks until the saga is final.

    After `chaos` events every answer succeeds, so a final state must follow
    within a bounded number of further events.
    """
    run = Run.start(plan, now=T0)
    now = T0
    chaos = rng.randint(0, 25)
    for count in range(400):
        _check_invariants(plan, run.saga, run.log)
        if run.saga.is_final:
            if run.saga.state == records.FAILED and not run.saga.resolution_note and rng.random() < 0.3:
                run.send(RetryRequested("ops", "walk"), now)
                continue
            return run.saga
        calm = count >= chaos
        calls = run.calls(now)
        waiting = [s.name for s in run.saga.steps if s.state == S.STEP_STATE_WAITING]
        deadline = machine.deadline_at(plan, run.saga)
        roll = rng.random()
        event: Event
        if deadline is not None and deadline <= now:
            event = TimerFired()
        elif not calm and roll < 0.05 and not (avoid_running_pivot and _pivot_may_run(plan, run.saga)):
            event = CancelRequested("walker", "random")
        elif not calm and roll < 0.1:
            step = rng.choice(run.saga.steps).name
            stray: list[Event] = [ExecuteSucceeded(step, None), ExecuteErrored(step, "x"), CompensateSucceeded(step)]
            event = rng.choice(stray)
        elif calls or waiting:
            targets: list[Call | str] = [*calls, *waiting]
            target = rng.choice(targets)
            if isinstance(target, str):
                options: list[Event] = [ExecuteSucceeded(target, b"ok")] if calm else [
                    ExecuteSucceeded(target, b"ok"), ExecuteFailed(target, "no")
                ]
            elif isinstance(target, CallExecute):
                options = [ExecuteSucceeded(target.step, b"ok")]
                if not calm:
                    options += [ExecuteFailed(target.step, "no"), ExecuteErrored(target.step, "x")]
                    if plan.steps[target.step].long_running:
                        options.append(ExecutePending(target.step))
            else:
                options = [CompensateSucceeded(target.step)]
                if not calm:
                    options.append(CompensateErrored(target.step, "x"))
            event = rng.choice(options)
        else:
            wake = machine.wake_at(plan, run.saga)
            assert wake is not None and wake > now, f"stuck: nothing due, nothing to wait for: {run.saga}"
            now = wake
            event = TimerFired()
        try:
            run.send(event, now)
        except IllegalTransition:
            assert isinstance(event, CancelRequested)
        now += rng.choice([0.0, 0.1, 0.5, 2.0])
    raise AssertionError(f"no final state after 400 events: {run.saga}")



def test_random_walks_keep_the_invariants_and_end_in_a_final_state() -> None:
    rng = random.Random(20240611)
    plans = _walk_plans()
    finals: dict[int, int] = {}
    for _ in range(500):
        saga = _random_walk(rng, rng.choice(plans), avoid_running_pivot=True)
        finals[saga.state] = finals.get(saga.state, 0) + 1
    # The walk really explores: every final state shows up.
    assert set(finals) == {records.SUCCEEDED, records.COMPENSATED, records.FAILED}, finals


def test_random_walks_with_cancel_at_any_time_never_compensate_around_a_pivot() -> None:
    rng = random.Random(7)
    plans = _walk_plans()[:2]
    for _ in range(500):
        _random_walk(rng, rng.choice(plans), avoid_running_pivot=False)


def test_a_takeover_comes_first_in_the_transition_it_is_written_with() -> None:
    run = Run.start(_chain("a", "b"))
    cancel = machine.decide(run.plan, run.saga, CancelRequested("alice", "no"), T0 + 5)
    taken = machine.taken_over(
        run.saga, cancel, by="replica-b", previous="replica-a", why="CancelSaga by alice", now=T0 + 5
    )
    assert _types(taken) == [(S.EVENT_TYPE_TAKEN_OVER, ""), *_types(cancel)]
    first = taken.events[0]
    assert (first.actor, first.saga_state, first.time) == ("replica-b", records.RUNNING, T0 + 5)
    assert first.message == "replica replica-b took the saga over from replica replica-a: CancelSaga by alice"
    assert taken.changed_steps == cancel.changed_steps
    # The renumbered log still follows on from the saga without a gap.
    run._record(taken)
    assert run.saga == replace(cancel.saga, sequence=cancel.saga.sequence + 1)
