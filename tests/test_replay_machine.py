"""Replay without any server: histories made by driving the pure machine as
the engine would (timeouts, exhausted retries, failed compensations, an
operator's retry, a stuck alert, renames) replay to where the saga is, and a
log or a definition that differs is found at its first diverging event."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import any_pb2, duration_pb2

import compensa.checkout.v1.checkout_pb2  # noqa: F401  (registers the input_type the definitions name)
from compensa.orchestrator.api.history_checks import check_history
from compensa.orchestrator.api.views import event_message, saga_message
from compensa.orchestrator.definitions import validate_definition
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.alerts import stuck_alert
from compensa.orchestrator.engine.migration import moved_saga
from compensa.orchestrator.engine.migration_plan import classify
from compensa.orchestrator.engine.replay import Divergence, Move, history_of, moved_message, read_move, replay_history
from compensa.orchestrator.shared.records import LogEvent, SagaRecord
from compensa.orchestrator.store import StoredEvent
from compensa.v1 import definition_pb2, orchestrator_pb2, saga_pb2

D = definition_pb2
S = saga_pb2
T0 = 1_765_000_000.123456


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def _definition(
    *steps: D.StepDefinition, saga_timeout: float | None = None, max_attempts: int = 3
) -> D.SagaDefinition:
    definition = D.SagaDefinition(name="orders", input_type="compensa.checkout.v1.CheckoutInput", steps=list(steps))
    for step in definition.steps:
        step.retry.CopyFrom(D.RetryPolicy(
            max_attempts=max_attempts, initial_backoff=_seconds(0.5), backoff_multiplier=2.0, max_backoff=_seconds(5)
        ))
        if step.kind != D.STEP_KIND_RETRIABLE:
            step.compensate_retry.CopyFrom(D.RetryPolicy(
                max_attempts=2, initial_backoff=_seconds(1), backoff_multiplier=2.0, max_backoff=_seconds(5)
            ))
    if saga_timeout is not None:
        definition.saga_timeout.CopyFrom(_seconds(saga_timeout))
    return validate_definition(definition)


def _step(name: str, **fields: object) -> D.StepDefinition:
    fields.setdefault("participant", f"{name}-service")
    return D.StepDefinition(name=name, **fields)  # type: ignore[arg-type]


@dataclass
class Drive:
    """A saga driven through the machine at given times, its log kept as stored."""

    definition: D.SagaDefinition
    now: float = T0
    log: list[LogEvent] = field(default_factory=list)
    saga: SagaRecord | None = None

    def __post_init__(self) -> None:
        self.plan = machine.Plan.of(self.definition)
        saga_input = any_pb2.Any(type_url="type.googleapis.com/compensa.checkout.v1.CheckoutInput", value=b"\x0a\x01x")
        self.take(machine.new_saga(self.plan, saga_id="s-1", input=saga_input.SerializeToString(), now=self.now))

    def take(self, transition: machine.Transition) -> None:
        self.log.extend(transition.events)
        self.saga = transition.saga

    def on(self, event: machine.Event, after: float = 0.25) -> Drive:
        self.now += after
        assert self.saga is not None
        self.take(machine.decide(self.plan, self.saga, event, self.now))
        return self

    def move(self, to: D.SagaDefinition, renames: dict[str, str], text: str) -> Drive:
        """Moves the saga to version `to` as a bulk action's MOVE does."""
        assert self.saga is not None
        self.now += 0.25
        plan = machine.Plan.of(to)
        moved = moved_saga(self.saga, plan, renames, self.now)
        message = moved_message(Move(self.saga.definition_version, to.version, renames), text)
        self.log.append(LogEvent(moved.sequence, S.EVENT_TYPE_SAGA_MOVED, self.now, moved.state, message=message))
        self.saga, self.plan, self.definition = moved, plan, to
        return self

    def history(self) -> orchestrator_pb2.SagaHistory:
        assert self.saga is not None
        events = [event_message(StoredEvent("s-1", "orders", n, event)) for n, event in enumerate(self.log, 1)]
        return history_of(saga_message(self.saga, self.plan), events, self.definition)


def _output(text: str) -> bytes:
    packed = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.StringValue", value=text.encode())
    return packed.SerializeToString()


def _types(history: orchestrator_pb2.SagaHistory) -> list[str]:
    return [S.EventType.Name(event.type).removeprefix("EVENT_TYPE_") for event in history.events]


