"""The SQL store on SQLite and PostgreSQL: guarded writes, fencing, claiming, the log.

Writes are made the way engine.py makes them: a machine transition wrapped in a
SagaWrite guarded by the expected sequence and the writer's epoch. Times are
explicit numbers; nothing waits on the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from harness import log_caught_up

import compensa.checkout.v1.checkout_pb2  # noqa: F401  (registers the definitions' input_type)
from compensa.examples import DEFINITIONS_DIR
from compensa.orchestrator.definitions import definition_fingerprint, load_definition_file
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.machine import Plan, Transition
from compensa.orchestrator.engine.migration import moved_saga
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.records import SagaRecord
from compensa.orchestrator.store import (
    PARTICIPANT_RECOVERED,
    PARTICIPANT_UNHEALTHY,
    SAGA_ALERT,
    PostgresSagaStore,
    SagaMove,
    SagaWrite,
    SqlSagaStore,
    StoredEvent,
    WriteResult,
    open_store,
)
from compensa.orchestrator.store.schema import saga_steps as saga_steps_table
from compensa.orchestrator.store.schema import sagas as sagas_table
from compensa.v1 import definition_pb2, saga_pb2

S = saga_pb2
DEFINITIONS = DEFINITIONS_DIR
T0 = 1_000_000.0
LEASE = 30.0

CHECKOUT = load_definition_file(DEFINITIONS / "checkout.yaml")
PARALLEL = load_definition_file(DEFINITIONS / "checkout-parallel.yaml")


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlSagaStore]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/s.db"
    else:
        url = request.getfixturevalue("make_postgres_url")()
    opened = open_store(url)
    await opened.ensure_schema()
    try:
        yield opened
    finally:
        await opened.close()


async def _postgres_stores(make_postgres_url: Callable[[], str], count: int) -> list[SqlSagaStore]:
    """`count` stores (separate engines and connections) on one fresh database."""
    url = make_postgres_url()
    stores = [open_store(url) for _ in range(count)]
    await stores[0].ensure_schema()
    return stores


async def _close(stores: list[SqlSagaStore]) -> None:
    for opened in stores:
        await opened.close()


# --- writes made as the engine makes them ----------------------------------------------


async def _plan(store: SqlSagaStore, definition: definition_pb2.SagaDefinition = CHECKOUT) -> Plan:
    stored, _ = await store.register_definition(definition, definition_fingerprint(definition), T0)
    return Plan.of(stored)


def _write(
    transition: Transition,
    expected: int,
    *,
    epoch: int | None,
    owner: str = "replica-a",
    now: float = T0,
    release: bool = False,
    due_at: float | None = None,
    fingerprint: str | None = None,
) -> SagaWrite:
    return SagaWrite(
        saga=transition.saga,
        events=transition.events,
        expected_sequence=expected,
        owner=owner,
        epoch=epoch,
        release=release,
        due_at=now if due_at is None and not release else due_at,
        lease_until=now + LEASE,
        changed_steps=transition.changed_steps,
        request_fingerprint=fingerprint,
    )


async def _create(
    store: SqlSagaStore,
    plan: Plan,
    saga_id: str,
    *,
    now: float = T0,
    owner: str = "replica-a",
    release: bool = False,
    due_at: float | None = None,
) -> SagaRecord:
    transition = machine.new_saga(plan, saga_id=saga_id, input=b"input-" + saga_id.encode(), now=now)
    (result,) = await store.commit([
        _write(
            transition, 0, epoch=1, owner=owner, now=now, release=release, due_at=due_at, fingerprint=f"fp-{saga_id}"
        )
    ])
    assert result.ok and result.epoch == 1
    return transition.saga


def _succeed_first(plan: Plan, saga: SagaRecord, now: float) -> Transition:
    call = machine.due_calls(plan, saga, now)[0]
    return machine.decide(plan, saga, machine.ExecuteSucceeded(call.step, b"out"), now)


async def _finish(store: SqlSagaStore, plan: Plan, saga: SagaRecord, now: float, epoch: int = 1) -> SagaRecord:
    """Drives `saga` to SUCCEEDED, committing every transition; the final write releases it."""
    while not saga.is_final:
        transition = _succeed_first(plan, saga, now)
        final = transition.saga.is_final
        (result,) = await store.commit([
            _write(transition, saga.sequence, epoch=epoch, now=now, release=final, due_at=None)
        ])
        assert result.ok
        saga = transition.saga
    return saga


async def _all_events(store: SqlSagaStore, saga_id: str) -> list[StoredEvent]:
    return await store.read_saga_events(saga_id, 0, 1000)


def _increasing(positions: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(positions))


async def _column(store: SqlSagaStore, saga_id: str, column: str) -> object:
    async with store.engine.connect() as conn:
        return (
            await conn.execute(sa.select(sagas_table.c[column]).where(sagas_table.c.saga_id == saga_id))
        ).scalar_one()


# --- create ----------------------------------------------------------------------------------------


async def test_a_creating_write_inserts_the_saga_its_steps_and_its_first_events(store: SqlSagaStore) -> None:
    plan = await _plan(store, PARALLEL)
    created = await _create(store, plan, "s1")
    loaded = await store.load_saga("s1")
    assert loaded == created
    assert await store.load_start("s1") == (created, "fp-s1")
    assert [step.name for step in loaded.steps] == list(plan.order)
    assert loaded.step("fraud_check").state == S.STEP_STATE_RUNNING
    events = await _all_events(store, "s1")
    assert [(e.event.sequence, e.event.type, e.event.step_name) for e in events] == [
        (1, S.EVENT_TYPE_SAGA_STARTED, ""),
        (2, S.EVENT_TYPE_STEP_STARTED, "reserve_stock"),
        (3, S.EVENT_TYPE_STEP_STARTED, "fraud_check"),
    ]
    first = events[0].position
    assert [e.position for e in events] == [first, first + 1, first + 2]  # one transaction's, in order
    assert {e.definition_name for e in events} == {"checkout-parallel"}
    await log_caught_up(store)
    assert await store.head_position() >= events[-1].position
    assert await store.read_log(events[-1].position, 10) == []


async def test_second_create_with_the_same_id_writes_nothing(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    first = await _create(store, plan, "s1")
    again = machine.new_saga(plan, saga_id="s1", input=b"other input", now=T0 + 50)
    # As the engine does: the write does not land, and the saga that holds the id is read back.
    assert await store.commit([_write(again, 0, epoch=1, now=T0 + 50, fingerprint="fp-other")]) == [
        WriteResult(ok=False)
    ]
    saga, fingerprint = await store.load_start("s1") or pytest.fail("missing")
    assert fingerprint == "fp-s1"
    assert saga == first
    assert saga.input == b"input-s1"
    await log_caught_up(store)
    assert await store.read_log(0, 100) == await _all_events(store, "s1")
    assert len(await _all_events(store, "s1")) == 2
    assert await store.load_saga("s1") == first


async def test_read_log_pages_by_position_and_filters(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    parallel = await _plan(store, PARALLEL)
    await _create(store, plan, "s1")
    await _create(store, parallel, "s2")
    await _finish(store, plan, (await store.load_saga("s1")) or pytest.fail("s1 missing"), T0 + 1)
    await log_caught_up(store)
    everything = await store.read_log(0, 1000)
    assert _increasing([e.position for e in everything])
    assert len(everything) == sum([len(await _all_events(store, saga_id)) for saga_id in ("s1", "s2")])
    assert everything[-1].position <= await store.head_position()
    paged: list[StoredEvent] = []
    while page := await store.read_log(paged[-1].position if paged else 0, 4):
        assert len(page) <= 4
        paged.extend(page)
    assert paged == everything
    only_parallel = await store.read_log(0, 1000, definition_name="checkout-parallel")
    assert {e.saga_id for e in only_parallel} == {"s2"} and len(only_parallel) == 3
    succeeded = await store.read_log(0, 1000, saga_state=records.SUCCEEDED)
    assert [e.event.type for e in succeeded] == [S.EVENT_TYPE_SAGA_SUCCEEDED]


async def test_a_read_of_the_log_may_leave_out_transactions_the_reader_has(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    first = await _create(store, plan, "s1")
    await _create(store, plan, "s2")
    await log_caught_up(store)
    everything = await store.read_log_page(0, 100)
    first_transaction = store.transaction_positions(everything.events[0].position)
    assert {event.saga_id for event in everything.events if event.position in first_transaction} == {first.saga_id}
    page = await store.read_log_page(0, 100, skipping=[first_transaction.start])
    if isinstance(store, PostgresSagaStore):
        assert [event.saga_id for event in page.events] == ["s2", "s2"]
    else:  # it may return them: the reader has them anyway
        assert page.events == everything.events
    assert page.horizon >= everything.horizon


async def test_read_events_finds_the_events_at_given_keys(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    await _create(store, plan, "s1")
    await _create(store, plan, "s2")
    await log_caught_up(store)
    everything = {(e.saga_id, e.event.sequence): e for e in await store.read_log(0, 1000)}
    keys = [("s1", 2), ("s2", 1), ("s2", 99), ("nobody", 1)]
    found = await store.read_events(keys)
    assert sorted(found, key=lambda e: e.position) == [everything[("s1", 2)], everything[("s2", 1)]]
    assert await store.read_events([]) == []


# --- guarded commits --------------------------------------------------------------------------------


async def test_a_guarded_write_lands_with_its_events_and_step_changes(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    saga = await _create(store, plan, "s1")
    transition = _succeed_first(plan, saga, T0 + 1)
    (result,) = await store.commit([_write(transition, saga.sequence, epoch=1, now=T0 + 1)])
    assert result.ok and result.epoch == 1
    loaded = await store.load_saga("s1")
    assert loaded == transition.saga
    assert loaded is not None and loaded.step("reserve_stock").output == b"out"
    events = await _all_events(store, "s1")
    assert [e.event.sequence for e in events] == [1, 2, 3, 4]
    assert tuple(e.position for e in events[2:]) == result.positions
    assert _increasing([e.position for e in events])
    assert [e.event for e in events[2:]] == list(transition.events)


async def test_moves_rewrite_version_and_steps_only_for_sagas_unheld_at_their_sequence(store: SqlSagaStore) -> None:
    """A move to another version (the bulk action MOVE): one transaction,
    each saga guarded by its sequence and by no replica holding it."""
    plan = await _plan(store)
    renamed = definition_pb2.SagaDefinition()
    renamed.CopyFrom(CHECKOUT)
    renamed.description = "reserve_stock renamed, a step added"
    renamed.steps[0].name = "hold_stock"
    for step in renamed.steps:
        step.depends_on[:] = ["hold_stock" if name == "reserve_stock" else name for name in step.depends_on]
    renamed.steps.add(name="notify", participant="shipping", depends_on=["ship_order"])
    to = await _plan(store, renamed)
    waiting = {}
    for saga_id in ("moved", "held", "stale"):
        saga = await _create(store, plan, saga_id)
        transition = _succeed_first(plan, saga, T0 + 1)
        assert (await store.commit([_write(transition, saga.sequence, epoch=1, release=True, due_at=T0 + 5)]))[0].ok
        waiting[saga_id] = transition.saga
    # A replica claims one (its call due): it holds it now.
    (claimed,) = await store.claim_due("replica-b", T0 + 100, T0 + 100 + LEASE, 1)
    held = claimed.saga.saga_id
    assert held in waiting
    rest = [saga_id for saga_id in waiting if saga_id != held]

    def move(saga: SagaRecord, expected: int) -> SagaMove:
        moved = moved_saga(saga, to, {"reserve_stock": "hold_stock"}, T0 + 2)
        event = records.LogEvent(moved.sequence, S.EVENT_TYPE_SAGA_MOVED, T0 + 2, saga.state, message="moved")
        return SagaMove(moved, event, expected, T0 + 50)

    await log_caught_up(store)
    head = await store.head_position()
    epoch = await _column(store, rest[0], "epoch")
    results = await store.move_sagas([
        move(waiting[rest[0]], waiting[rest[0]].sequence),
        move(waiting[held], waiting[held].sequence),
        move(waiting[rest[1]], waiting[rest[1]].sequence - 1),
    ])
    assert results[1:] == [None, None]
    assert results[0] is not None and results[0].position > head
    loaded = await store.load_saga(rest[0])
    assert loaded == move(waiting[rest[0]], 0).saga
    assert [(step.name, step.state, step.idempotency_name) for step in loaded.steps] == [
        ("hold_stock", S.STEP_STATE_SUCCEEDED, "reserve_stock"), ("charge_card", S.STEP_STATE_RUNNING, ""),
        ("ship_order", S.STEP_STATE_PENDING, ""), ("notify", S.STEP_STATE_PENDING, ""),
    ]
    assert loaded.step("hold_stock").output == b"out" and loaded.definition_version == to.definition.version
    assert await _column(store, rest[0], "epoch") == epoch + 1  # fences a driver that thinks it holds it
    assert await _column(store, rest[0], "due_at") == T0 + 50
    for unmoved in (held, rest[1]):
        assert (await store.load_saga(unmoved)) == (claimed.saga if unmoved == held else waiting[unmoved])
    logs = await store.read_saga_logs([rest[0], held])
    assert [stored.event.sequence for stored in logs[rest[0]]] == list(range(1, loaded.sequence + 1))
    assert logs[rest[0]][-1].event.type == S.EVENT_TYPE_SAGA_MOVED
    assert len(logs[held]) == claimed.saga.sequence
    await log_caught_up(store)
    assert [stored.position for stored in await store.read_log(head, 10)] == [results[0].position]


@pytest.mark.parametrize("guard", ["stale sequence", "wrong epoch"])
async def test_a_write_that_fails_its_guard_writes_nothing(store: SqlSagaStore, guard: str) -> None:
    plan = await _plan(store)
    saga = await _create(store, plan, "s1")
    first = _succeed_first(plan, saga, T0 + 1)
    assert (await store.commit([_write(first, saga.sequence, epoch=1)]))[0].ok
    await log_caught_up(store)
    head = await store.head_position()
    # A second transition computed from the saga as it was before `first`.
    late = machine.decide(plan, saga, machine.ExecuteFailed("reserve_stock", "no"), T0 + 2)
    if guard == "stale sequence":
        write = _write(late, saga.sequence, epoch=1)
    else:
        late = machine.decide(plan, first.saga, machine.CancelRequested("ops", "x"), T0 + 2)
        write = _write(late, first.saga.sequence, epoch=7)
    (result,) = await store.commit([write])
    assert result == WriteResult(ok=False)
    assert await store.load_saga("s1") == first.saga
    assert len(await _all_events(store, "s1")) == first.saga.sequence
    assert await store.read_log(head, 10) == []


async def test_one_commit_lands_the_writes_whose_guards_hold_and_skips_the_others(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    one, two, three, four = [await _create(store, plan, name) for name in ("s1", "s2", "s3", "s4")]
    succeed_three = _succeed_first(plan, three, T0 + 1)
    cancel_three = machine.decide(plan, three, machine.CancelRequested("ops", "x"), T0 + 1)
    writes = [
        _write(_succeed_first(plan, one, T0 + 1), one.sequence, epoch=1),
        _write(_succeed_first(plan, two, T0 + 1), two.sequence - 1, epoch=1),  # stale
        _write(_succeed_first(plan, four, T0 + 1), four.sequence, epoch=2),  # fenced
        # Two transitions of s3 from the same sequence, as when an operator
        # action and a driver's answer meet in one group commit: one lands.
        _write(succeed_three, three.sequence, epoch=1),
        _write(cancel_three, three.sequence, epoch=None, owner="replica-ops"),
    ]
    head = await store.head_position()
    results = await store.commit(writes)
    assert [r.ok for r in results[:3]] == [True, False, False]
    assert results[3].ok != results[4].ok, results
    winner = writes[3] if results[3].ok else writes[4]
    assert len(results[0].positions) == 2 and results[0].positions[0] > head
    landed_positions = [p for r in results if r.ok for p in r.positions]
    first = landed_positions[0]
    assert landed_positions == list(range(first, first + len(landed_positions)))  # one transaction's, in order
    for refused in (two, four):
        assert await store.load_saga(refused.saga_id) == refused
        assert len(await _all_events(store, refused.saga_id)) == 2
    assert await store.load_saga("s3") == winner.saga
    assert [e.event for e in await _all_events(store, "s3")][2:] == list(winner.events)
    await log_caught_up(store)
    log = await store.read_log(0, 100)
    assert _increasing([e.position for e in log])
    assert len(log) == sum([len(await _all_events(store, saga_id)) for saga_id in ("s1", "s2", "s3", "s4")])


# --- fencing ---------------------------------------------------------------------------------------------


async def test_a_takeover_bumps_the_epoch_and_fences_the_old_owner(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    saga = await _create(store, plan, "s1", owner="replica-a")  # lease until T0 + 30
    assert await store.claim_due("replica-b", T0 + 29, T0 + 29 + LEASE, 10) == []
    (claimed,) = await store.claim_due("replica-b", T0 + 31, T0 + 31 + LEASE, 10)
    # The takeover is logged in the claim's transaction, as the saga's next event.
    taken = replace(saga, sequence=saga.sequence + 1)
    assert (claimed.saga, claimed.epoch, claimed.taken_from) == (taken, 2, "replica-a")
    (logged,) = claimed.events
    assert (logged.saga_id, logged.event.sequence) == ("s1", taken.sequence)
    assert logged.position > (await _all_events(store, "s1"))[-2].position
    assert (logged.event.type, logged.event.actor, logged.event.saga_state) == (
        S.EVENT_TYPE_TAKEN_OVER, "replica-b", saga.state
    )
    assert logged.event.message == (
        "replica replica-b took the saga over from replica replica-a: its lease expired 1.0s ago"
    )
    assert (await _all_events(store, "s1"))[-1] == logged
    assert await _column(store, "s1", "owner") == "replica-b"
    assert await store.load_owned("s1", "replica-a", 1) is None
    assert await store.load_owned("s1", "replica-b", 2) == taken

    stale = _succeed_first(plan, taken, T0 + 32)
    assert (await store.commit([_write(stale, taken.sequence, epoch=1, owner="replica-a")]))[0].ok is False
    assert await store.load_saga("s1") == taken

    current = _succeed_first(plan, taken, T0 + 33)
    (result,) = await store.commit([_write(current, taken.sequence, epoch=2, owner="replica-b")])
    assert (result.ok, result.epoch, len(result.positions)) == (True, 2, 2)

    # An operator write takes the saga over whoever holds it.
    operator = machine.decide(plan, current.saga, machine.CancelRequested("ops", "stop"), T0 + 34)
    result = (await store.commit([_write(operator, current.saga.sequence, epoch=None, owner="replica-c")]))[0]
    assert (result.ok, result.epoch) == (True, 3)
    assert await _column(store, "s1", "owner") == "replica-c"
    assert await store.load_owned("s1", "replica-c", 3) == operator.saga
    compensate = machine.due_calls(plan, operator.saga, T0 + 35)[0]
    after = machine.decide(plan, operator.saga, machine.CompensateSucceeded(compensate.step), T0 + 35)
    assert after.changed
    assert (await store.commit([_write(after, operator.saga.sequence, epoch=2, owner="replica-b")]))[0].ok is False


async def test_a_takeover_is_announced_to_the_other_replicas_listeners(make_postgres_url: Callable[[], str]) -> None:
    # Another replica's watchers learn of the TAKEN_OVER event when the claim
    # commits, not at their next re-read.
    url = make_postgres_url()
    watcher, claimer = open_store(url, notifier="replica-a"), open_store(url, notifier="replica-b")
    await watcher.ensure_schema()
    changes: asyncio.Queue[list[str] | None] = asyncio.Queue()
    listening = asyncio.create_task(watcher.listen(changes.put_nowait, ignore_from="replica-a"))
    try:
        assert await asyncio.wait_for(changes.get(), 30) is None  # listening: re-read everything
        plan = await _plan(watcher)
        await _create(watcher, plan, "s1", owner="replica-a")  # its own write: not announced to itself
        assert [c.saga.saga_id for c in await claimer.claim_due("replica-b", T0 + 31, T0 + 61, 10)] == ["s1"]
        assert await asyncio.wait_for(changes.get(), 30) == ["s1"]
        assert changes.empty()
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await _close([watcher, claimer])


async def test_claim_due_takes_only_due_active_sagas_without_a_live_lease(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    now = T0 + 100
    await _create(store, plan, "due-released", release=True, due_at=now - 5)
    await _create(store, plan, "due-exactly", release=True, due_at=now)
    await _create(store, plan, "due-later", release=True, due_at=now + 1)
    await _create(store, plan, "waiting-forever", release=True, due_at=None)
    await _create(store, plan, "held-live", owner="replica-a", now=now - 10)  # lease until now + 20
    await _create(store, plan, "held-expired", owner="replica-a", now=now - 40)  # lease until now - 10
    finished = await _finish(store, plan, await _create(store, plan, "finished", release=True, due_at=now - 5), now)
    assert finished.state == records.SUCCEEDED
    # Even a final saga left with a due time is never claimed.
    final_due = await _finish(store, plan, await _create(store, plan, "final-due", release=True, due_at=now - 5), now)
    async with store.engine.begin() as conn:
        await conn.execute(sa.update(sagas_table).where(sagas_table.c.saga_id == "final-due").values(due_at=now - 5))
    assert final_due.is_final

    for name in ("due-released", "due-later", "waiting-forever", "finished"):
        assert await _column(store, name, "owner") is None, name
    assert await _column(store, "held-live", "owner") == "replica-a"

    claimed = await store.claim_due("replica-b", now, now + LEASE, 100)
    assert sorted(c.saga.saga_id for c in claimed) == ["due-exactly", "due-released", "held-expired"]
    assert {c.epoch for c in claimed} == {2}
    # Only a saga another replica held is a takeover, with an event; released ones are just claimed.
    assert {c.saga.saga_id: (c.taken_from, len(c.events)) for c in claimed} == {
        "due-exactly": (None, 0), "due-released": (None, 0), "held-expired": ("replica-a", 1)
    }
    assert await store.claim_due("replica-c", now, now + LEASE, 100) == []
    assert await _column(store, "held-live", "owner") == "replica-a"


async def test_claim_due_takes_the_earliest_due_first_up_to_the_limit(store: SqlSagaStore) -> None:
    # PostgreSQL once ran `saga_id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` as a nested-loop
    # semi-join that re-ran the locking subquery per row and so claimed more than n.
    plan = await _plan(store)
    for index in (3, 1, 4, 0, 2, 7, 5, 6):
        await _create(store, plan, f"s{index}", release=True, due_at=T0 + index)
    claimed = await store.claim_due("replica-b", T0 + 10, T0 + 10 + LEASE, 3)
    assert sorted(c.saga.saga_id for c in claimed) == ["s0", "s1", "s2"]
    claimed = await store.claim_due("replica-c", T0 + 10, T0 + 10 + LEASE, 3)
    assert sorted(c.saga.saga_id for c in claimed) == ["s3", "s4", "s5"]


async def test_renew_leases_extends_and_release_all_frees(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    await _create(store, plan, "a1", owner="replica-a")
    await _create(store, plan, "a2", owner="replica-a")
    await _create(store, plan, "b1", owner="replica-b")
    # Only the sagas the owner still holds are renewed.
    assert await store.renew_leases("replica-a", ["a1", "a2", "b1"], T0 + 1000) == 2
    assert await _column(store, "a1", "lease_until") == T0 + 1000
    assert await _column(store, "b1", "lease_until") == T0 + LEASE
    # b1's lease has run out; a1 and a2 are renewed.
    claimed = await store.claim_due("replica-c", T0 + 500, T0 + 500 + LEASE, 10)
    assert [c.saga.saga_id for c in claimed] == ["b1"]
    await store.release_all("replica-a", T0 + 500)
    assert await _column(store, "a1", "owner") is None
    assert await _column(store, "a1", "lease_until") is None
    claimed = await store.claim_due("replica-c", T0 + 501, T0 + 501 + LEASE, 10)
    assert sorted(c.saga.saga_id for c in claimed) == ["a1", "a2"]
    assert await store.renew_leases("replica-a", ["a1", "a2"], T0 + 2000) == 0


async def test_a_releasing_write_leaves_the_saga_unowned_until_due(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    saga = await _create(store, plan, "s1")
    transition = machine.decide(plan, saga, machine.ExecuteErrored("reserve_stock", "UNAVAILABLE"), T0 + 1)
    wake = machine.wake_at(plan, transition.saga)
    assert wake is not None
    write = _write(transition, saga.sequence, epoch=1, now=T0 + 1, release=True, due_at=wake)
    assert (await store.commit([write]))[0].ok
    assert await _column(store, "s1", "owner") is None
    assert await _column(store, "s1", "due_at") == wake
    assert await store.claim_due("replica-b", wake - 0.01, wake + LEASE, 10) == []
    (claimed,) = await store.claim_due("replica-b", wake, wake + LEASE, 10)
    assert claimed.saga == transition.saga and claimed.epoch == 2


# --- PostgreSQL concurrency ----------------------------------------------------------------------------


async def test_concurrent_claims_never_take_the_same_saga(make_postgres_url: Callable[[], str]) -> None:
    stores = await _postgres_stores(make_postgres_url, 4)
    try:
        plan = await _plan(stores[0])
        ids = {f"s{index:03}" for index in range(300)}
        for saga_id in sorted(ids):
            await _create(stores[0], plan, saga_id, release=True, due_at=T0)
        claims: dict[str, list[str]] = {}
        for _ in range(100):
            results = await asyncio.gather(*(
                replica.claim_due(f"replica-{index}", T0 + 1, T0 + 10_000, 17)
                for index, replica in enumerate(stores)
            ))
            for index, claimed in enumerate(results):
                assert len(claimed) <= 17
                for item in claimed:
                    claims.setdefault(item.saga.saga_id, []).append(f"replica-{index}")
                    assert item.epoch == 2
            if not any(results):
                break
        duplicated = {saga_id: owners for saga_id, owners in claims.items() if len(owners) > 1}
        assert duplicated == {}
        assert set(claims) == ids
        assert not any(results), "claims did not drain in 100 rounds"
    finally:
        await _close(stores)


def _filler(saga: SagaRecord, count: int, now: float) -> Transition:
    """A transition that only appends `count` log entries: enough for the log's ordering."""
    events = tuple(
        records.LogEvent(sequence=saga.sequence + k, type=S.EVENT_TYPE_STEP_RETRY_SCHEDULED, time=now,
                         saga_state=saga.state, step_name="reserve_stock", attempt=k)
        for k in range(1, count + 1)
    )
    return Transition(replace(saga, sequence=saga.sequence + count, updated_at=now), events)


