"""Replaying a saga's history through the pure state machine.

The log records what the machine decided, not what it was told. Replay reads
the cause of each stored transition back from its first event (a
participant's answer, a timer, an operator's action), feeds it to
`machine.decide` under a definition at the event's own time, and compares the
events the machine produces with the stored ones, one by one. Under the
version the saga ran on it must rebuild the saga exactly; under another
version the first event where they part is where that version would have
decided otherwise (design notes, "Replaying decisions").

A saga moved to another version (SAGA_MOVED) is replayed whole under the
version it runs on now, each step known by its latest name: it was moved only
because its log up to the move replays under that version, and everything
after the move was decided under it.

No I/O and no clock: the server (PlanMigration), `compensa replay` and
compensa.testing all replay a `SagaHistory` message with `replay_history`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from google.protobuf import message as protobuf_message
from google.protobuf import timestamp_pb2

from compensa.orchestrator.engine import machine
from compensa.orchestrator.shared.records import E, LogEvent, SagaRecord
from compensa.v1 import definition_pb2, orchestrator_pb2, saga_pb2

__all__ = [
    "Divergence", "Move", "ReplayOutcome", "history_of", "moved_message", "read_move", "replay_history",
    "saga_differences",
]

#: Times the history carries as Timestamps come back within this of the
#: stored floats (a Timestamp holds whole nanoseconds, a float does not).
_TIME_TOLERANCE_SECONDS = 1e-6
#: Events that record something beside the machine's decisions, when one
#: opens a transition: a replica taking the saga over, and an alert for a saga
#: that stopped moving (an alert the machine raises always follows another
#: event of its transition, where it is compared like any other).
_NOTES = frozenset({E.EVENT_TYPE_TAKEN_OVER, E.EVENT_TYPE_ALERT_RAISED, E.EVENT_TYPE_SAGA_MOVED})
#: The message of a SAGA_MOVED event, up to the job's text.
_MOVED = re.compile(r"moved from version (\d+) to version (\d+)(?:, steps renamed ([^;]+))?(?:; |$)")


@dataclass(frozen=True)
class Move:
    """What a SAGA_MOVED event says: from which version to which, with the
    steps renamed (old name -> new name)."""

    from_version: int
    to_version: int
    renames: Mapping[str, str]


def moved_message(move: Move, text: str) -> str:
    """The message of a SAGA_MOVED event: "moved from version 1 to version
    3, steps renamed a=b, c=d; TEXT" (TEXT: the job's tag and note)."""
    renamed = ", ".join(f"{old}={new}" for old, new in sorted(move.renames.items()) if old != new)
    return (
        f"moved from version {move.from_version} to version {move.to_version}"
        + (f", steps renamed {renamed}" if renamed else "")
        + (f"; {text}" if text else "")
    )


def read_move(message: str) -> tuple[Move, str] | None:
    """The move a SAGA_MOVED event's message records, and the text after it;
    None if it is not such a message."""
    found = _MOVED.match(message)
    if found is None:
        return None
    pairs = [pair.partition("=") for pair in found[3].split(", ")] if found[3] else []
    move = Move(int(found[1]), int(found[2]), {old: new for old, _, new in pairs})
    return move, message[found.end():]


def _named_as_now(events: Sequence[saga_pb2.SagaEvent]) -> list[saga_pb2.SagaEvent]:
    """`events` (by sequence) with each step under the name it has after
    every later move's renames."""
    named: list[saga_pb2.SagaEvent] = []
    # A name as it was at that point of the log -> its name at the end.
    later: dict[str, str] = {}
    for event in reversed(events):
        if event.type == E.EVENT_TYPE_SAGA_MOVED and (read := read_move(event.message)) is not None:
            renames = read[0].renames
            later = {name: now for name, now in later.items() if name not in renames} | {
                old: later.get(new, new) for old, new in renames.items()
            }
        if event.step_name in later:
            renamed = saga_pb2.SagaEvent()
            renamed.CopyFrom(event)
            renamed.step_name = later[event.step_name]
            event = renamed
        named.append(event)
    named.reverse()
    return named