def _replays(drive: Drive) -> orchestrator_pb2.SagaHistory:
    history = drive.history()
    check = check_history(history)
    assert check.ok, check.summary()
    assert check.events == len(history.events)
    return history


def test_timeouts_exhausted_retries_failed_compensation_and_operator_retry_replay() -> None:
    definition = _definition(
        _step("reserve"), _step("charge", long_running=True, step_timeout=_seconds(60)), saga_timeout=3600
    )
    timed_out = Drive(definition)
    timed_out.on(machine.ExecuteErrored("reserve", "UNAVAILABLE: down: try later"))
    timed_out.on(machine.ExecuteSucceeded("reserve", _output("r1")), after=0.6)
    timed_out.on(machine.ExecutePending("charge"))
    timed_out.on(machine.TimerFired(), after=60)
    timed_out.on(machine.CompensateErrored("charge", "DEADLINE_EXCEEDED"))
    timed_out.on(machine.CompensateErrored("charge", "DEADLINE_EXCEEDED"), after=1.5)
    timed_out.on(machine.CompensateSucceeded("reserve"))
    history = _replays(timed_out)
    assert "STEP_COMPENSATION_FAILED" in _types(history) and history.saga.state == S.SAGA_STATE_FAILED
    timed_out.on(machine.RetryRequested("ops", "participant is back"), after=30)
    timed_out.on(machine.CompensateSucceeded("charge"))
    history = _replays(timed_out)
    assert history.saga.state == S.SAGA_STATE_COMPENSATED and "OPERATOR_RETRIED" in _types(history)

    saga_timeout = Drive(_definition(_step("reserve", long_running=True, step_timeout=_seconds(7200)),
                                     saga_timeout=30))
    saga_timeout.on(machine.ExecutePending("reserve"))
    saga_timeout.on(machine.TimerFired(), after=30)
    saga_timeout.on(machine.CompensateSucceeded("reserve"))
    assert _types(_replays(saga_timeout))[:5] == [
        "SAGA_STARTED", "STEP_STARTED", "STEP_WAITING", "COMPENSATION_STARTED", "STEP_COMPENSATING"
    ]

    exhausted = Drive(_definition(_step("reserve"), _step("ship", kind=D.STEP_KIND_PIVOT)))
    exhausted.on(machine.ExecuteSucceeded("reserve", _output("r")))
    for _ in range(3):
        exhausted.on(machine.ExecuteErrored("ship", "UNAVAILABLE: carrier: down"), after=6)
    history = _replays(exhausted)
    assert history.saga.state == S.SAGA_STATE_FAILED
    assert "retries exhausted after 3 attempts: UNAVAILABLE: carrier: down" in [e.message for e in history.events]
    exhausted.on(machine.ResolveRequested("ops", "shipped by hand"))
    assert exhausted.saga is not None
    exhausted.take(stuck_alert(exhausted.saga, exhausted.now + 900))
    _replays(exhausted)


def _tampered(history: orchestrator_pb2.SagaHistory, sequence: int, **changes: object) -> orchestrator_pb2.SagaHistory:
    copy = orchestrator_pb2.SagaHistory()
    copy.CopyFrom(history)
    for name, value in changes.items():
        setattr(copy.events[sequence - 1], name, value)
    return copy


def test_a_log_that_is_not_what_the_machine_decides_is_found_at_its_first_wrong_event() -> None:
    drive = Drive(_definition(_step("reserve"), _step("charge"), _step("ship")))
    drive.on(machine.ExecuteSucceeded("reserve", _output("r")))
    drive.on(machine.ExecuteFailed("charge", "card declined"))
    drive.on(machine.CompensateSucceeded("reserve"))
    history = _replays(drive)
    assert _types(history) == [
        "SAGA_STARTED", "STEP_STARTED", "STEP_SUCCEEDED", "STEP_STARTED", "STEP_FAILED", "COMPENSATION_STARTED",
        "STEP_COMPENSATING", "STEP_COMPENSATED", "SAGA_COMPENSATED",
    ]
    wrong_step = check_history(_tampered(history, 4, step_name="ship"))
    assert wrong_step.divergence is not None and wrong_step.divergence.sequence == 4
    assert wrong_step.divergence.reason.startswith("the log has STEP_STARTED of step 'ship' (attempt 1); the"
                                                   " definition would have written STEP_STARTED of step 'charge'")
    wrong_state = check_history(_tampered(history, 9, saga_state=S.SAGA_STATE_FAILED))
    assert wrong_state.divergence is not None and wrong_state.divergence.sequence == 9

    cut = orchestrator_pb2.SagaHistory()
    cut.CopyFrom(history)
    del cut.events[-1]
    short = check_history(cut)
    assert short.divergence is not None and short.divergence.sequence == 9
    assert short.divergence.reason == (
        "the definition would also have written SAGA_COMPENSATED: step 'charge' failed: card declined,"
        " which the log does not have"
    )

    empty = orchestrator_pb2.SagaHistory()
    empty.CopyFrom(history)
    del empty.events[:]
    nothing = check_history(empty)
    assert nothing.divergence == Divergence(1, "the log is empty: it has no SAGA_STARTED")

    elsewhere = orchestrator_pb2.SagaHistory()
    elsewhere.CopyFrom(history)
    elsewhere.saga.steps[0].attempts = 7
    elsewhere.saga.update_time.seconds += 1
    ended = check_history(elsewhere)
    assert ended.divergence is None
    assert ended.differences == (
        f"update_time: stored {elsewhere.saga.update_time.ToJsonString()}, replayed"
        f" {history.saga.update_time.ToJsonString()}",
        "step 'reserve' attempts: stored 7, replayed 1",
    )


