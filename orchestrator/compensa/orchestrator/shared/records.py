"""The domain records: a saga, its steps and its log entries as stored, and
the saga and step states with the sets they fall into.

The machine decides on these, the engine writes them, the store persists
them and the API shows them; this module imports none of those, so each of
them can import it. What a state means (final, active, awaiting a person) is
written here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from compensa.v1 import saga_pb2

SagaState = int
StepState = int
EventType = int

RUNNING = saga_pb2.SAGA_STATE_RUNNING
COMPENSATING = saga_pb2.SAGA_STATE_COMPENSATING
SUCCEEDED = saga_pb2.SAGA_STATE_SUCCEEDED
COMPENSATED = saga_pb2.SAGA_STATE_COMPENSATED
FAILED = saga_pb2.SAGA_STATE_FAILED
#: States a saga never leaves on its own (FAILED only by a person's retry).
FINAL_SAGA_STATES: frozenset[SagaState] = frozenset({SUCCEEDED, COMPENSATED, FAILED})
#: States in which a saga is still being driven: every state but the final ones.
ACTIVE_SAGA_STATES: frozenset[SagaState] = frozenset({RUNNING, COMPENSATING})

STEP_PENDING = saga_pb2.STEP_STATE_PENDING
STEP_RUNNING = saga_pb2.STEP_STATE_RUNNING
STEP_WAITING = saga_pb2.STEP_STATE_WAITING
STEP_SUCCEEDED = saga_pb2.STEP_STATE_SUCCEEDED
STEP_FAILED = saga_pb2.STEP_STATE_FAILED
STEP_COMPENSATING = saga_pb2.STEP_STATE_COMPENSATING
STEP_COMPENSATED = saga_pb2.STEP_STATE_COMPENSATED
STEP_COMPENSATION_FAILED = saga_pb2.STEP_STATE_COMPENSATION_FAILED

E = saga_pb2  # event type constants: E.EVENT_TYPE_...

Delivery = int
#: Whether a step's Execute may have reached its participant. A call that
#: never left this orchestrator (it could not connect) has no effect to undo.
#: No attempt sent yet, or every one sent is known never to have been delivered.
DELIVERY_NONE: Delivery = 0
#: An attempt was committed as about to be sent (every earlier one never
#: delivered): after a crash nobody knows whether it went out, so it counts
#: as possibly delivered unless the very driver that committed it learns otherwise.
DELIVERY_SENDING: Delivery = 1
#: Some attempt may have reached the participant.
DELIVERY_POSSIBLE: Delivery = 2

#: The event that ends a saga in each final state.
ENDING_EVENTS: dict[SagaState, EventType] = {
    SUCCEEDED: E.EVENT_TYPE_SAGA_SUCCEEDED,
    COMPENSATED: E.EVENT_TYPE_SAGA_COMPENSATED,
    FAILED: E.EVENT_TYPE_SAGA_FAILED,
}


class HasState(Protocol):
    """A saga in any form: a SagaRecord or the API's Saga message."""

    @property
    def state(self) -> int: ...

    @property
    def resolution_note(self) -> str: ...


def awaits_a_person(saga: HasState) -> bool:
    """FAILED and nobody resolved it yet: it needs a person's retry or resolve."""
    return saga.state == FAILED and not saga.resolution_note


def done_for_good(saga: HasState) -> bool:
    """Finished and needing nobody: SUCCEEDED, COMPENSATED, or FAILED and
    resolved by a person (what retention may delete)."""
    return saga.state in FINAL_SAGA_STATES and not awaits_a_person(saga)


@dataclass(frozen=True)
class StepRecord:
    """One step of a saga as stored."""

    name: str
    state: StepState = STEP_PENDING
    attempts: int = 0  # Execute attempts that ended in a transient error
    compensate_attempts: int = 0
    output: bytes | None = None  # serialized google.protobuf.Any
    last_error: str = ""
    # The outcome of an Execute is unknown (e.g. DEADLINE_EXCEEDED): compensate
    # it if it is compensable, to be safe.
    effect_uncertain: bool = False
    delivery: Delivery = DELIVERY_NONE
    started_at: float | None = None
    finished_at: float | None = None
    # When the next attempt is due (backoff), or when a WAITING step times out.
    next_attempt_at: float | None = None
    # The name its idempotency key and completion token were made with, when
    # a move to another version renamed the step ("" : its own name). The
    # participant's barrier knows the step by that key, so the key outlives
    # the rename: a compensation after it undoes what the Execute did.
    idempotency_name: str = ""

    @property
    def key_name(self) -> str:
        """The name its idempotency key is made with."""
        return self.idempotency_name or self.name


@dataclass(frozen=True)
class SagaRecord:
    """A saga as stored: its row plus its steps in definition order."""

    saga_id: str
    definition_name: str
    definition_version: int
    state: SagaState
    sequence: int
    input: bytes  # serialized google.protobuf.Any
    created_at: float
    updated_at: float
    steps: tuple[StepRecord, ...]
    failure_reason: str = ""
    resolution_note: str = ""
    # W3C traceparent of the saga's trace; None when it is not traced.
    trace_parent: str | None = None

    def step(self, name: str) -> StepRecord:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def step_keyed(self, key_name: str) -> StepRecord | None:
        """The step whose idempotency key (and completion token) is made
        with `key_name`: its own name, or the one it had before a rename."""
        for step in self.steps:
            if step.key_name == key_name:
                return step
        return None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_SAGA_STATES


@dataclass(frozen=True)
class LogEvent:
    """An entry for the saga's event log, produced by a transition."""

    sequence: int
    type: EventType
    time: float
    saga_state: SagaState
    step_name: str = ""
    step_state: StepState = saga_pb2.STEP_STATE_UNSPECIFIED
    attempt: int = 0
    message: str = ""
    actor: str = ""


def takeover_event(saga: SagaRecord, *, by: str, previous: str, why: str, now: float) -> LogEvent:
    """The log entry of replica `by` taking `saga` over from replica
    `previous`, numbered after the saga's latest event."""
    return LogEvent(
        sequence=saga.sequence + 1,
        type=E.EVENT_TYPE_TAKEN_OVER,
        time=now,
        saga_state=saga.state,
        message=f"replica {by} took the saga over from replica {previous}: {why}",
        actor=by,
    )