@dataclass(frozen=True)
class Divergence:
    """Where replay parted from the log: the stored event's sequence (the
    saga's sequence + 1 when the definition would have gone on past the
    log's end) and why."""

    sequence: int
    reason: str


@dataclass(frozen=True)
class ReplayOutcome:
    """The saga as the machine rebuilt it from the log (up to the divergence,
    if any; None if it diverged at the very first event), with the plan it
    was rebuilt under."""

    saga: SagaRecord | None
    plan: machine.Plan
    divergence: Divergence | None
    #: Stored events replayed before the divergence (all of them without one).
    replayed: int


def history_of(
    saga: saga_pb2.Saga, events: Sequence[saga_pb2.SagaEvent], definition: definition_pb2.SagaDefinition
) -> orchestrator_pb2.SagaHistory:
    """The SagaHistory message of a saga, its log and its definition version."""
    return orchestrator_pb2.SagaHistory(saga=saga, events=events, definition=definition)


def replay_history(
    history: orchestrator_pb2.SagaHistory,
    definition: definition_pb2.SagaDefinition | machine.Plan | None = None,
    *,
    renames: Mapping[str, str] | None = None,
) -> ReplayOutcome:
    """Replays `history` under `definition` (validated and normalized, or its
    plan when many histories are replayed under it; by default the version
    the saga ran on), with its steps renamed old -> new by `renames`. Beyond
    the events, a step that ran must keep its participant and its
    compensability under `definition`."""
    renames = renames or {}
    if isinstance(definition, machine.Plan):
        plan = definition
    else:
        plan = machine.Plan.of(definition if definition is not None else history.definition)
    return _Replayer(history, plan, renames).run()


def saga_differences(stored: saga_pb2.Saga, rebuilt: saga_pb2.Saga) -> list[str]:
    """How the rebuilt saga differs from the stored one, field by field
    (times within a microsecond); empty when replay ended where the saga is."""
    found = [
        f"{field}: stored {_shown(stored, field)}, replayed {_shown(rebuilt, field)}"
        for field in ("state", "sequence", "failure_reason", "resolution_note", "create_time", "update_time")
        if not _same(stored, rebuilt, field)
    ]
    rebuilt_steps = {step.name: step for step in rebuilt.steps}
    for step in stored.steps:
        other = rebuilt_steps.pop(step.name, None)
        if other is None:
            found.append(f"step {step.name!r}: stored, but the replayed saga has no such step")
            continue
        found.extend(
            f"step {step.name!r} {field}: stored {_shown(step, field)}, replayed {_shown(other, field)}"
            for field in (
                "state", "attempts", "compensate_attempts", "last_error", "output", "start_time", "finish_time",
                "next_attempt_time",
            )
            if not _same(step, other, field)
        )
    found.extend(f"step {name!r}: replayed, but the stored saga has no such step" for name in rebuilt_steps)
    return found


def _same(stored: protobuf_message.Message, rebuilt: protobuf_message.Message, field: str) -> bool:
    left, right = getattr(stored, field), getattr(rebuilt, field)
    if isinstance(left, timestamp_pb2.Timestamp):
        if stored.HasField(field) != rebuilt.HasField(field):
            return False
        return abs(_seconds(left) - _seconds(right)) <= _TIME_TOLERANCE_SECONDS
    return bool(left == right)


def _shown(message: protobuf_message.Message, field: str) -> str:
    value = getattr(message, field)
    if isinstance(value, timestamp_pb2.Timestamp):
        return value.ToJsonString() if message.HasField(field) else "unset"
    if field == "state":
        enum = saga_pb2.SagaState if isinstance(message, saga_pb2.Saga) else saga_pb2.StepState
        return str(enum.Name(value))
    if isinstance(value, protobuf_message.Message):
        return "set" if message.HasField(field) else "unset"
    return repr(value)


def _seconds(time: timestamp_pb2.Timestamp) -> float:
    return time.seconds + time.nanos / 1e9


