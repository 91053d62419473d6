"""Scale-out: three `compensa serve` replicas on one PostgreSQL database, one
SIGKILLed under load (issue "Scale-out").

The participant is a RecordingParticipant served in the test process; for
every Execute and Compensate it also notes which replica called (the client
end of the TCP connection, found in /proc) and when the call was in the
participant, from arrival to answer. Its step code additionally writes an
"effect" row inside the barrier transaction, so the effect table holds exactly
what committed.

What the design (DESIGN-NOTES §4) guarantees, and what is asserted:
- every saga ends as its definition dictates (relay-ok SUCCEEDED, relay-declined
  COMPENSATED), with each step's effect committed exactly once;
- no two replicas drive one saga at once: for each (saga, step, operation) no
  two calls made by replicas that were alive overlap in time, and the calls of
  the takeover do not overlap each other. The killed replica's call in flight
  at the kill is the only call allowed to overlap another one (it started
  before the kill; the participant's barrier is what makes it harmless);
- takeover within the lease: every saga the killed replica was driving gets a
  new event within lease_seconds + scheduler poll (1s) + margin of the kill;
- any replica answers GetSaga, ListSagas and WatchSaga for sagas started on another.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from participant_helpers import checkout_input
from processes import FAST_RECONNECT, ManagedProcess, ProcessSet, owner_of_connection
from recording_participant import RecordingParticipant, StepBehaviour
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.examples.server import start_server
from compensa.orchestrator.shared.records import ENDING_EVENTS, FINAL_SAGA_STATES
from compensa.participants.sdk import pack
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

# Several processes and many connections each: one at a time (make test's --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.xdist_group("heavy")]

S = saga_pb2
FINAL = FINAL_SAGA_STATES
FINAL_EVENTS = frozenset(ENDING_EVENTS.values())

LEASE_SECONDS = 2.0
SCHEDULER_POLL_SECONDS = 1.0  # compensa.orchestrator.engine._POLL_SECONDS
#: Takeover bound: the lease may have been renewed just before the kill, then
#: the scheduler notices within a poll; the margin covers the slow step the
#: new owner calls again before it writes (WORK_SECONDS) and a busy 2-core machine.
TAKEOVER_BOUND = LEASE_SECONDS + 3.0
SAGA_COUNT = 270
LOAD_SECONDS = 3.0
KILL_AFTER = 1.6
#: A request the victim sent just before SIGKILL can still be in the socket
#: buffers and reach the participant just after it: calls by the victim that
#: start later than this after the kill are the violation.
DELIVERY_GRACE = 0.5
#: The longest a taken-over saga may take from a call's answer to its next
#: call (the scheduler polls every second: a saga left waiting for it between
#: steps shows up here).
STALL_SECONDS = 1.5
#: The kill waits (up to a second) for the victim to have this many calls in
#: progress: more than the five sagas in flight the test then requires.
KILL_WHEN_BUSY = 6
#: Short on purpose: the participant serves PARTICIPANT_CONCURRENCY calls at a
#: time, so the burst of taken-over sagas queues there for about
#: n * WORK_SECONDS / PARTICIPANT_CONCURRENCY; with 0.4s that queueing (up to
#: 2.3s) was mistaken for orchestrator stalls.
WORK_SECONDS = 0.1
#: Calls the in-process participant works on at once; each holds two pooled
#: connections (the barrier transaction and the recording of the call).
PARTICIPANT_CONCURRENCY = 12

_STEP = (
    "    participant: recorder\n"
    "    kind: COMPENSABLE\n"
    "    execute_timeout: 10s\n"
    "    compensate_timeout: 10s\n"
    "    retry: {max_attempts: 4, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 1s}\n"
    "    compensate_retry: {max_attempts: 10, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 1s}\n"
)
DEFINITIONS = {
    "relay-ok": (("reserve", "work", "finish"), S.SAGA_STATE_SUCCEEDED),
    "relay-declined": (("reserve", "work", "decline"), S.SAGA_STATE_COMPENSATED),
}
#: The steps whose effect commits, per definition (decline fails: its effect rolls back).
EFFECTS = {"relay-ok": {"reserve", "work", "finish"}, "relay-declined": {"reserve", "work"}}
BEHAVIOURS = {"work": StepBehaviour(execute_seconds=WORK_SECONDS), "decline": StepBehaviour(fail=True)}


@dataclass(frozen=True)
class Call:
    saga_id: str
    step: str
    operation: str
    replica: str | None
    arrived: float  # time.time() when the call reached the participant
    started: float  # when the participant began working on it (it serves a few at a time)
    finished: float  # when it answered, failed or was cancelled
    ended: str

    def overlaps(self, other: Call) -> bool:
        return self.started < other.finished and other.started < self.finished


class AttributingRecorder(RecordingParticipant):
    """Records which replica made each call and when; step code writes an effect row."""

    def __init__(self, database_url: str, replicas: Sequence[ManagedProcess]) -> None:
        engine = create_async_engine(database_url, pool_size=2 * PARTICIPANT_CONCURRENCY, max_overflow=2)
        super().__init__(engine, BEHAVIOURS)
        self.replicas = replicas
        self.port = 0
        self.calls: list[Call] = []
        self._slots = asyncio.Semaphore(PARTICIPANT_CONCURRENCY)
        self._peers: dict[str, str | None] = {}
        #: Calls each replica has at the participant right now.
        self.busy: collections.Counter[str | None] = collections.Counter()

    def _replica(self, peer: str) -> str | None:
        if peer not in self._peers or self._peers[peer] is None:
            self._peers[peer] = owner_of_connection(peer, self.port, self.replicas)
        return self._peers[peer]

    async def _recorded(self, operation: str, request, context, call):  # type: ignore[no-untyped-def]
        arrived = time.time()
        async with self._slots:
            replica = self._replica(context.peer())
            started, ended = time.time(), "ok"
            self.busy[replica] += 1
            try:
                return await call(request, context)
            except asyncio.CancelledError:
                ended = "cancelled"
                raise
            except BaseException as error:
                ended = type(error).__name__
                raise
            finally:
                self.busy[replica] -= 1
                step = request.context
                self.calls.append(
                    Call(step.saga_id, step.step_name, operation, replica, arrived, started, time.time(), ended)
                )

    async def Execute(self, request, context):  # type: ignore[no-untyped-def]
        return await self._recorded("execute", request, context, super().Execute)

    async def Compensate(self, request, context):  # type: ignore[no-untyped-def]
        return await self._recorded("compensate", request, context, super().Compensate)

    async def execute_step(self, conn, request):  # type: ignore[no-untyped-def]
        step = request.context
        await conn.execute(
            sa.text("INSERT INTO replica_effects (saga_id, step_name) VALUES (:saga, :step)"),
            {"saga": step.saga_id, "step": step.step_name},
        )
        return await super().execute_step(conn, request)


def start_request(definition: str, saga_id: str) -> orchestrator_pb2.StartSagaRequest:
    return orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name=definition, input=pack(checkout_input()))


async def list_all(stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> dict[str, saga_pb2.Saga]:
    request = orchestrator_pb2.ListSagasRequest(page_size=1000)
    sagas: dict[str, saga_pb2.Saga] = {}
    while True:
        response = await stub.ListSagas(request, timeout=10.0)
        sagas.update((saga.saga_id, saga) for saga in response.sagas)
        if not response.next_page_token:
            return sagas
        request.page_token = response.next_page_token


async def watch(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_id: str) -> list[saga_pb2.SagaEvent]:
    call = stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True), timeout=20.0)
    return [response.event async for response in call]


def seconds(event: saga_pb2.SagaEvent) -> float:
    return event.time.ToNanoseconds() / 1e9


async def test_replica_killed_under_load_sagas_taken_over_once(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    definitions = []
    for name, (steps, _) in DEFINITIONS.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"name: {name}\ninput_type: compensa.checkout.v1.CheckoutInput\nsteps:\n"
            + "".join(f"  - name: {step}\n{_STEP}" for step in steps)
        )
        definitions.append(path)
    database = make_postgres_url()
    replicas: list[ManagedProcess] = []
    recorder = AttributingRecorder(make_postgres_url(), replicas)
    served = await start_server(recorder)
    recorder.port = int(served.address.rsplit(":", 1)[1])
    async with recorder.engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE replica_effects (saga_id text NOT NULL, step_name text NOT NULL)"))
    try:
        with ProcessSet(tmp_path) as processes:
            for name in ("r0", "r1", "r2"):
                replicas.append(processes.orchestrator(
                    database, {"recorder": served.address}, definitions=definitions,
                    lease_seconds=LEASE_SECONDS, name=name,
                ))
            for replica in replicas:  # one at a time: the first creates the schema
                await replica.start_serving()
            channels = [grpc.aio.insecure_channel(r.address, options=FAST_RECONNECT) for r in replicas]
            stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(c) for c in channels]
            try:
                await run_scenario(replicas, stubs, recorder)
            finally:
                for channel in channels:
                    await channel.close()
    finally:
        await served.stop(0)


async def run_scenario(
    replicas: list[ManagedProcess], stubs: list[orchestrator_pb2_grpc.OrchestratorServiceStub],
    recorder: AttributingRecorder,
) -> None:
    victim = 1
    # Half the starts go to the victim, so that enough of its sagas are in
    # flight at the kill (a third left it with about four: too few to tell).
    others = [index for index in range(len(replicas)) if index != victim]
    start_order = [index for other in others for index in (other, victim)]
    names = itertools.cycle(DEFINITIONS)
    orders = {f"rep-{n:04d}": next(names) for n in range(SAGA_COUNT)}
    started_on: dict[str, int] = {}
    killed_at = 0.0

    async def start(n: int, saga_id: str) -> None:
        # Round-robin; a start refused because its replica is dead goes to the
        # next one, with the very same request (its input is random), so that a
        # start that landed before the kill is acknowledged, not ALREADY_EXISTS.
        request = start_request(orders[saga_id], saga_id)
        for attempt in range(len(replicas) * 3):
            index = start_order[(n + attempt) % len(start_order)]
            if not replicas[index].running():
                continue
            try:
                await stubs[index].StartSaga(request, timeout=10.0)
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                continue
            started_on.setdefault(saga_id, index)
            return
        raise AssertionError(f"{saga_id}: no replica acknowledged the start")

    async def load() -> None:
        tasks = []
        for n, saga_id in enumerate(orders):
            tasks.append(asyncio.create_task(start(n, saga_id)))
            await asyncio.sleep(LOAD_SECONDS / SAGA_COUNT)  # ok-sleep: paces the load so the kill lands mid-run
        await asyncio.gather(*tasks)

    async def kill() -> None:
        nonlocal killed_at
        await asyncio.sleep(KILL_AFTER)  # ok-sleep: the moment of the kill, with work in flight on every replica
        # Then the first moment the victim has several calls at the participant.
        name = replicas[victim].name
        for _ in range(100):
            if recorder.busy[name] >= KILL_WHEN_BUSY:
                break
            await asyncio.sleep(0.01)  # ok-sleep: polling interval, bounded by the loop
        killed_at = time.time()
        replicas[victim].kill()

    t0 = time.monotonic()
    await asyncio.gather(load(), kill())
    live = [i for i in range(len(replicas)) if i != victim]
    stub = stubs[live[0]]
    deadline = time.monotonic() + 40.0
    while True:
        sagas = await list_all(stub)
        pending = [s for s in orders if s not in sagas or sagas[s].state not in FINAL]
        if not pending:
            break
        assert time.monotonic() < deadline, f"{len(pending)} sagas not final: {pending[:10]}"
        await asyncio.sleep(0.2)  # ok-sleep: polling interval, bounded by the deadline
    drained = time.monotonic() - t0

    # 1. Outcomes as the inputs dictate.
    wrong = {s: S.SagaState.Name(sagas[s].state) for s, d in orders.items() if sagas[s].state != DEFINITIONS[d][1]}
    assert not wrong, f"unexpected outcomes: {wrong}"

    # 2. Each step's effect committed once.
    async with recorder.engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT saga_id, step_name FROM replica_effects"))).all()
    effects = collections.Counter((row.saga_id, row.step_name) for row in rows)
    expected = collections.Counter({(s, step): 1 for s, d in orders.items() for step in EFFECTS[d]})
    assert effects == expected, (
        f"effects differ: extra {dict(effects - expected)}, missing {dict(expected - effects)}"
    )

    # 2b. After the kill and the takeovers, the log and the participant's barrier agree (AuditSagas).
    audited = await stub.AuditSagas(
        orchestrator_pb2.AuditSagasRequest(since=timestamp_pb2.Timestamp(seconds=0)), timeout=120.0
    )
    assert [(p.participant, p.audited, p.sagas) for p in audited.participants] == [("recorder", True, SAGA_COUNT)]
    assert not audited.participants[0].discrepancies and not audited.saga_discrepancies, audited

    # 3. No concurrent execution of a step by two live drivers.
    calls = list(recorder.calls)
    unattributed = [c for c in calls if c.replica is None]
    assert not unattributed, f"{len(unattributed)} calls from no known replica, e.g. {unattributed[:3]}"
    victim_name = replicas[victim].name
    by_key: dict[tuple[str, str, str], list[Call]] = collections.defaultdict(list)
    for call in calls:
        by_key[(call.saga_id, call.step, call.operation)].append(call)
    overlaps, tolerated = [], []
    for key_calls in by_key.values():
        for first, second in itertools.combinations(key_calls, 2):
            if not first.overlaps(second):
                continue
            # Only the killed replica's call in flight at the kill may overlap another.
            if victim_name in (first.replica, second.replica):
                killed_call = first if first.replica == victim_name else second
                assert killed_call.arrived <= killed_at + DELIVERY_GRACE, (
                    f"a call by the killed replica after the kill: {killed_call}"
                )
                tolerated.append((first, second))
            else:
                overlaps.append((first, second))
    assert not overlaps, f"{len(overlaps)} overlapping calls by live replicas, e.g. {overlaps[:3]}"
    after_kill = [c for c in calls if c.arrived > killed_at + DELIVERY_GRACE]
    late = [c for c in after_kill if c.replica == victim_name]
    assert not late, f"{len(late)} calls by the killed replica after the kill, e.g. {late[:3]}"

    # 4. Takeover within the lease: the sagas the victim was driving at the kill.
    total = sum(saga.sequence for saga in sagas.values())
    log: list[saga_pb2.SagaEvent] = []
    call = stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=0), timeout=30.0)
    async for response in call:
        log.append(response.event)
        if len(log) == total:
            call.cancel()
            break
    events: dict[str, list[saga_pb2.SagaEvent]] = collections.defaultdict(list)
    for event in log:
        events[event.saga_id].append(event)
    last_driver = {}
    for c in sorted(calls, key=lambda c: c.started):
        if c.started <= killed_at:
            last_driver[c.saga_id] = c.replica
    in_flight = [
        saga_id for saga_id, saga_events in events.items()
        if (before := [e for e in saga_events if seconds(e) <= killed_at])
        and before[-1].type not in FINAL_EVENTS
        and last_driver.get(saga_id, replicas[started_on[saga_id]].name) == victim_name
    ]
    assert len(in_flight) >= 5, (
        f"only {len(in_flight)} sagas in flight on the victim at the kill; the test proved little"
    )
    delays = {}
    for saga_id in in_flight:
        after = [seconds(e) for e in events[saga_id] if seconds(e) > killed_at]
        assert after, f"{saga_id}: no event after the kill"
        delays[saga_id] = after[0] - killed_at
    # 5. Any replica answers for any saga.
    for index in live:
        listed = await list_all(stubs[index])
        assert set(orders) <= set(listed), f"{replicas[index].name} lists {len(listed)} sagas"
        others = [s for s, on in started_on.items() if on != index]
        for saga_id in others[:40]:
            got = (await stubs[index].GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=5.0)).saga
            assert (got.state, got.sequence) == (sagas[saga_id].state, sagas[saga_id].sequence)
        for saga_id in others[:15]:
            watched = await watch(stubs[index], saga_id)
            assert [(e.sequence, e.type) for e in watched] == [(e.sequence, e.type) for e in events[saga_id]]

    slow = {s: round(d, 2) for s, d in delays.items() if d > TAKEOVER_BOUND}
    print(f"\n{SAGA_COUNT} sagas drained {drained:.1f}s after the load began; {len(calls)} calls, "
          f"{len(tolerated)} overlaps with the killed replica's in-flight calls; {len(in_flight)} sagas taken over, "
          f"first new event {min(delays.values()):.2f}..{max(delays.values()):.2f}s after the kill "
          f"(bound {TAKEOVER_BOUND}s); starts per replica {collections.Counter(started_on.values())}")
    # After the takeover the new owner drives on without pausing: from the
    # moment a call of a taken-over saga answers to the moment its next call
    # reaches the participant is the orchestrator's own time (a commit and a
    # decision), however long calls queue at the participant on a busy machine.
    stalls = {}
    for saga_id in in_flight:
        resumed = sorted((c for c in after_kill if c.saga_id == saga_id), key=lambda c: c.arrived)
        gaps = [(b.arrived - a.finished, a) for a, b in itertools.pairwise(resumed)]
        if any(gap > STALL_SECONDS for gap, _ in gaps):
            stalls[saga_id] = [(round(gap, 2), f"{a.step}/{a.operation}/{a.ended}") for gap, a in gaps]
    assert not stalls, f"taken-over sagas pause between calls (answer -> next call, s): {stalls}"
    assert not slow, f"sagas resumed later than {TAKEOVER_BOUND}s after the kill: {slow}"
    # Resumed by live replicas: each such saga's calls after the kill come from one live replica.
    for saga_id in in_flight:
        drivers = {c.replica for c in after_kill if c.saga_id == saga_id}
        assert victim_name not in drivers