async def test_the_global_log_is_read_in_commit_order_by_a_concurrent_reader(
    make_postgres_url: Callable[[], str],
) -> None:
    writers, commits = 8, 50
    stores = await _postgres_stores(make_postgres_url, writers + 1)
    reader_store = stores[-1]
    plan = await _plan(reader_store)
    done = asyncio.Event()
    written: set[tuple[str, int]] = set()

    async def write(index: int, store: SqlSagaStore) -> None:
        rng = random.Random(index)
        tracked = [await _create(store, plan, f"w{index}-{k}") for k in range(3)]
        for saga in tracked:
            written.update((saga.saga_id, seq) for seq in range(1, saga.sequence + 1))
        for _ in range(commits):
            # Several sagas per commit, like the group-commit writer.
            batch = rng.sample(range(len(tracked)), rng.randint(1, len(tracked)))
            transitions = {k: _filler(tracked[k], rng.randint(1, 4), T0) for k in batch}
            results = await store.commit(
                [_write(transitions[k], tracked[k].sequence, epoch=1) for k in batch]
            )
            assert all(result.ok for result in results)
            for k in batch:
                tracked[k] = transitions[k].saga
                written.update((tracked[k].saga_id, e.sequence) for e in transitions[k].events)

    async def read() -> list[StoredEvent]:
        seen: list[StoredEvent] = []
        last = 0
        reads = 0
        while True:
            finished = done.is_set()
            page = await reader_store.read_log_page(last, 50)
            reads += 1
            seen.extend(page.events)
            if page.events:
                last = page.events[-1].position
            elif finished and not page.held_back:
                assert reads > 10, "the reader never ran alongside the writers"
                return seen

    try:
        reader = asyncio.create_task(read())
        await asyncio.gather(*(write(index, store) for index, store in enumerate(stores[:writers])))
        done.set()
        seen = await reader
        positions = [event.position for event in seen]
        assert all(a < b for a, b in itertools.pairwise(positions)), "positions not strictly increasing"
        keys = [(event.saga_id, event.event.sequence) for event in seen]
        assert len(keys) == len(set(keys)), "an event was read twice"
        assert set(keys) == written, f"{len(written - set(keys))} committed events were skipped by the reader"
        assert positions[-1] <= await reader_store.head_position()
    finally:
        await _close(stores)


