"""Bulk actions run by the server: durable jobs that apply one operator
action to every saga a filter selected.

A job is a row leased like a saga (owner, lease_until, epoch; jobs.py, shared
with the audit's jobs), and the sagas
it selected are rows too, each with the sequence the saga had then. A
replica's `BulkRunner` claims a RUNNING job nobody holds and works through its
pending sagas at a bounded rate; if the replica dies, its lease lapses and
another replica claims the job and carries on. Each batch runs only while the
job is RUNNING and held by this replica at its epoch, and a pause, cancel or
takeover waits for the batch in flight (`SagaStore.run_bulk_batch`): once one
has returned, the job acts on no more sagas and its counts stay put.

No saga is acted on twice, and none from a stale view: each action is the
engine's operator path (`apply_external_once`), guarded on the sequence the
saga had when it was selected, and the event it writes names the job. So an
action lands at most once per job; a saga whose sequence moved is either one
this job already acted on (its event is right after the selected sequence:
done, e.g. when the replica died before recording the outcome) or one that
changed meanwhile (skipped, with what changed it). Two jobs that selected the
same saga cannot both act on it: the first write moves the sequence the
second one is guarded on.

Adding an action kind is an entry in `_ACTIONS` (how it acts on a batch of
sagas: for each, a write guarded on the selected sequence whose event's
message begins with `bulk_tag`, as `_operator_action` makes for the operator
actions, or names it after the move, as MOVE's does) and one in
selection.py's `_APPLIES_TO` (which sagas it applies to).

The sagas of a batch are read in one query. An operator action then decides
on each saga as read and writes it through the engine's group commit; a MOVE
reads the batch's logs in one query and writes its moves in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.engine import SagaEngine
from compensa.orchestrator.engine.jobs import keep_lease
from compensa.orchestrator.engine.migration import NotMoved, move_sagas
from compensa.orchestrator.engine.replay import read_move
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.errors import CompensaError, FailedPrecondition, NotFound, StoreUnavailable, quote
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import BulkItem, BulkJob, SagaStore
from compensa.v1 import bulk_pb2, saga_pb2

__all__ = [
    "JOB_COMMANDS", "BulkRunner", "bulk_action_message", "bulk_item_message", "bulk_tag", "command_bulk_job",
    "is_bulk_event",
]

log = logging.getLogger("compensa.bulk")

DONE = bulk_pb2.BULK_ITEM_OUTCOME_DONE
SKIPPED = bulk_pb2.BULK_ITEM_OUTCOME_SKIPPED
FAILED = bulk_pb2.BULK_ITEM_OUTCOME_FAILED

#: A saga with its holder and lease, as read for a batch (None: not found).
Loaded = tuple[records.SagaRecord, str | None, float | None] | None
#: What an action did to one saga: the saga after (unchanged when there was
#: nothing to do); None when the saga is no longer at the selected sequence;
#: or the error that stopped it (NotMoved: skipped, with its reason;
#: StoreUnavailable: left pending, whether it landed is learnt next time).
Acted = records.SagaRecord | None | Exception
#: How an action acts on a batch of sagas, each as read for the batch: what
#: it did to each, in order.
BatchAction = Callable[[SagaEngine, BulkJob, list[tuple[BulkItem, Loaded]]], Awaitable[list[Acted]]]


def _operator_action(event_of: Callable[[str, str], machine.Event]) -> BatchAction:
    """An operator action through the engine on each saga, `_CONCURRENCY` at
    once, by (who started the job, the job's text)."""

    async def act(engine: SagaEngine, job: BulkJob, chosen: list[tuple[BulkItem, Loaded]]) -> list[Acted]:
        slots = asyncio.Semaphore(_CONCURRENCY)
        event = event_of(job.started_by, event_text(job))

        async def one(item: BulkItem, loaded: Loaded) -> Acted:
            async with slots:
                try:
                    return await engine.apply_external_once(
                        item.saga_id, event, expected_sequence=item.selected_sequence, reconnect=False, loaded=loaded
                    )
                except Exception as error:  # the outcome of this saga alone
                    return error

        return list(await asyncio.gather(*(one(item, loaded) for item, loaded in chosen)))

    return act


async def _move(engine: SagaEngine, job: BulkJob, chosen: list[tuple[BulkItem, Loaded]]) -> list[Acted]:
    """MOVE: each saga to the job's version, if its log as stored now replays under it."""
    to = await engine.plan_for(job.definition_name, job.to_version)
    outcomes = await move_sagas(
        engine, [(item.saga_id, item.selected_sequence, loaded) for item, loaded in chosen],
        to=to, renames=job.renames, actor=job.started_by, text=event_text(job),
    )
    return list(outcomes)


_ACTIONS: dict[int, BatchAction] = {
    bulk_pb2.BULK_ACTION_KIND_CANCEL: _operator_action(
        lambda actor, text: machine.CancelRequested(actor=actor, reason=text)
    ),
    bulk_pb2.BULK_ACTION_KIND_RETRY: _operator_action(
        lambda actor, text: machine.RetryRequested(actor=actor, reason=text)
    ),
    bulk_pb2.BULK_ACTION_KIND_RESOLVE: _operator_action(
        lambda actor, text: machine.ResolveRequested(actor=actor, note=text)
    ),
    bulk_pb2.BULK_ACTION_KIND_RETRY_NOW: _operator_action(
        lambda actor, text: machine.RetryNowRequested(actor=actor, reason=text)
    ),
    bulk_pb2.BULK_ACTION_KIND_MOVE: _move,
}

# Replicas look for jobs to claim this often.
_POLL_SECONDS = 1.0
# At most this many jobs run at once on one replica.
_MAX_JOBS = 4
# Sagas read per batch, and acted on at once within one.
_BATCH = 100
_CONCURRENCY = 32
# A job's outcomes events are read this far past the selected sequence (a
# TAKEN_OVER event may come before the job's own).
_EVENTS_AFTER_SELECTION = 3


def bulk_tag(bulk_action_id: str) -> str:
    """How the events of a job name it: "bulk action ID"."""
    return f"bulk action {bulk_action_id}"


def event_text(job: BulkJob) -> str:
    """The reason (or note) the job writes on each saga: its tag, then the note."""
    tag = bulk_tag(job.bulk_action_id)
    return f"{tag}: {job.note}" if job.note else tag


def is_bulk_event(event: records.LogEvent, bulk_action_id: str) -> bool:
    """Whether `event` is the action of job `bulk_action_id`."""
    tag = bulk_tag(bulk_action_id)
    text = event.message
    if event.type == records.E.EVENT_TYPE_SAGA_MOVED:
        moved = read_move(text)
        text = moved[1] if moved is not None else ""
    return text == tag or text.startswith(tag + ": ")


class BulkRunner:
    """Claims RUNNING bulk actions nobody holds and works through them, on
    the engine's operator path."""

    def __init__(self, engine: SagaEngine) -> None:
        self._engine = engine
        self._store = engine.store
        self._lease_seconds = engine.config.lease_seconds
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._claim_jobs(), name="compensa-bulk")

    async def stop(self) -> None:
        """Stops working; the jobs held are released so another replica takes them at once."""
        tasks = [task for task in (self._task, *self._jobs.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim_jobs(self) -> None:
        while True:
            try:
                while len(self._jobs) < _MAX_JOBS:
                    now = self._engine.clock.now()
                    job = await self._store.claim_bulk_job(self._engine.owner, now, now + self._lease_seconds)
                    if job is None:
                        break
                    log.info("bulk action %s: working on it (%d pending)", job.bulk_action_id, job.pending)
                    task = asyncio.create_task(self._work(job), name=f"bulk-{job.bulk_action_id}")
                    self._jobs[job.bulk_action_id] = task
                    task.add_done_callback(functools.partial(self._ended, job.bulk_action_id))
            except StoreUnavailable as error:
                log.debug("bulk actions: %s", error)
            await asyncio.sleep(_POLL_SECONDS)

    def _ended(self, bulk_action_id: str, task: asyncio.Task[None]) -> None:
        # Not a newer task of the same job (claimed again after this one lost it).
        if self._jobs.get(bulk_action_id) is task:
            del self._jobs[bulk_action_id]

    async def _work(self, job: BulkJob) -> None:
        renewing = asyncio.create_task(self._renew(job))
        try:
            batch = max(1, min(_BATCH, int(job.max_per_second)))
            while True:
                started = time.monotonic()
                # A batch is at most a second's worth: the rate holds at every second.
                acted_on = await self._store.run_bulk_batch(
                    job.bulk_action_id, self._engine.owner, job.epoch, batch,
                    functools.partial(self._act_on_batch, job),
                )
                if acted_on is None:
                    log.info("bulk action %s: stopped here (paused, cancelled, or taken over)", job.bulk_action_id)
                    return
                if not acted_on:
                    if await self._store.complete_bulk_job(
                        job.bulk_action_id, self._engine.owner, job.epoch, self._engine.clock.now()
                    ):
                        log.info("bulk action %s: completed", job.bulk_action_id)
                    return
                # The rate bounds the actions, however fast the database answers.
                await asyncio.sleep(max(0.0, acted_on / job.max_per_second - (time.monotonic() - started)))
        except StoreUnavailable as error:
            log.warning("bulk action %s: %s; another try after its lease", job.bulk_action_id, error)
        except asyncio.CancelledError:
            with contextlib.suppress(StoreUnavailable):
                await self._store.release_bulk_job(job.bulk_action_id, self._engine.owner, job.epoch)
            raise
        except Exception:
            log.exception("bulk action %s: crashed; it is picked up again when its lease expires", job.bulk_action_id)
        finally:
            renewing.cancel()

    async def _renew(self, job: BulkJob) -> None:
        """Keeps the job's lease while the job runs here (a batch learns
        itself whether the job is still its to run)."""

        async def renew() -> bool:
            return await self._store.renew_bulk_job(
                job.bulk_action_id, self._engine.owner, job.epoch, self._engine.clock.now() + self._lease_seconds
            )

        await keep_lease(renew, self._lease_seconds, None, log, f"bulk action {job.bulk_action_id}")

    async def _act_on_batch(
        self, job: BulkJob, items: list[BulkItem]
    ) -> tuple[list[tuple[str, int, str]], float]:
        """Acts on the batch's sagas; their outcomes, and when."""
        loaded = await self._store.load_many_with_owner([item.saga_id for item in items])
        # A saga whose sequence moved since selection is not acted on.
        chosen = [
            (item, found) for item in items
            if (found := loaded.get(item.saga_id)) is None or found[0].sequence == item.selected_sequence
        ]
        try:
            acted = dict(zip(
                (item.saga_id for item, _ in chosen), await _ACTIONS[job.kind](self._engine, job, chosen), strict=True
            ))
        except StoreUnavailable as error:  # none acted on: all stay pending
            acted = {item.saga_id: error for item, _ in chosen}
        outcomes = [
            outcome for item in items
            if (outcome := await self._outcome(job, item, acted.get(item.saga_id))) is not None
        ]
        return outcomes, self._engine.clock.now()

    async def _outcome(self, job: BulkJob, item: BulkItem, acted: Acted) -> tuple[str, int, str] | None:
        """The outcome of acting on one saga; None to leave it pending (the
        database did not answer: whether the write landed is learnt next time)."""
        match acted:
            case None:
                return await self._changed(job, item)
            case StoreUnavailable():
                return None
            case NotMoved():
                return item.saga_id, SKIPPED, str(acted)
            case NotFound():
                return item.saga_id, SKIPPED, "the saga no longer exists (deleted by retention)"
            case CompensaError():  # refused, e.g. a cancel past the pivot, a move to an incompatible version
                return item.saga_id, FAILED, str(acted)
            case Exception():  # one saga's bug must not stall the job on every replica
                log.error(
                    "bulk action %s: acting on saga %s failed", job.bulk_action_id, item.saga_id, exc_info=acted
                )
                return item.saga_id, FAILED, f"internal error: {type(acted).__name__}"
        if acted.sequence == item.selected_sequence:
            return item.saga_id, SKIPPED, f"nothing to do: the saga is {saga_state_name(acted.state)}"
        return item.saga_id, DONE, ""

    async def _changed(self, job: BulkJob, item: BulkItem) -> tuple[str, int, str] | None:
        """A saga whose sequence moved since selection: done if this job moved it, else skipped."""
        try:
            after = await self._store.read_saga_events(item.saga_id, item.selected_sequence, _EVENTS_AFTER_SELECTION)
        except StoreUnavailable:
            return None
        if any(is_bulk_event(stored.event, job.bulk_action_id) for stored in after):
            return item.saga_id, DONE, ""
        reason = f"changed since it was selected at sequence {item.selected_sequence}"
        if after:
            first = after[0].event
            what = saga_pb2.EventType.Name(first.type).removeprefix("EVENT_TYPE_")  # type: ignore[arg-type]
            reason += f": {what}" + (f" by {first.actor}" if first.actor else "")
        return item.saga_id, SKIPPED, reason


#: What each command of a person does to a job: the states it applies in, and
#: the state it leaves the job in.
JOB_COMMANDS: dict[str, tuple[frozenset[int], int]] = {
    "pause": (frozenset({bulk_pb2.BULK_ACTION_STATE_RUNNING}), bulk_pb2.BULK_ACTION_STATE_PAUSED),
    "resume": (frozenset({bulk_pb2.BULK_ACTION_STATE_PAUSED}), bulk_pb2.BULK_ACTION_STATE_RUNNING),
    "cancel": (
        frozenset({bulk_pb2.BULK_ACTION_STATE_RUNNING, bulk_pb2.BULK_ACTION_STATE_PAUSED}),
        bulk_pb2.BULK_ACTION_STATE_CANCELLED,
    ),
}


async def command_bulk_job(store: SagaStore, job: BulkJob, command: str, now: float) -> BulkJob:
    """The job after `command` (a key of JOB_COMMANDS): already in the state
    it leads to is a no-op, any state it does not apply in FailedPrecondition.
    A pause or cancel returns once a batch in flight has ended: from then on
    the job acts on no saga."""
    allowed_from, to = JOB_COMMANDS[command]
    moved, changed = await store.change_bulk_job_state(job.bulk_action_id, allowed_from=allowed_from, to=to, now=now)
    assert moved is not None  # jobs are never deleted
    if not changed and moved.state != to:
        state = bulk_pb2.BulkActionState.Name(moved.state).removeprefix("BULK_ACTION_STATE_")  # type: ignore[arg-type]
        raise FailedPrecondition(f"bulk action {quote(job.bulk_action_id)} is {state}; it cannot {command}")
    return moved


def bulk_action_message(job: BulkJob) -> bulk_pb2.BulkAction:
    """The API's view of a job."""
    return bulk_pb2.BulkAction(
        bulk_action_id=job.bulk_action_id, kind=job.kind,  # type: ignore[arg-type]
        filter=job.filter, selection=bulk_pb2.SagaFilter.FromString(job.selection), note=job.note,
        started_by=job.started_by, state=job.state,  # type: ignore[arg-type]
        selected_count=job.selected, done_count=job.done, skipped_count=job.skipped, failed_count=job.failed,
        pending_count=job.pending, max_sagas_per_second=job.max_per_second,
        create_time=timestamp(job.created_at), update_time=timestamp(job.updated_at),
        replica=job.owner or "",
        to_version=job.to_version,
        step_mappings=[bulk_pb2.StepMapping(old_step=old, new_step=new) for old, new in job.renames.items()],
    )


def bulk_item_message(item: BulkItem) -> bulk_pb2.BulkActionItem:
    """The API's view of what a job did to one saga."""
    return bulk_pb2.BulkActionItem(
        saga_id=item.saga_id, outcome=item.outcome, reason=item.reason, time=timestamp(item.acted_at),  # type: ignore[arg-type]
    )
