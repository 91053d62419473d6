"""Moving a saga in flight to another version of its definition (the bulk
action MOVE, after `compensa plan`).

Each saga is classified again at the moment of its move, from its log as
stored then (migration_plan.classify), and moved only if COMPATIBLE, or
COMPATIBLE_WITH_MAPPING under the job's mapping; anything else is refused
with the first diverging event and the reason. Each move is a write
guarded like every write by the saga's sequence (a saga that changed since
it was read is not moved); a batch of moves is one transaction.

Why only a saga no replica holds. A replica holds a saga while a call of it
is in flight or due, and releases it while it waits (a retry backoff, a
long-running step waiting for CompleteStep, its concurrency key's turn).
Moving a held saga would fence its driver: the answer of the call in flight
would be dropped and the call made again under the new version. Its
idempotency key would be the same, so the participant's barrier would answer
without a second effect, but the call would be repeated. So the write is also
guarded on no replica holding the saga: one held, or claimed between the read
and the write, is skipped ("a call is in flight"), and a later job with the
same filter moves it once it waits. No call is repeated or lost, at the price
of a second job for the sagas that were busy.

What a move changes: the saga's version; its steps (renamed by the mapping,
the new version's new steps PENDING, in the new version's order, each with
its state, attempts and output); its due time under the new version; and a
SAGA_MOVED event naming both versions, the renames, the job and who started
it. A renamed step keeps the name its idempotency key and completion token
were made with (StepRecord.idempotency_name): its participant's barrier
knows it by that key, so a compensation after the move undoes the Execute
made before it, and a CompleteStep with a token issued before the move still
finds the step. The epoch is bumped, fencing any driver that still thinks it
holds the saga. Drivers load the plan of the saga's version when they start,
and the engine keeps plans by (name, version), so the saga's next driver, on
any replica, runs the new version: nothing cached needs dropping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.engine import SagaEngine
from compensa.orchestrator.engine.messages import event_message, saga_message
from compensa.orchestrator.engine.migration_plan import INCOMPATIBLE, classify
from compensa.orchestrator.engine.replay import Move, history_of, moved_message
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.errors import CompensaError, FailedPrecondition, NotFound, saga_not_found
from compensa.orchestrator.store import SagaMove, SagaStore, StoredEvent
from compensa.v1 import orchestrator_pb2, saga_pb2

__all__ = ["Chosen", "NotMoved", "Outcome", "move_sagas", "moved_saga", "read_history"]

# Events read per query when a saga's log is read whole.
_READ_BATCH = 500


class NotMoved(Exception):
    """The saga stays on its version for now, for a reason that is no
    refusal: a call of it is in flight, or it is on that version already."""


async def read_history(store: SagaStore, saga: records.SagaRecord, plan: machine.Plan) -> orchestrator_pb2.SagaHistory:
    """The saga as stored, its log up to its sequence, and its version (`plan`)."""
    events: list[saga_pb2.SagaEvent] = []
    while len(events) < saga.sequence:
        batch = await store.read_saga_events(saga.saga_id, len(events), _READ_BATCH)
        events.extend(event_message(stored) for stored in batch if stored.event.sequence <= saga.sequence)
        if len(batch) < _READ_BATCH:
            break
    return history_of(saga_message(saga, plan), events, plan.definition)


def moved_saga(
    saga: records.SagaRecord, to: machine.Plan, renames: Mapping[str, str], now: float
) -> records.SagaRecord:
    """`saga` under version `to` (its steps renamed by `renames`), one event
    later; FailedPrecondition if a step that ran has no place there, or two
    steps would share a name."""
    steps: dict[str, records.StepRecord] = {}
    for step in saga.steps:
        name = renames.get(step.name, step.name)
        if name in steps:
            raise FailedPrecondition(
                f"the mapping gives two steps the name {name!r}: this saga has a step {name!r} of its own"
            )
        steps[name] = step
    left = [name for name, step in steps.items() if name not in to.steps and step.state != records.STEP_PENDING]
    if left:
        raise FailedPrecondition(f"step {left[0]!r} ran, and version {to.definition.version} has no such step")
    moved = []
    for name in to.order:
        kept = steps.get(name)
        if kept is None:
            moved.append(records.StepRecord(name=name))
            continue
        key_name = kept.key_name
        moved.append(dataclasses.replace(kept, name=name, idempotency_name="" if key_name == name else key_name))
    return dataclasses.replace(
        saga, definition_version=to.definition.version, sequence=saga.sequence + 1, updated_at=now, steps=tuple(moved)
    )


def _held(holder: str, lease_until: float | None, now: float) -> NotMoved:
    if lease_until is not None and lease_until > now:
        return NotMoved(f"a call is in flight (replica {holder} holds the saga); run the job again once it waits")
    return NotMoved(
        f"replica {holder} held the saga and its lease expired (a call may be in flight); another replica takes it"
        " over: run the job again once it waits"
    )


#: A saga to move: its id, the sequence it was selected at, and the saga with
#: its holder as just read (None: not found).
Chosen = tuple[str, int, tuple[records.SagaRecord, str | None, float | None] | None]
#: What became of one: the saga moved; None when it is no longer at the
#: selected sequence (or changed before the write landed); NotMoved (a
#: replica holds it, or it is on the version already), FailedPrecondition
#: (incompatible, with the first diverging event and the reason) or NotFound.
Outcome = records.SagaRecord | None | CompensaError | NotMoved


async def move_sagas(
    engine: SagaEngine,
    chosen: Sequence[Chosen],
    *,
    to: machine.Plan,
    renames: Mapping[str, str],
    actor: str,
    text: str,
) -> list[Outcome]:
    """Moves each chosen saga to version `to` if its log as stored now
    replays under it, its steps renamed by `renames`; the event names `actor`
    and ends with `text` (the job's tag and note). The logs are read in one
    query and the moves written in one transaction (each guarded on its own):
    a batch costs a few round trips, not a few per saga. What became of each,
    in order; StoreUnavailable when the database did not answer (whether the
    write landed is then unknown)."""
    outcomes: list[Outcome] = []
    planned: dict[str, tuple[int, records.SagaRecord]] = {}
    now = engine.clock.now()
    for saga_id, expected_sequence, loaded in chosen:
        outcomes.append(_before_reading(saga_id, expected_sequence, loaded, to, now))
        if outcomes[-1] is None and loaded is not None and loaded[0].sequence == expected_sequence:
            planned[saga_id] = (len(outcomes) - 1, loaded[0])
    logs = await engine.store.read_saga_logs(list(planned)) if planned else {}
    moves: list[tuple[int, SagaMove]] = []
    for saga_id, (index, saga) in planned.items():
        try:
            moves.append((index, await _move_of(engine, saga, logs.get(saga_id, []), to, renames, actor, text, now)))
        except (FailedPrecondition, NotFound) as refused:
            outcomes[index] = refused
    written = await engine.store.move_sagas([move for _, move in moves]) if moves else []
    missed: dict[str, int] = {}
    for (index, move), stored in zip(moves, written, strict=True):
        if stored is None:
            missed[move.saga.saga_id] = index
            continue
        outcomes[index] = move.saga
        engine.logged_outside([stored], move.due_at)
    if missed:
        # A guard that failed: the saga changed, or a replica claimed it
        # between the read and the write (then it is held, sequence unmoved).
        again = await engine.store.load_many_with_owner(list(missed))
        for saga_id, index in missed.items():
            current = again.get(saga_id)
            if current is not None and current[0].sequence == chosen[index][1] and current[1] is not None:
                outcomes[index] = _held(current[1], current[2], engine.clock.now())
    return outcomes


def _before_reading(
    saga_id: str,
    expected_sequence: int,
    loaded: tuple[records.SagaRecord, str | None, float | None] | None,
    to: machine.Plan,
    now: float,
) -> Outcome:
    """What becomes of a saga before its log is read: None to read it (or,
    when its sequence moved, to say it changed)."""
    if loaded is None:
        return saga_not_found(saga_id)
    saga, holder, lease_until = loaded
    if saga.sequence != expected_sequence:
        return None
    if saga.definition_version == to.definition.version:
        return NotMoved(f"nothing to do: the saga runs version {to.definition.version} already")
    if holder is not None:
        return _held(holder, lease_until, now)
    return None


async def _move_of(
    engine: SagaEngine,
    saga: records.SagaRecord,
    log: Sequence[StoredEvent],
    to: machine.Plan,
    renames: Mapping[str, str],
    actor: str,
    text: str,
    now: float,
) -> SagaMove:
    """The move of `saga` (its log as read) to `to`; FailedPrecondition when
    its log does not replay there."""
    plan = await engine.plan_for(saga.definition_name, saga.definition_version)
    events = [event_message(stored) for stored in log if stored.event.sequence <= saga.sequence]
    verdict = classify(history_of(saga_message(saga, plan), events, plan.definition), to, renames)
    version = to.definition.version
    if verdict.verdict == INCOMPATIBLE:
        at = f" at event {verdict.diverging_sequence}" if verdict.diverging_sequence else ""
        raise FailedPrecondition(f"incompatible with version {version}{at}: {verdict.reason}")
    moved = moved_saga(saga, to, renames, now)
    used = {step.name: renames[step.name] for step in saga.steps if step.name in renames}
    event = records.LogEvent(
        sequence=moved.sequence,
        type=records.E.EVENT_TYPE_SAGA_MOVED,
        time=now,
        saga_state=saga.state,
        message=moved_message(Move(saga.definition_version, version, used), text),
        actor=actor,
    )
    due_at = now if machine.due_calls(to, moved, now) else machine.wake_at(to, moved)
    return SagaMove(moved, event, saga.sequence, due_at)