def describe(event: saga_pb2.SagaEvent | LogEvent) -> str:
    """An event as a person reads it: `STEP_FAILED of step 'pay' (attempt 2): card declined`."""
    text = str(saga_pb2.EventType.Name(event.type)).removeprefix("EVENT_TYPE_")  # type: ignore[arg-type]
    if event.step_name:
        text += f" of step {event.step_name!r}"
    if event.attempt:
        text += f" (attempt {event.attempt})"
    if event.message:
        text += f": {event.message}"
    return text


def _cause(event: saga_pb2.SagaEvent, outputs: Mapping[str, bytes | None]) -> machine.Event | None:
    """The input that made the transition `event` opens; None if no input
    starts a transition with such an event."""
    step, text = event.step_name, event.message
    match event.type:
        case E.EVENT_TYPE_STEP_SUCCEEDED:
            return machine.ExecuteSucceeded(step, outputs.get(step))
        case E.EVENT_TYPE_STEP_WAITING:
            return machine.ExecutePending(step)
        case E.EVENT_TYPE_STEP_RETRY_SCHEDULED:
            return _execute_errored(step, text)
        case E.EVENT_TYPE_STEP_FAILED:
            # The reason tells a business failure from one after errors or a
            # timeout, whose effect is unknown (a business reason written
            # exactly like the machine's own would be read as the machine's).
            if text == machine.STEP_TIMED_OUT:
                return machine.TimerFired()
            gave_up = machine.GAVE_UP_AFTER_ERRORS.match(text)
            if gave_up:
                return _execute_errored(step, text[gave_up.end():])
            return machine.ExecuteFailed(step, text)
        case E.EVENT_TYPE_COMPENSATION_STARTED:
            return machine.TimerFired()
        case E.EVENT_TYPE_STEP_COMPENSATED:
            return machine.CompensateSucceeded(step)
        case E.EVENT_TYPE_STEP_COMPENSATE_RETRY_SCHEDULED:
            return machine.CompensateErrored(step, text)
        case E.EVENT_TYPE_STEP_COMPENSATION_FAILED:
            return machine.CompensateErrored(step, text.partition(": ")[2])
        case E.EVENT_TYPE_CANCEL_REQUESTED:
            return machine.CancelRequested(event.actor, text)
        case E.EVENT_TYPE_OPERATOR_RETRIED:
            return machine.RetryRequested(event.actor, text)
        case E.EVENT_TYPE_OPERATOR_RESOLVED:
            return machine.ResolveRequested(event.actor, text)
        case E.EVENT_TYPE_BACKOFF_SKIPPED:
            return machine.RetryNowRequested(event.actor, text)
    return None


def _execute_errored(step: str, error: str) -> machine.ExecuteErrored:
    """The transient error recorded as `error`: one the machine wrote with
    its never-delivered prefix was reported never delivered by the driver
    (the machine writes the prefix only for an attempt that driver marked
    SENDING, so a log claiming it elsewhere diverges)."""
    unsent = error.removeprefix(machine.NEVER_DELIVERED)
    return machine.ExecuteErrored(step, unsent, never_delivered=unsent != error)


def _matches(stored: saga_pb2.SagaEvent, made: LogEvent) -> bool:
    return (
        stored.type == made.type
        and stored.step_name == made.step_name
        and stored.step_state == made.step_state
        and stored.saga_state == made.saga_state
        and stored.attempt == made.attempt
        and stored.message == made.message
        and stored.actor == made.actor
    )


def _kind_name(kind: int) -> str:
    """COMPENSABLE, PIVOT or RETRIABLE (UNSPECIFIED reads as COMPENSABLE)."""
    kind = kind or definition_pb2.STEP_KIND_COMPENSABLE
    return str(definition_pb2.StepKind.Name(kind)).removeprefix("STEP_KIND_")  # type: ignore[arg-type]


