"""Moving a saga in flight to another version of its definition (the bulk
action MOVE, after `compensa plan`).

Each saga is classified again at the moment of its move, from its log as
stored then (migration_plan.classify), and moved only if COMPATIBLE, or
COMPATIBLE_WITH_MAPPING under the job's mapping; anything else is refused
with the first diverging event and the reason. The move is one write,
guarded like every write by the saga's sequence: a saga that changed since
it was read is not moved.

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
from collections.abc import Mapping

from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.engine import SagaEngine
from compensa.orchestrator.engine.messages import event_message, saga_message
from compensa.orchestrator.engine.migration_plan import INCOMPATIBLE, classify
from compensa.orchestrator.engine.replay import Move, history_of, moved_message
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.errors import FailedPrecondition, saga_not_found
from compensa.orchestrator.store import SagaMove, SagaStore
from compensa.v1 import orchestrator_pb2, saga_pb2

__all__ = ["NotMoved", "move_saga", "moved_saga", "read_history"]

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


async def move_saga(
    engine: SagaEngine,
    saga_id: str,
    *,
    to: machine.Plan,
    renames: Mapping[str, str],
    expected_sequence: int,
    actor: str,
    text: str,
    loaded: tuple[records.SagaRecord, str | None, float | None] | None = None,
) -> records.SagaRecord | None:
    """Moves the saga to version `to` if its log as stored now replays under
    it: the saga moved, or None when it is no longer at `expected_sequence`
    (or changed before the write landed). NotMoved when a replica holds it
    or it is on `to` already; FailedPrecondition, with the first diverging
    event and the reason, when it is not compatible; NotFound when it is
    gone. `loaded` is the saga with its holder as just read, if it was."""
    loaded = loaded or await engine.store.load_with_owner(saga_id)
    if loaded is None:
        raise saga_not_found(saga_id)
    saga, holder, lease_until = loaded
    if saga.sequence != expected_sequence:
        return None
    version = to.definition.version
    if saga.definition_version == version:
        raise NotMoved(f"nothing to do: the saga runs version {version} already")
    now = engine.clock.now()
    if holder is not None:
        raise _held(holder, lease_until, now)
    plan = await engine.plan_for(saga.definition_name, saga.definition_version)
    verdict = classify(await read_history(engine.store, saga, plan), to.definition, renames)
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
    stored = await engine.store.move_saga(SagaMove(moved, event, expected_sequence, due_at))
    if stored is None:
        again = await engine.store.load_with_owner(saga_id)
        if again is not None and again[0].sequence == expected_sequence and again[1] is not None:
            raise _held(again[1], again[2], engine.clock.now())
        return None
    engine.logged_outside([stored], due_at)
    return moved