async def test_a_reader_never_skips_an_event_that_commits_after_a_later_one(
    make_postgres_url: Callable[[], str],
) -> None:
    """Eight writers run the group commit's own statement in transactions
    they hold open for random times and end in random order, a fifth of them
    rolled back; a reader reads the log all along. Positions come from the
    writers' transaction ids, which is not the order they commit in: the
    reader must still get every committed event once, in increasing
    positions, and never one that was rolled back."""
    from compensa.orchestrator.store.postgres import flush_statement  # PostgreSQL's own

    writers, transactions = 8, 25
    url = make_postgres_url()
    store = open_store(url)
    await store.ensure_schema()
    conninfo = store.database.conninfo
    assert conninfo is not None
    plan = await _plan(store)
    done = asyncio.Event()
    committed: set[tuple[str, int, float]] = set()
    rolled_back: set[tuple[str, int, float]] = set()

    async def write(index: int) -> None:
        rng = random.Random(index)
        saga = await _create(store, plan, f"w{index}")
        committed.update((saga.saga_id, sequence, T0) for sequence in range(1, saga.sequence + 1))
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            for number in range(transactions):
                # Its time tells a transaction's events from a rolled-back one's at the same sequences.
                transition = _filler(saga, rng.randint(1, 4), T0 + 1000 * index + number)
                statement, arguments = flush_statement([_write(transition, saga.sequence, epoch=1)])
                async with conn.cursor() as cursor:
                    await cursor.execute(statement, arguments)
                    assert len(await cursor.fetchall()) == 1, "the write did not land"
                await asyncio.sleep(rng.uniform(0, 0.03))  # ok-sleep: the transaction stays open
                keys = {(saga.saga_id, event.sequence, event.time) for event in transition.events}
                if rng.random() < 0.2:
                    await conn.rollback()
                    rolled_back.update(keys)
                else:
                    await conn.commit()
                    committed.update(keys)
                    saga = transition.saga

    async def read() -> tuple[list[StoredEvent], int]:
        seen: list[StoredEvent] = []
        last, held_back = 0, 0
        while True:
            finished = done.is_set()
            page = await store.read_log_page(last, 50)
            seen.extend(page.events)
            held_back += page.held_back
            if page.events:
                last = page.events[-1].position
            elif finished and not page.held_back:
                return seen, held_back
            else:
                await asyncio.sleep(0.001)  # ok-sleep: a reader polling as writers commit

    try:
        reader = asyncio.create_task(read())
        await asyncio.gather(*(write(index) for index in range(writers)))
        done.set()
        seen, held_back = await reader
        assert held_back > 0, "no read found a later transaction committed before an earlier one"
        positions = [event.position for event in seen]
        assert _increasing(positions), "positions not strictly increasing"
        keys = [(event.saga_id, event.event.sequence, event.event.time) for event in seen]
        assert len(keys) == len(set(keys)), "an event was read twice"
        assert not set(keys) & rolled_back, "an event of a rolled-back transaction was read"
        assert set(keys) == committed, f"{len(committed - set(keys))} committed events were skipped by the reader"
    finally:
        await store.close()