@dataclass
class _Attempt:
    """A transition replayed from one stored event on (None: none could be),
    how many of its events the log has, and why not all."""

    transition: machine.Transition | None
    matched: int
    reason: str


class _Replayer:
    """Walks one history under one plan."""

    def __init__(
        self, history: orchestrator_pb2.SagaHistory, plan: machine.Plan, renames: Mapping[str, str]
    ) -> None:
        self.plan = plan
        self.renames = renames
        self.original_names = {new: old for old, new in renames.items()}
        self.old_steps = {step.name: step for step in history.definition.steps}
        by_sequence = sorted(history.events, key=lambda event: event.sequence)
        self.events = [self._renamed(event) for event in _named_as_now(by_sequence)]
        self.input = history.saga.input.SerializeToString()
        self.saga_id = history.saga.saga_id
        self.outputs = {
            renames.get(step.name, step.name): step.output.SerializeToString() if step.HasField("output") else None
            for step in history.saga.steps
        }
        self.checked_steps: set[str] = set()

    def _renamed(self, event: saga_pb2.SagaEvent) -> saga_pb2.SagaEvent:
        if event.step_name not in self.renames:
            return event
        renamed = saga_pb2.SagaEvent()
        renamed.CopyFrom(event)
        renamed.step_name = self.renames[event.step_name]
        return renamed

    def run(self) -> ReplayOutcome:
        if not self.events:
            return ReplayOutcome(None, self.plan, Divergence(1, "the log is empty: it has no SAGA_STARTED"), 0)
        saga: SagaRecord | None = None
        cursor = 0
        while cursor < len(self.events):
            event = self.events[cursor]
            if saga is None:
                if event.type != E.EVENT_TYPE_SAGA_STARTED or event.sequence != 1:
                    return self._diverged(None, cursor, f"the log starts with {describe(event)}, not SAGA_STARTED")
                attempt = self._try(None, machine.new_saga(
                    self.plan, saga_id=self.saga_id, input=self.input, now=_seconds(event.time)
                ), cursor)
            elif event.type in _NOTES:
                saga = replace(saga, sequence=event.sequence)
                if event.type == E.EVENT_TYPE_SAGA_MOVED:  # the one note that is a change of the saga
                    saga = replace(saga, updated_at=_seconds(event.time))
                cursor += 1
                continue
            else:
                attempt = self._caused_by(saga, event, cursor)
            if attempt.transition is None or attempt.matched < len(attempt.transition.events):
                return self._diverged(saga, cursor + attempt.matched, attempt.reason)
            changed = self._changed_step_among(cursor, cursor + attempt.matched)
            if changed is not None:
                at, reason = changed
                return self._diverged(saga, at, reason)
            saga = attempt.transition.saga
            cursor += attempt.matched
        return ReplayOutcome(saga, self.plan, None, cursor)

    def _diverged(self, saga: SagaRecord | None, at: int, reason: str) -> ReplayOutcome:
        sequence = self.events[at].sequence if at < len(self.events) else (self.events[-1].sequence + 1)
        return ReplayOutcome(saga, self.plan, Divergence(sequence, reason), at)

    def _caused_by(self, saga: SagaRecord, event: saga_pb2.SagaEvent, cursor: int) -> _Attempt:
        if event.step_name and event.step_name not in self.plan.steps:
            return _Attempt(None, 0, self._not_in_definition(event.step_name))
        cause = (
            self._attempts_sending(cursor)
            if event.type == E.EVENT_TYPE_STEP_ATTEMPT_SENDING
            else _cause(event, self.outputs)
        )
        if cause is None:
            return _Attempt(None, 0, self._unexpected(saga, event))
        try:
            transition = machine.decide(self.plan, saga, cause, _seconds(event.time))
        except machine.IllegalTransition as error:
            return _Attempt(None, 0, f"the definition refuses {describe(event)}: {error}")
        if not transition.changed:
            return _Attempt(None, 0, self._unexpected(saga, event))
        return self._try(saga, transition, cursor)

    def _attempts_sending(self, cursor: int) -> machine.AttemptsSending:
        """The driver's mark of the attempts it was about to send: the
        ATTEMPT_SENDING events from `cursor` on written with the first (one
        transition writes all its events at one time)."""
        first = self.events[cursor]
        steps: list[str] = []
        for event in self.events[cursor:]:
            if (
                event.type != E.EVENT_TYPE_STEP_ATTEMPT_SENDING
                or event.time != first.time
                or event.step_name not in self.plan.steps
            ):
                break
            steps.append(event.step_name)
        return machine.AttemptsSending(tuple(steps))

    def _try(self, saga: SagaRecord | None, transition: machine.Transition, cursor: int) -> _Attempt:
        """How many of the transition's events the log has from `cursor` on,
        and, when not all, why."""
        for offset, made in enumerate(transition.events):
            at = cursor + offset
            if at >= len(self.events):
                return _Attempt(
                    transition, offset,
                    f"the definition would also have written {describe(made)}, which the log does not have",
                )
            stored = self.events[at]
            if not _matches(stored, made):
                if stored.step_name and stored.step_name not in self.plan.steps:
                    return _Attempt(transition, offset, self._not_in_definition(stored.step_name))
                return _Attempt(
                    transition, offset,
                    f"the log has {describe(stored)}; the definition would have written {describe(made)}"
                    + self._why_not_started(saga, transition, offset, stored),
                )
        return _Attempt(transition, len(transition.events), "")

    def _not_in_definition(self, step: str) -> str:
        hint = "" if step in self.original_names else " (if it was renamed, map it to its new name)"
        return f"step {step!r} is not in the definition{hint}"

    def _why_not_started(
        self, saga: SagaRecord | None, transition: machine.Transition, offset: int, stored: saga_pb2.SagaEvent
    ) -> str:
        """For a step the log started and the definition would not have: the
        dependencies it adds that had not succeeded then."""
        if stored.type != E.EVENT_TYPE_STEP_STARTED or stored.step_name not in self.plan.steps:
            return ""
        before = transition.saga if saga is None else saga
        done = {step.name for step in before.steps if step.state == saga_pb2.STEP_STATE_SUCCEEDED}
        for made in transition.events[:offset]:
            if made.type == E.EVENT_TYPE_STEP_SUCCEEDED:
                done.add(made.step_name)
        missing = sorted(self.plan.dependencies[stored.step_name] - done)
        if not missing:
            return ""
        pivots = [name for name in missing if self.plan.steps[name].kind == definition_pb2.STEP_KIND_PIVOT]
        if pivots:
            return (
                f" (step {stored.step_name!r} had started before the pivot {pivots[0]!r}, which the definition puts"
                " before it)"
            )
        return f" (step {stored.step_name!r} started before {', '.join(map(repr, missing))}, which it depends on there)"

    def _unexpected(self, saga: SagaRecord, event: saga_pb2.SagaEvent) -> str:
        if event.type == E.EVENT_TYPE_STEP_STARTED and event.step_name in self.plan.steps:
            return f"the definition would not have written {describe(event)} then" + self._why_not_started(
                saga, machine.Transition(saga, ()), 0, event
            )
        return f"the definition would not have written {describe(event)} then"

    def _changed_step_among(self, start: int, end: int) -> tuple[int, str] | None:
        """The first step these events touch whose participant or
        compensability the definition changed from the version it ran on."""
        for at in range(start, end):
            name = self.events[at].step_name
            if not name or name in self.checked_steps:
                continue
            self.checked_steps.add(name)
            old = self.old_steps.get(self.original_names.get(name, name))
            new = self.plan.steps[name]
            if old is None:
                continue
            if old.participant != new.participant:
                return at, (
                    f"step {name!r} ran on participant {old.participant!r}; the definition gives it to"
                    f" {new.participant!r}"
                )
            if _kind_name(old.kind) != _kind_name(new.kind):
                return at, (
                    f"step {name!r} ran as {_kind_name(old.kind)}; the definition makes it {_kind_name(new.kind)}"
                )
        return None