def test_a_changed_retry_policy_diverges_where_the_saga_gave_up_and_a_rename_needs_a_mapping() -> None:
    drive = Drive(_definition(_step("reserve"), _step("charge")))
    drive.on(machine.ExecuteSucceeded("reserve", _output("r")))
    for _ in range(3):
        drive.on(machine.ExecuteErrored("charge", "UNAVAILABLE"), after=6)
    history = _replays(drive)
    patient = _definition(_step("reserve"), _step("charge"), max_attempts=5)
    outcome = replay_history(history, patient)
    assert outcome.divergence is not None and outcome.divergence.sequence == 7
    assert outcome.divergence.reason == (
        "the log has STEP_FAILED of step 'charge' (attempt 3): retries exhausted after 3 attempts: UNAVAILABLE;"
        " the definition would have written STEP_RETRY_SCHEDULED of step 'charge' (attempt 3): UNAVAILABLE"
    )

    in_flight = Drive(_definition(_step("reserve"), _step("charge")))
    in_flight.on(machine.ExecuteSucceeded("reserve", _output("r")))
    history = _replays(in_flight)
    renamed = _definition(_step("hold", participant="reserve-service"), _step("charge"))
    assert classify(history, renamed, {}).verdict == orchestrator_pb2.MIGRATION_VERDICT_INCOMPATIBLE
    mapped = classify(history, renamed, {"reserve": "hold"})
    assert (mapped.verdict, mapped.reason) == (orchestrator_pb2.MIGRATION_VERDICT_COMPATIBLE_WITH_MAPPING,
                                               "with reserve=hold")
    # A step added after the one in flight changes no decision taken so far.
    longer = _definition(_step("reserve"), _step("charge"), _step("notify", kind=D.STEP_KIND_RETRIABLE))
    assert classify(history, longer, {}).verdict == orchestrator_pb2.MIGRATION_VERDICT_COMPATIBLE
    # One added beside the first step would have started with it.
    beside = _definition(_step("reserve"), _step("audit", independent=True), _step("charge", depends_on=["reserve"]))
    parallel = classify(history, beside, {})
    assert (parallel.verdict, parallel.diverging_sequence) == (orchestrator_pb2.MIGRATION_VERDICT_INCOMPATIBLE, 3)
    assert parallel.reason == (
        "the log has STEP_SUCCEEDED of step 'reserve' (attempt 1); the definition would have written STEP_STARTED"
        " of step 'audit' (attempt 1)"
    )