# --- listing ---------------------------------------------------------------------------------------------------


async def test_list_sagas_filters_by_state_definition_and_staleness(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    parallel = await _plan(store, PARALLEL)
    running = await _create(store, plan, "running", now=T0)
    done = await _finish(store, plan, await _create(store, plan, "done", now=T0 + 1), T0 + 2)
    other = await _create(store, parallel, "other", now=T0 + 3)
    recent = await _create(store, plan, "recent", now=T0 + 50)

    async def ids(**filters: object) -> list[str]:
        options: dict[str, object] = {"state": 0, "definition_name": "", "updated_before": None,
                                      "page_size": 100, "after": None, **filters}
        return [saga.saga_id for saga in await store.list_sagas(**options)]  # type: ignore[arg-type]

    assert await ids() == ["recent", "other", "done", "running"]
    assert await ids(state=records.SUCCEEDED) == ["done"]
    assert await ids(state=records.RUNNING) == ["recent", "other", "running"]
    assert await ids(definition_name="checkout-parallel") == ["other"]
    assert await ids(definition_name="checkout", state=records.RUNNING) == ["recent", "running"]
    # Stuck: active and not updated since; a final saga is never stuck.
    assert await ids(updated_before=T0 + 10) == ["other", "running"]
    listed = await store.list_sagas(state=0, definition_name="", updated_before=None, page_size=10, after=None)
    assert {saga.saga_id: saga for saga in listed} == {
        "running": running, "done": done, "other": other, "recent": recent
    }


async def test_list_sagas_pages_newest_first_without_duplicates_or_gaps(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    expected: list[tuple[float, str]] = []
    for index in range(23):
        created_at = T0 + index // 3  # three sagas share each creation time
        saga_id = f"saga-{(index * 7) % 23:02}"
        await _create(store, plan, saga_id, now=created_at)
        expected.append((created_at, saga_id))
    expected.sort(reverse=True)
    pages: list[list[str]] = []
    after: tuple[float, str] | None = None
    while True:
        page = await store.list_sagas(state=0, definition_name="", updated_before=None, page_size=5, after=after)
        if not page:
            break
        pages.append([saga.saga_id for saga in page])
        after = (page[-1].created_at, page[-1].saga_id)
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    assert [saga_id for page in pages for saga_id in page] == [saga_id for _, saga_id in expected]


# --- definitions --------------------------------------------------------------------------------------------------


async def test_definitions_are_versioned_by_content(store: SqlSagaStore) -> None:
    first, created = await store.register_definition(CHECKOUT, definition_fingerprint(CHECKOUT), T0)
    assert (first.version, created) == (1, True)
    again, created = await store.register_definition(CHECKOUT, definition_fingerprint(CHECKOUT), T0 + 1)
    assert (again.version, created) == (1, False)
    assert again == first

    changed = definition_pb2.SagaDefinition()
    changed.CopyFrom(CHECKOUT)
    changed.description = "now with a new description"
    second, created = await store.register_definition(changed, definition_fingerprint(changed), T0 + 2)
    assert (second.version, created) == (2, True)
    await store.register_definition(PARALLEL, definition_fingerprint(PARALLEL), T0 + 3)

    latest = await store.get_definition("checkout")
    assert latest is not None and (latest.version, latest.description) == (2, "now with a new description")
    original = await store.get_definition("checkout", 1)
    assert original is not None and original.description == CHECKOUT.description and original.version == 1
    assert await store.get_definition("checkout", 3) is None
    assert await store.get_definition("nope") is None

    listed = await store.list_definitions(100, "")
    assert [(d.name, d.version) for d in listed] == [("checkout", 2), ("checkout-parallel", 1)]
    assert [(d.name, d.version) for d in await store.list_definitions(1, "checkout")] == [("checkout-parallel", 1)]
    assert [d.name for d in await store.list_definitions(1, "")] == ["checkout"]


def test_the_flush_statement_stays_short_enough_for_psycopg_to_cache_its_parse() -> None:
    # Longer texts, or more parameters, are re-parsed on every flush (psycopg caches up to these limits).
    from psycopg import _queries

    from compensa.orchestrator.store.postgres import _FLUSH, _FLUSH_PARAMS, _FLUSH_SENT

    assert len(_FLUSH_SENT.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(_FLUSH_PARAMS) <= _queries.MAX_CACHED_STATEMENT_PARAMS
    assert _FLUSH_SENT.count("%b") == len(_FLUSH_PARAMS) == _FLUSH.count(")b::")


async def test_a_secret_is_made_once_and_shared_by_every_replica(make_postgres_url: Callable[[], str]) -> None:
    stores = await _postgres_stores(make_postgres_url, 3)
    try:
        # Replicas starting together: one insert wins, all read its value.
        values = await asyncio.gather(*(opened.secret("completion_token") for opened in stores))
        assert len(values[0]) == 32 and values.count(values[0]) == 3
        assert await stores[1].secret("completion_token") == values[0]
        assert await stores[2].secret("another") not in (values[0], b"")
    finally:
        await _close(stores)


async def test_clock_reads_the_databases_wall_clock_in_seconds(store: SqlSagaStore) -> None:
    before = time.time()
    reading = await store.clock()
    after = time.time()
    # Same machine: the database's clock is this one, within the query's time.
    assert before - 0.5 <= reading <= after + 0.5


async def test_purge_finished_deletes_what_is_done_for_good_with_its_steps_and_events(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    for saga_id in ("old-succeeded", "old-failed-resolved", "old-failed", "old-compensated", "recent-succeeded"):
        await _finish(store, plan, await _create(store, plan, saga_id), T0)
    await _create(store, plan, "old-running")
    async with store.engine.begin() as conn:
        # Final states other than SUCCEEDED, set directly: the store does not care how they were reached.
        for saga_id, state, note in (
            ("old-failed-resolved", S.SAGA_STATE_FAILED, "refunded by hand"),
            ("old-failed", S.SAGA_STATE_FAILED, ""),
            ("old-compensated", S.SAGA_STATE_COMPENSATED, ""),
        ):
            await conn.execute(
                sa.update(sagas_table).where(sagas_table.c.saga_id == saga_id).values(state=state, resolution_note=note)
            )
        await conn.execute(
            sa.update(sagas_table).where(sagas_table.c.saga_id == "recent-succeeded").values(updated_at=T0 + 100)
        )

    assert await store.purge_finished(finished_before=T0 + 50, limit=2) == 2
    assert await store.purge_finished(finished_before=T0 + 50, limit=2) == 1
    assert await store.purge_finished(finished_before=T0 + 50, limit=2) == 0

    for gone in ("old-succeeded", "old-failed-resolved", "old-compensated"):
        assert await store.load_saga(gone) is None
        assert await _all_events(store, gone) == []
    for kept in ("old-failed", "old-running", "recent-succeeded"):
        saga = await store.load_saga(kept)
        assert saga is not None and len(saga.steps) == 3
        assert await _all_events(store, kept)
    async with store.engine.connect() as conn:
        steps = (await conn.execute(sa.select(sa.func.count()).select_from(saga_steps_table))).scalar_one()
    assert steps == 3 * 3


def _table_reads(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's nodes that read one of our tables (not the ones that write)."""
    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(found for child in node.get("Plans", []) for found in nodes(child))]

    return [
        node for node in nodes(plan["Plan"])
        if str(node.get("Relation Name", "")).startswith("compensa_") and node["Node Type"] != "ModifyTable"
    ]


def _assert_indexed(reads: list[dict[str, Any]]) -> None:
    assert reads
    for node in reads:
        assert node["Node Type"] != "Seq Scan", node
        assert "Index Cond" in node or "Recheck Cond" in node, node


async def test_the_claim_plan_reaches_the_sagas_through_indexes(make_postgres_url: Callable[[], str]) -> None:
    # Planned on an empty database, as a plan cached by a young deployment is.
    from sqlalchemy.dialects import postgresql

    opened = open_store(make_postgres_url())
    await opened.ensure_schema()
    try:
        claim = opened.claim_statement(T0, 200)
        sql = str(claim.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        async with opened.engine.begin() as conn:
            await opened._index_only_planning(conn)
            (plan,) = (await conn.execute(sa.text("EXPLAIN (FORMAT JSON) " + sql))).scalar_one()
    finally:
        await opened.close()
    _assert_indexed(_table_reads(plan))


async def test_the_flush_plan_reaches_every_table_through_an_index(make_postgres_url: Callable[[], str]) -> None:
    # The plan PostgreSQL caches for the flush is made while the tables are
    # small; one that reads a whole table gets slower with every saga stored.
    import psycopg
    from psycopg._queries import PostgresQuery
    from psycopg.adapt import Transformer

    from compensa.orchestrator.store.postgres import _FLUSH_PARAMS, _FLUSH_SENT, WRITER_OPTIONS

    url = make_postgres_url()
    opened = open_store(url)
    await opened.ensure_schema()
    await opened.close()
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    async with await psycopg.AsyncConnection.connect(
        conninfo, autocommit=True, options=WRITER_OPTIONS + " -c plan_cache_mode=force_generic_plan"
    ) as conn:
        query = PostgresQuery(Transformer(conn))
        query.convert(_FLUSH_SENT, ["[]"] * (len(_FLUSH_PARAMS) - 1) + ["x"])
        await conn.execute(b"PREPARE flush(" + b",".join([b"text"] * len(_FLUSH_PARAMS)) + b") AS " + query.query)
        arguments = ",".join(["'[]'"] * (len(_FLUSH_PARAMS) - 1) + ["'x'"])
        (plan,) = (await (await conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE flush({arguments})")).fetchone())

    _assert_indexed(_table_reads(plan[0]))


# --- traces and the alert outbox --------------------------------------------------------------


def _alert(saga: SagaRecord, now: float, message: str = "a person must act") -> Transition:
    """A transition whose one event is ALERT_RAISED (the store does not judge why)."""
    event = records.LogEvent(
        sequence=saga.sequence + 1, type=S.EVENT_TYPE_ALERT_RAISED, time=now, saga_state=saga.state, message=message
    )
    return Transition(dataclasses.replace(saga, sequence=saga.sequence + 1, updated_at=now), (event,))


async def test_a_saga_keeps_the_trace_context_it_was_created_with(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    transition = machine.new_saga(plan, saga_id="traced", input=b"in", now=T0)
    transition = dataclasses.replace(transition, saga=dataclasses.replace(transition.saga, trace_parent=traced))
    assert (await store.commit([_write(transition, 0, epoch=1, fingerprint="fp")]))[0].ok
    untraced = await _create(store, plan, "untraced")
    assert (await store.load_saga("traced") or pytest.fail("missing")).trace_parent == traced
    assert (await store.load_saga("untraced") or pytest.fail("missing")).trace_parent is None
    # Through later writes and a claim by another replica.
    await _finish(store, plan, untraced, T0 + 1)
    claimed = await store.claim_due("replica-b", T0 + LEASE + 1, T0 + 2 * LEASE, 10)
    assert [(c.saga.saga_id, c.saga.trace_parent) for c in claimed] == [("traced", traced)]


async def test_an_alert_event_lands_in_the_alert_log_and_outbox_with_it_and_is_claimed_once_at_a_time(
    store: SqlSagaStore,
) -> None:
    plan = await _plan(store)
    saga = await _create(store, plan, "s1")
    quiet = await _create(store, plan, "s2")
    alert = _alert(saga, T0 + 1)
    stale = _alert(quiet, T0 + 1)
    (landed, skipped) = await store.commit([
        _write(alert, saga.sequence, epoch=1, now=T0 + 1),
        _write(stale, quiet.sequence - 1, epoch=1, now=T0 + 1),  # its guard fails: no event, no alert
    ])
    assert landed.ok and not skipped.ok
    await log_caught_up(store)
    (logged,) = await store.read_alerts(0, 10)
    assert (logged.kind, logged.alert_id) == (SAGA_ALERT, f"s1/{alert.saga.sequence}")
    assert (logged.saga_id, logged.sequence, logged.event_position) == ("s1", alert.saga.sequence, landed.positions[0])
    assert (logged.definition_name, logged.message, logged.raised_at) == ("checkout", "a person must act", T0 + 1)
    assert await store.claim_alerts(T0 + 0.5, T0 + 10, 10) == []  # not due before it was raised

    (pending,) = await store.claim_alerts(T0 + 1, T0 + 10, 10)
    assert (pending.alert, pending.attempts) == (logged, 1)
    # Claimed: nobody else gets it until the claim runs out.
    assert await store.claim_alerts(T0 + 9, T0 + 20, 10) == []
    (again,) = await store.claim_alerts(T0 + 10, T0 + 20, 10)
    assert again.attempts == 2
    # The first claimant's late failure does not push back the second's claim.
    await store.alert_not_delivered(logged.position, 1, T0 + 100, "late")
    assert [a.attempts for a in await store.claim_alerts(T0 + 20, T0 + 30, 10)] == [3]
    await store.alert_not_delivered(logged.position, 3, T0 + 100, "HTTP 500")
    assert await store.claim_alerts(T0 + 99, T0 + 110, 10) == []
    (last,) = await store.claim_alerts(T0 + 100, T0 + 110, 10)
    await store.alert_delivered(last.alert.position)
    assert await store.claim_alerts(T0 + 1000, T0 + 1010, 10) == []
    assert await store.read_alerts(0, 10) == [logged]  # delivered, still in the log


async def test_purge_removes_the_undelivered_alerts_of_the_sagas_it_deletes(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    saga = await _create(store, plan, "s1")
    alert = _alert(saga, T0 + 1)
    assert (await store.commit([_write(alert, saga.sequence, epoch=1, now=T0 + 1)]))[0].ok
    await _finish(store, plan, alert.saga, T0 + 2)
    assert await store.purge_finished(finished_before=T0 + 50, limit=10) == 1
    assert await store.claim_alerts(T0 + 1000, T0 + 1010, 10) == []
    # Delivered (gone from the outbox) and old: retention deletes it from the log.
    await log_caught_up(store)
    assert [a.saga_id for a in await store.read_alerts(0, 10)] == ["s1"]
    assert await store.purge_alerts(raised_before=T0 + 1, limit=10) == 0
    assert await store.purge_alerts(raised_before=T0 + 50, limit=10) == 1
    assert await store.read_alerts(0, 10) == []


async def test_retention_keeps_alerts_that_are_not_delivered_yet(store: SqlSagaStore) -> None:
    await store.set_participant("pay", "127.0.0.1:1", updated_by="test", now=T0)
    await store.participant_failing("pay", T0)
    raised = await store.alert_participant_unhealthy("pay", unhealthy_before=T0 + 5, now=T0 + 5, message="down")
    assert raised is not None
    assert await store.purge_alerts(raised_before=T0 + 100, limit=10) == 0
    (pending,) = await store.claim_alerts(T0 + 10, T0 + 20, 10)
    await store.alert_delivered(pending.alert.position)
    assert await store.purge_alerts(raised_before=T0 + 100, limit=10) == 1


async def test_a_participant_outage_is_alerted_once_and_its_recovery_once(store: SqlSagaStore) -> None:
    await store.set_participant("pay", "127.0.0.1:1", updated_by="test", now=T0)
    # Healthy: a success changes nothing and raises nothing.
    assert await store.participant_serving("pay", now=T0, message="up") is None
    await store.participant_failing("pay", T0 + 1)
    await store.participant_failing("pay", T0 + 2)  # the outage started at the first failure
    (stored,) = await store.list_participants()
    assert (stored.unhealthy_since, stored.alerted_at) == (T0 + 1, None)
    # Not failing long enough yet.
    assert await store.alert_participant_unhealthy("pay", unhealthy_before=T0, now=T0 + 2, message="x") is None
    unhealthy = await store.alert_participant_unhealthy(
        "pay", unhealthy_before=T0 + 1, now=T0 + 3, message="failed for 2s"
    )
    assert unhealthy is not None
    assert (unhealthy.kind, unhealthy.participant, unhealthy.address) == (
        PARTICIPANT_UNHEALTHY, "pay", "127.0.0.1:1"
    )
    assert unhealthy.alert_id == f"participant/pay/{unhealthy.position}"
    # Once per outage.
    assert await store.alert_participant_unhealthy("pay", unhealthy_before=T0 + 9, now=T0 + 9, message="x") is None
    (stored,) = await store.list_participants()
    assert stored.alerted_at == T0 + 3
    recovered = await store.participant_serving("pay", now=T0 + 10, message="serving again")
    assert recovered is not None and recovered.kind == PARTICIPANT_RECOVERED
    assert await store.participant_serving("pay", now=T0 + 11, message="x") is None
    (stored,) = await store.list_participants()
    assert (stored.unhealthy_since, stored.alerted_at) == (None, None)
    # An outage that ends before its threshold raises nothing, then or at its end.
    await store.participant_failing("pay", T0 + 20)
    assert await store.participant_serving("pay", now=T0 + 21, message="x") is None
    await log_caught_up(store)
    logged = await store.read_alerts(0, 10)
    assert [(a.position, a.kind) for a in logged] == [
        (unhealthy.position, PARTICIPANT_UNHEALTHY), (recovered.position, PARTICIPANT_RECOVERED)
    ]
    assert unhealthy.position < recovered.position
    assert [pending.alert for pending in await store.claim_alerts(T0 + 30, T0 + 40, 10)] == logged


async def test_replicas_racing_on_one_outage_raise_its_alert_once(make_postgres_url: Callable[[], str]) -> None:
    stores = await _postgres_stores(make_postgres_url, 4)
    try:
        await stores[0].set_participant("pay", "127.0.0.1:1", updated_by="test", now=T0)
        await asyncio.gather(*(opened.participant_failing("pay", T0 + n) for n, opened in enumerate(stores)))
        raised = await asyncio.gather(*(
            opened.alert_participant_unhealthy("pay", unhealthy_before=T0 + 10, now=T0 + 10, message="down")
            for opened in stores
        ))
        assert len([alert for alert in raised if alert is not None]) == 1
        ended = await asyncio.gather(*(
            opened.participant_serving("pay", now=T0 + 20, message="up") for opened in stores
        ))
        assert len([alert for alert in ended if alert is not None]) == 1
        await log_caught_up(stores[0])
        assert [a.kind for a in await stores[0].read_alerts(0, 10)] == [PARTICIPANT_UNHEALTHY, PARTICIPANT_RECOVERED]
    finally:
        await _close(stores)


async def test_alert_positions_follow_commit_order_across_saga_and_participant_alerts(store: SqlSagaStore) -> None:
    plan = await _plan(store)
    await store.set_participant("pay", "127.0.0.1:1", updated_by="test", now=T0)
    saga = await _create(store, plan, "s1")
    first = _alert(saga, T0 + 1)
    assert (await store.commit([_write(first, saga.sequence, epoch=1, now=T0 + 1)]))[0].ok
    await store.participant_failing("pay", T0 + 1)
    assert await store.alert_participant_unhealthy("pay", unhealthy_before=T0 + 2, now=T0 + 2, message="down")
    second = _alert(first.saga, T0 + 3, "again")
    assert (await store.commit([_write(second, first.saga.sequence, epoch=1, now=T0 + 3)]))[0].ok
    await log_caught_up(store)
    logged = await store.read_alerts(0, 10)
    assert [a.kind for a in logged] == [SAGA_ALERT, PARTICIPANT_UNHEALTHY, SAGA_ALERT]
    assert [a.message for a in logged] == ["a person must act", "down", "again"]
    positions = [a.position for a in logged]
    assert _increasing(positions)
    assert [a.position for a in await store.read_alerts(positions[0], 1)] == positions[1:2]
    assert await store.read_alerts(positions[2], 10) == []


async def test_a_database_error_is_told_in_one_line_without_the_statement(tmp_path: Path) -> None:
    from compensa.orchestrator.shared.errors import StoreUnavailable

    store = open_store(f"sqlite+aiosqlite:///{tmp_path / 'no-schema.db'}")  # no tables: every statement fails
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await store.set_participant("hotels", "127.0.0.1:50071", updated_by="someone", now=time.time())
    finally:
        await store.close()
    assert str(raised.value) == (
        "database unavailable: OperationalError: no such table: compensa_participants"
    )