def test_never_delivered_attempts_and_a_skipped_compensation_replay() -> None:
    """Attempts that never left the orchestrator (connection refused): the
    retry after each is committed as attempt SENDING first, possibly
    delivered and never delivered attempts mix, two steps are marked SENDING
    in one transition, and the step none of whose attempts went out has its
    compensation skipped while the others are compensated."""
    definition = _definition(_step("reserve"), _step("notify", independent=True), _step("charge"), max_attempts=3)
    refused = "UNAVAILABLE: failed to connect to all addresses: connection refused"
    drive = Drive(definition)
    drive.on(machine.ExecuteErrored("reserve", refused, never_delivered=True))
    drive.on(machine.ExecuteErrored("notify", refused, never_delivered=True), after=0)
    drive.on(machine.AttemptsSending(("reserve", "notify")), after=0.6)
    drive.on(machine.ExecuteSucceeded("notify", _output("n1")))
    drive.on(machine.ExecuteErrored("reserve", "DEADLINE_EXCEEDED: no answer in time"))
    drive.on(machine.ExecuteSucceeded("reserve", _output("r1")), after=1.1)
    drive.on(machine.ExecuteErrored("charge", refused, never_delivered=True))
    drive.on(machine.AttemptsSending(("charge",)), after=0.6)
    drive.on(machine.ExecuteErrored("charge", refused, never_delivered=True))
    drive.on(machine.AttemptsSending(("charge",)), after=1.1)
    drive.on(machine.ExecuteErrored("charge", refused, never_delivered=True))
    types = _types(drive.history())
    assert types.count("STEP_ATTEMPT_SENDING") == 4
    assert "STEP_COMPENSATION_SKIPPED" in types
    drive.on(machine.CompensateSucceeded("reserve"))
    drive.on(machine.CompensateSucceeded("notify"))
    history = _replays(drive)
    assert history.saga.state == S.SAGA_STATE_COMPENSATED
    charge = next(step for step in history.saga.steps if step.name == "charge")
    assert charge.state == S.STEP_STATE_FAILED and charge.last_error.endswith("never delivered: " + refused)
    skipped = [event for event in history.events if event.type == S.EVENT_TYPE_STEP_COMPENSATION_SKIPPED]
    assert [event.step_name for event in skipped] == ["charge"]


def test_a_log_that_claims_never_delivered_where_the_attempt_may_have_gone_out_diverges() -> None:
    """A never-delivered report only counts for an attempt its writer marked
    SENDING: a log whose step skips compensation after an attempt that may
    have reached the participant is not what the machine decides."""
    definition = _definition(_step("reserve"), max_attempts=2)
    drive = Drive(definition)
    drive.on(machine.ExecuteErrored("reserve", "DEADLINE_EXCEEDED: no answer in time"))
    drive.on(machine.ExecuteErrored("reserve", "DEADLINE_EXCEEDED: no answer in time"), after=0.6)
    drive.on(machine.CompensateSucceeded("reserve"))
    history = _replays(drive)
    failed = next(event for event in history.events if event.type == S.EVENT_TYPE_STEP_FAILED)
    forged = _tampered(
        history, failed.sequence,
        message=failed.message.replace("DEADLINE_EXCEEDED", "never delivered: DEADLINE_EXCEEDED"),
    )
    divergence = replay_history(forged).divergence
    assert divergence is not None and divergence.sequence == failed.sequence


def test_a_saga_moved_twice_replays_whole_under_the_version_it_runs_now() -> None:
    """Moved from version 1 to 2 (reserve renamed hold), then to 3 (hold
    renamed keep), with decisions taken under each: its log replays under
    version 3, each step known by its latest name, and says both moves."""
    versions = [
        _definition(_step(first, participant="reserve-service"), _step("charge"), _step("ship"))
        for first in ("reserve", "hold", "keep")
    ]
    for number, version in enumerate(versions, 1):
        version.version = number
    drive = Drive(versions[0])
    drive.on(machine.ExecuteSucceeded("reserve", _output("r")))
    drive.move(versions[1], {"reserve": "hold"}, "bulk action j1: INC-1")
    drive.on(machine.ExecuteErrored("charge", "UNAVAILABLE"))
    drive.move(versions[2], {"hold": "keep"}, "bulk action j2")
    drive.on(machine.ExecuteSucceeded("charge", _output("c")), after=1)
    drive.on(machine.ExecuteSucceeded("ship", _output("s")))
    history = _replays(drive)
    assert history.saga.state == S.SAGA_STATE_SUCCEEDED
    assert [step.name for step in history.saga.steps] == ["keep", "charge", "ship"]
    moves = [read_move(event.message) for event in history.events if event.type == S.EVENT_TYPE_SAGA_MOVED]
    assert moves == [
        (Move(1, 2, {"reserve": "hold"}), "bulk action j1: INC-1"), (Move(2, 3, {"hold": "keep"}), "bulk action j2")
    ]
    second = [event for event in history.events if event.type == S.EVENT_TYPE_SAGA_MOVED][1]
    assert second.message == "moved from version 2 to version 3, steps renamed hold=keep; bulk action j2"
    # Under version 2, the step is not known by its name now.
    back = replay_history(history, versions[1])
    assert back.divergence is not None and "step 'keep' is not in the definition" in back.divergence.reason
