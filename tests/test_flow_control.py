"""Flow control (issue 24): a participant's limits hold for the deployment as
a whole, across replicas and a replica's death; an operator's hold stops
new calls and a release resumes them; a call held back is not an attempt
and its step's deadline still holds; bad limits change nothing.

The limits are checked from the participant's side (DESIGN-NOTES 10): an
instrumented participant in this process notes the arrival and end of
every call it gets, and the test counts calls in flight at once and calls
per one-second window from those notes, never from the orchestrator's
counters.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from counting_participant import CountingParticipant, most_at_once, most_in_one_second, read_notes, serving
from harness import poll_until
from participant_helpers import checkout_input
from processes import COMPENSA, FAST_RECONNECT, ManagedProcess, ProcessSet, free_port

from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.orchestrator.shared.records import FINAL_SAGA_STATES
from compensa.orchestrator.store.capacity import (
    DELIVERY_SPREAD_SECONDS,
    MAX_SPARE_SECONDS,
    GrantingBucket,
    capacity_grant,
    granting_bucket,
)
from compensa.participants.sdk import pack
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

pytestmark = [pytest.mark.postgres]

S = saga_pb2


DEFAULT_RETRY = "retry: {max_attempts: 5, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 1s}"


def definition_file(
    tmp_path: Path, *, step_timeout: str = "", name: str = "limited", more: str = "", retry: str = DEFAULT_RETRY
) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ninput_type: compensa.checkout.v1.CheckoutInput\n{more}steps:\n"
        "  - name: charge\n    participant: gated\n    kind: COMPENSABLE\n"
        + (f"    execute_timeout: 1s\n    step_timeout: {step_timeout}\n" if step_timeout
           else "    execute_timeout: 10s\n")
        + f"    {retry}\n"
    )
    return path


def start_request(
    saga_id: str, definition: str = "limited", priority: int = 0, **values: str
) -> orchestrator_pb2.StartSagaRequest:
    return orchestrator_pb2.StartSagaRequest(
        saga_id=saga_id, definition_name=definition, input=pack(checkout_input(**values)), priority=priority
    )


def expected_state(saga_id: str) -> int:
    return S.SAGA_STATE_COMPENSATED if saga_id.endswith("-declined") else S.SAGA_STATE_SUCCEEDED


async def set_limits(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, **limits: float
) -> orchestrator_pb2.Participant:
    request = orchestrator_pb2.SetParticipantLimitsRequest(
        name="gated", limits=orchestrator_pb2.ParticipantLimits(**limits), actor="alice"  # type: ignore[arg-type]
    )
    return (await stub.SetParticipantLimits(request, timeout=10.0)).participant


async def final_states(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_ids: list[str], timeout: float
) -> dict[str, int]:
    """Polls ListSagas until every saga is final; their states."""
    async def listed() -> dict[str, int] | None:
        request = orchestrator_pb2.ListSagasRequest(page_size=1000)
        states: dict[str, int] = {}
        while True:
            try:
                response = await stub.ListSagas(request, timeout=20.0)
            except grpc.aio.AioRpcError:
                return None
            states.update((saga.saga_id, saga.state) for saga in response.sagas)
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        done = all(states.get(saga_id) in FINAL_SAGA_STATES for saga_id in saga_ids)
        return states if done else None

    result: dict[str, int] = await poll_until(listed, timeout=timeout, interval=0.5)
    return result


# --- across replicas, through an outage -------------------------------------------

SAGA_COUNT = 5000
MAX_IN_FLIGHT = 20
RATE = 100.0
BURST = 20
LEASE_SECONDS = 2.0
OUTAGE_SECONDS = 60.0
PATIENT_RETRY = (
    "retry: {max_attempts: 0, give_up_after: 1h, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 1s}"
)


# Three replica processes, 5,000 sagas: one at a time (make test's --dist loadgroup).
@pytest.mark.xdist_group("heavy")
@pytest.mark.slow
async def test_limits_hold_across_three_replicas_through_an_outage_and_a_kill(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """5,000 sagas start on three replicas while their participant is down,
    and wait for it, retrying, for 60 s. When it is back, its limits hold
    for the three together (20 calls in flight, 100 calls/s plus a burst of
    20, counted where the calls arrive: by the participant, in a process of
    its own so that this test's work does not misdate them), the oldest
    sagas go first, one replica is SIGKILLed midway, and every saga ends as
    predicted with its Execute applied once (but for the calls the dead
    replica had in flight)."""
    database = make_postgres_url()
    definition = definition_file(tmp_path, retry=PATIENT_RETRY)
    address = f"127.0.0.1:{free_port()}"
    notes = tmp_path / "calls.txt"
    with ProcessSet(tmp_path) as processes:
        participant = processes.add("participant", [
            sys.executable, str(Path(__file__).with_name("counting_participant.py")),
            "--listen", address, "--notes", str(notes), "--work-seconds", "0.05",
        ], address)
        replicas: list[ManagedProcess] = [
            processes.orchestrator(
                database, {"gated": address}, definitions=[definition], lease_seconds=LEASE_SECONDS, name=name,
                # Every saga waits for the participant at once: each replica
                # may end up with all of them (its default bound is 1,000).
                options=["--max-sagas-in-flight", str(SAGA_COUNT)],
            )
            for name in ("r0", "r1", "r2")
        ]
        for replica in replicas:  # one at a time: the first creates the schema
            await replica.start_serving(timeout=60.0)
        channels = [grpc.aio.insecure_channel(r.address, options=FAST_RECONNECT) for r in replicas]
        stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(channel) for channel in channels]
        try:
            stored = await set_limits(stubs[0], max_in_flight=MAX_IN_FLIGHT, calls_per_second=RATE, burst=BURST)
            assert (stored.limits.max_in_flight, stored.limits.calls_per_second, stored.limits.burst) == (
                MAX_IN_FLIGHT, RATE, BURST
            )
            # Each replica reads the limits within a second (at once when asked to list them).
            for stub in stubs:
                listed = await stub.ListParticipants(orchestrator_pb2.ListParticipantsRequest(), timeout=10.0)
                assert listed.participants[0].limits.max_in_flight == MAX_IN_FLIGHT
            outage_began = asyncio.get_running_loop().time()
            saga_ids = [f"fc-{n:05d}" + ("-declined" if n % 10 == 0 else "") for n in range(SAGA_COUNT)]
            await start_all(stubs, saga_ids)

            async def retrying() -> bool:
                saga = await get_saga(stubs[0], saga_ids[1])
                return saga.steps[0].attempts > 0 and bool(saga.steps[0].last_error)

            await poll_until(retrying, timeout=60.0, interval=0.5)
            outage_left = OUTAGE_SECONDS - (asyncio.get_running_loop().time() - outage_began)
            await asyncio.sleep(max(0.0, outage_left))  # ok-sleep: the outage lasts 60 s, sagas piling up
            await participant.start_serving()
            back_at = time.monotonic()
            # Mid-run, with calls waiting on every replica: r1 dies.
            await poll_until(lambda: len(read_notes(notes)) >= SAGA_COUNT // 3, timeout=180.0, interval=0.5)
            replicas[1].kill()
            states = await final_states(stubs[0], saga_ids, timeout=300.0)
        finally:
            for channel in channels:
                await channel.close()
        calls = read_notes(notes)
    arrivals = sorted(arrived for _, _, arrived, _ in calls)
    print(
        f"participant back: first call after {arrivals[0] - back_at:.1f}s, {len(calls)} calls over"
        f" {arrivals[-1] - arrivals[0]:.1f}s; at most {most_at_once(calls)} at once and"
        f" {most_in_one_second(arrivals)} in a second"
    )
    wrong = {saga_id: S.SagaState.Name(states[saga_id]) for saga_id in saga_ids  # type: ignore[arg-type]
             if states[saga_id] != expected_state(saga_id)}
    assert not wrong, f"unexpected outcomes: {list(wrong.items())[:10]}"
    assert most_at_once(calls) <= MAX_IN_FLIGHT, most_at_once(calls)
    assert most_in_one_second(arrived for _, _, arrived, _ in calls) <= RATE + BURST, most_in_one_second(
        arrived for _, _, arrived, _ in calls
    )
    executed: dict[str, int] = {}
    for saga_id, *_ in calls:
        executed[saga_id] = executed.get(saga_id, 0) + 1
    assert set(executed) == set(saga_ids)
    # Only the calls r1 had in flight at its death reach the participant twice.
    again = {saga_id: count for saga_id, count in executed.items() if count > 1}
    assert sum(again.values()) <= 2 * MAX_IN_FLIGHT, again
    # On the participant's return the oldest sagas go first: the middle of
    # the first 500 calls is far older than the middle of the last 500.
    order = [saga_ids.index(saga_id) for saga_id, *_ in sorted(calls, key=lambda call: call[2])]
    first, last = sorted(order[:500]), sorted(order[-500:])
    assert first[250] < last[250] - SAGA_COUNT // 2, (first[250], last[250])


async def start_all(stubs: list[orchestrator_pb2_grpc.OrchestratorServiceStub], saga_ids: list[str]) -> None:
    """Starts the sagas 64 at a time, spread over the replicas."""
    starts = asyncio.Semaphore(64)

    async def start(n: int, saga_id: str) -> None:
        request = start_request(saga_id)
        async with starts:
            for attempt in range(50):  # the same request again: StartSaga is idempotent
                try:
                    await stubs[(n + attempt) % len(stubs)].StartSaga(request, timeout=30.0)
                    return
                except grpc.aio.AioRpcError as error:
                    # A replica at its bound of sagas in flight, or the shared
                    # PostgreSQL short of connections a moment.
                    if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                        raise
                await asyncio.sleep(0.1)  # ok-sleep: pause before trying again
            raise AssertionError(f"{saga_id}: not started")

    await asyncio.gather(*(start(n, saga_id) for n, saga_id in enumerate(saga_ids)))


# --- one replica in this process ------------------------------------------------


@asynccontextmanager
async def orchestrator_for(
    make_url: Callable[[], str], address: str, *definitions: Path
) -> AsyncIterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    orchestrator = await start_orchestrator(ServerConfig(
        listen="127.0.0.1:0", database_url=make_url(), definition_paths=definitions,
        participants={"gated": address}, lease_seconds=5.0,
    ))
    channel = grpc.aio.insecure_channel(orchestrator.address)
    try:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    finally:
        await channel.close()
        await orchestrator.stop(0)


async def get_saga(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_id: str) -> saga_pb2.Saga:
    return (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=10.0)).saga


async def test_hold_stops_new_calls_and_release_resumes_them(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    participant = CountingParticipant()
    async with serving(participant) as address, orchestrator_for(
        make_postgres_url, address, definition_file(tmp_path)
    ) as stub:
        held = (await stub.HoldParticipant(
            orchestrator_pb2.HoldParticipantRequest(name="gated", reason="incident 42", actor="alice"), timeout=10.0
        )).participant
        assert (held.hold.reason, held.hold.held_by) == ("incident 42", "alice")
        saga_ids = [f"held-{n}" for n in range(5)]
        for saga_id in saga_ids:
            await stub.StartSaga(start_request(saga_id), timeout=10.0)

        async def shown_waiting() -> bool:
            sagas = [await get_saga(stub, saga_id) for saga_id in saga_ids]
            return all("held by alice: incident 42" in saga.steps[0].waiting_for for saga in sagas)

        await poll_until(shown_waiting, timeout=15.0)
        await asyncio.sleep(1.0)  # ok-sleep: a while in which no call may reach a held participant
        assert participant.arrivals == []
        saga = await get_saga(stub, saga_ids[0])
        assert saga.state == S.SAGA_STATE_RUNNING
        assert saga.steps[0].attempts == 0 and saga.steps[0].HasField("waiting_since")
        listed = (await stub.ListParticipants(orchestrator_pb2.ListParticipantsRequest(), timeout=10.0)).participants
        assert [p.hold.held_by for p in listed if p.name == "gated"] == ["alice"]

        released = (await stub.ReleaseParticipant(
            orchestrator_pb2.ReleaseParticipantRequest(name="gated", actor="bob"), timeout=10.0
        )).participant
        assert not released.HasField("hold")
        states = await final_states(stub, saga_ids, timeout=30.0)
        assert all(state == S.SAGA_STATE_SUCCEEDED for state in states.values()), states
        saga = await get_saga(stub, saga_ids[0])
        assert saga.steps[0].attempts == 1 and not saga.steps[0].waiting_for


async def test_step_timeout_passes_while_waiting_for_capacity(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """A step whose step_timeout passes while its call waits (here for a
    held participant) times out as any other, having made no attempt; its
    compensation waits for the participant too, and runs once released."""
    participant = CountingParticipant()
    async with serving(participant) as address, orchestrator_for(
        make_postgres_url, address, definition_file(tmp_path, step_timeout="1500ms")
    ) as stub:
        await stub.HoldParticipant(orchestrator_pb2.HoldParticipantRequest(name="gated", actor="alice"), timeout=10.0)
        await stub.StartSaga(start_request("timed"), timeout=10.0)

        async def compensation_waits() -> saga_pb2.Saga | None:
            saga = await get_saga(stub, "timed")
            waits = saga.state == S.SAGA_STATE_COMPENSATING and "held by alice" in saga.steps[0].waiting_for
            return saga if waits else None

        saga = await poll_until(compensation_waits, timeout=20.0)
        assert saga.steps[0].last_error == "step timed out", saga
        assert participant.arrivals == []
        await stub.ReleaseParticipant(orchestrator_pb2.ReleaseParticipantRequest(name="gated"), timeout=10.0)
        states = await final_states(stub, ["timed"], timeout=20.0)
        assert states["timed"] == S.SAGA_STATE_COMPENSATED
        assert participant.executed == {"timed": 1}  # the one Compensate; no Execute was ever made


BAD_LIMITS = [
    ({"max_in_flight": 0}, "limits.max_in_flight"),
    ({"max_in_flight": -3}, "limits.max_in_flight"),
    ({"max_in_flight": 10_000_000}, "limits.max_in_flight"),
    ({"calls_per_second": 0.0}, "limits.calls_per_second"),
    ({"calls_per_second": -1.0}, "limits.calls_per_second"),
    ({"calls_per_second": float("nan")}, "limits.calls_per_second"),
    ({"calls_per_second": 1e12}, "limits.calls_per_second"),
    ({"calls_per_second": 10.0, "burst": 0}, "limits.burst"),
    ({"burst": 5}, "limits.burst"),
]


async def test_limits_that_cannot_hold_are_refused(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    participant = CountingParticipant()
    async with serving(participant) as address, orchestrator_for(
        make_postgres_url, address, definition_file(tmp_path)
    ) as stub:
        for limits, field_named in BAD_LIMITS:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await set_limits(stub, **limits)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, limits
            assert field_named in (refused.value.details() or ""), (limits, refused.value.details())
        listed = (await stub.ListParticipants(orchestrator_pb2.ListParticipantsRequest(), timeout=10.0)).participants
        assert not listed[0].HasField("limits") and not listed[0].HasField("hold"), listed
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.SetParticipantLimits(orchestrator_pb2.SetParticipantLimitsRequest(
                name="nobody", limits=orchestrator_pb2.ParticipantLimits(max_in_flight=3)
            ), timeout=10.0)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


# --- order per key, and priorities ------------------------------------------------


async def test_sagas_of_one_key_run_one_at_a_time_in_start_order(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """Two steps per saga, so a saga spans two calls: the spans of sagas with
    the same card never overlap, and they run in the order they started;
    sagas of different cards run side by side."""
    participant = CountingParticipant(work_seconds=0.1)
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(
        "name: keyed\ninput_type: compensa.checkout.v1.CheckoutInput\nconcurrency_key: input.card_token\n"
        "max_running_per_key: 1\nsteps:\n"
        "  - name: reserve\n    participant: gated\n  - name: charge\n    participant: gated\n"
    )
    async with serving(participant) as address, orchestrator_for(make_postgres_url, address, keyed) as stub:
        started: dict[str, list[str]] = {"tok_a": [], "tok_b": [], "tok_c": []}
        for n in range(18):
            card = list(started)[n % 3]
            saga_id = f"key-{n:02d}"
            response = await stub.StartSaga(start_request(saga_id, "keyed", card_token=card), timeout=10.0)
            assert response.created
            started[card].append(saga_id)
        waiting = await get_saga(stub, started["tok_a"][-1])
        assert waiting.state == S.SAGA_STATE_RUNNING
        await final_states(stub, [s for ids in started.values() for s in ids], timeout=60.0)
    spans: dict[str, tuple[float, float]] = {}
    for saga_id, _, arrived, ended in participant.calls:
        first, last = spans.get(saga_id, (arrived, ended))
        spans[saga_id] = (min(first, arrived), max(last, ended))
    overlapped_across_keys = False
    for card, saga_ids in started.items():
        ordered = sorted(saga_ids, key=lambda saga_id: spans[saga_id][0])
        assert ordered == saga_ids, (card, ordered)
        for earlier, later in itertools.pairwise(saga_ids):
            assert spans[earlier][1] <= spans[later][0], (card, earlier, later)
    for one, other in zip(started["tok_a"], started["tok_b"], strict=True):
        overlapped_across_keys |= spans[one][0] < spans[other][1] and spans[other][0] < spans[one][1]
    assert overlapped_across_keys, "sagas of different keys should run side by side"


async def test_higher_priority_goes_first_when_a_limit_holds_calls_back(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    participant = CountingParticipant(work_seconds=0.1)
    async with serving(participant) as address, orchestrator_for(
        make_postgres_url, address, definition_file(tmp_path)
    ) as stub:
        await set_limits(stub, max_in_flight=2)
        low = [f"low-{n:02d}" for n in range(40)]
        high = [f"high-{n:02d}" for n in range(40)]
        # The low ones first: by the time the high ones come, the line is long.
        await asyncio.gather(*(stub.StartSaga(start_request(saga_id, priority=5), timeout=20.0) for saga_id in low))
        await asyncio.gather(*(stub.StartSaga(start_request(saga_id, priority=1), timeout=20.0) for saga_id in high))
        await final_states(stub, low + high, timeout=90.0)
        took = {}
        for saga_id in low + high:
            saga = await get_saga(stub, saga_id)
            assert saga.state == S.SAGA_STATE_SUCCEEDED
            took[saga_id] = (saga.update_time.ToNanoseconds() - saga.create_time.ToNanoseconds()) / 1e9
        assert (await get_saga(stub, high[0])).priority == 1
    median_high = sorted(took[s] for s in high)[len(high) // 2]
    median_low = sorted(took[s] for s in low)[len(low) // 2]
    assert median_high < median_low / 2, (median_high, median_low)
    assert participant.most_in_flight <= 2


async def test_definitions_of_one_priority_take_turns(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    """A burst of one definition's sagas does not starve another's: with one
    call at a time, the few sagas of the second definition, started after
    the burst, go through in turns with it, not after it."""
    participant = CountingParticipant(work_seconds=0.05)
    async with serving(participant) as address, orchestrator_for(
        make_postgres_url, address, definition_file(tmp_path, name="bursty"), definition_file(tmp_path, name="quiet")
    ) as stub:
        await set_limits(stub, max_in_flight=1)
        bursty = [f"burst-{n:02d}" for n in range(40)]
        quiet = [f"quiet-{n}" for n in range(5)]
        await asyncio.gather(*(stub.StartSaga(start_request(s, "bursty"), timeout=20.0) for s in bursty))
        await asyncio.gather(*(stub.StartSaga(start_request(s, "quiet"), timeout=20.0) for s in quiet))
        await final_states(stub, bursty + quiet, timeout=90.0)
    order = [saga_id for saga_id, *_ in sorted(participant.calls, key=lambda call: call[2])]
    last_quiet = max(order.index(saga_id) for saga_id in quiet)
    # In turns, the five come within about ten calls of the first quiet one's
    # arrival; behind the burst, they would come last.
    assert last_quiet < len(order) - 10, order


async def test_bad_keys_and_priorities_are_refused(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    participant = CountingParticipant()
    async with serving(participant) as address, orchestrator_for(
        make_postgres_url, address, definition_file(tmp_path)
    ) as stub:
        for path, named in (
            ("input.customer_id", "has no field 'customer_id'"),
            ("customer_id", "input.FIELD"),
            ("input.sku.x", "is not a message"),
        ):
            definition = (await stub.GetDefinition(
                orchestrator_pb2.GetDefinitionRequest(name="limited"), timeout=10.0
            )).definition
            definition.name = "keyed"
            definition.concurrency_key = path
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RegisterDefinition(
                    orchestrator_pb2.RegisterDefinitionRequest(definition=definition), timeout=10.0
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = refused.value.details() or ""
            assert "concurrency_key" in details and named in details, details
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetDefinition(orchestrator_pb2.GetDefinitionRequest(name="keyed"), timeout=10.0)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        for priority in (6, -1, 100):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StartSaga(start_request(f"prio-{priority}", priority=priority), timeout=10.0)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "priority must be from 1" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as absent:
                await get_saga(stub, f"prio-{priority}")
            assert absent.value.code() == grpc.StatusCode.NOT_FOUND


async def test_limits_holds_and_keys_on_the_embedded_database(tmp_path: Path) -> None:
    """The same statements on SQLite: limits hold, a hold and its release,
    and sagas of one key one at a time."""
    participant = CountingParticipant(work_seconds=0.05)
    keyed = definition_file(tmp_path, more="concurrency_key: input.card_token\n")
    async with serving(participant) as address, orchestrator_for(
        lambda: f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}", address, keyed
    ) as stub:
        await set_limits(stub, max_in_flight=2, calls_per_second=20.0)
        await stub.HoldParticipant(orchestrator_pb2.HoldParticipantRequest(name="gated", reason="x"), timeout=10.0)
        saga_ids = [f"lite-{n:02d}" for n in range(12)]
        for n, saga_id in enumerate(saga_ids):
            await stub.StartSaga(start_request(saga_id, card_token=f"tok_{n % 4}"), timeout=10.0)
        await poll_until(lambda: get_saga(stub, saga_ids[0]), timeout=10.0)
        await stub.ReleaseParticipant(orchestrator_pb2.ReleaseParticipantRequest(name="gated"), timeout=10.0)
        states = await final_states(stub, saga_ids, timeout=60.0)
    assert all(state == S.SAGA_STATE_SUCCEEDED for state in states.values()), states
    assert participant.most_in_flight <= 2
    assert participant.most_in_one_second() <= 20 + 20
    by_saga = {saga_id: (arrived, ended) for saga_id, _, arrived, ended in participant.calls}
    for card in range(4):
        same = [by_saga[saga_id] for n, saga_id in enumerate(saga_ids) if n % 4 == card]
        assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(same)), same


async def test_the_command_line_sets_limits_holds_and_releases(tmp_path: Path) -> None:
    participant = CountingParticipant()
    async with serving(participant) as address:
        orchestrator = await start_orchestrator(ServerConfig(
            listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}",
            participants={"gated": address},
        ))
        try:
            where = ("--address", orchestrator.address)
            limited = await compensa(
                *where, "participants", "limit", "gated", "--max-in-flight", "3", "--rate", "600/min"
            )
            assert limited.returncode == 0, limited.stderr
            assert limited.stdout.strip() == "gated: at most 3 calls in flight, 10 calls/s (burst 10)"
            held = await compensa(*where, "participants", "hold", "gated", "--reason", "incident 7", "--actor", "carol")
            assert held.returncode == 0 and "HELD by carol" in held.stdout and "incident 7" in held.stdout, held
            listed = await compensa(*where, "participants", "list")
            assert "at most 3 calls in flight" in listed.stdout and "HELD by carol" in listed.stdout, listed.stdout
            released = await compensa(*where, "participants", "release", "gated")
            assert released.returncode == 0 and "HELD" not in released.stdout, released
            bad = await compensa(*where, "participants", "limit", "gated", "--max-in-flight", "0")
            assert bad.returncode == 2 and "limits.max_in_flight must be from 1" in bad.stderr, bad
            bad_rate = await compensa(*where, "participants", "limit", "gated", "--rate", "fast")
            assert bad_rate.returncode == 2 and "--rate must be" in bad_rate.stderr, bad_rate
            lifted = await compensa(*where, "participants", "limit", "gated")
            assert lifted.stdout.strip() == "gated: no limits", lifted
        finally:
            await orchestrator.stop()


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def compensa(*args: str) -> Completed:
    """Runs the `compensa` command without blocking this process's servers."""
    process = await asyncio.create_subprocess_exec(
        str(COMPENSA), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60.0)
    return Completed(process.returncode or 0, stdout.decode(), stderr.decode())


# --- the budget's arithmetic ------------------------------------------------------


def test_the_bucket_keeps_a_margin_for_the_spread_of_arrivals() -> None:
    """Grants over 1 s + the spread (the trip's, and a spare token's wait)
    never exceed rate + burst: the margin comes out of the burst, or out of
    the rate when the burst is too small; spare tokens wait only on a burst
    large enough to pay for it."""
    for rate, burst in ((100.0, 20.0), (100.0, 100.0), (10.0, 1.0), (1000.0, 5.0), (0.5, 1.0), (1e5, 1e5)):
        bucket = granting_bucket(rate, burst)
        spread = DELIVERY_SPREAD_SECONDS + bucket.spare_seconds
        assert bucket.burst >= 1.0
        assert bucket.burst + bucket.rate * (1.0 + spread) <= rate + burst + 1e-6, (rate, burst)
        assert 0.0 <= bucket.spare_seconds <= MAX_SPARE_SECONDS
    assert granting_bucket(100.0, 20.0) == GrantingBucket(100.0, 20.0 - 100.0 * DELIVERY_SPREAD_SECONDS, 0.0)
    # Half of a burst of a second's calls pays for the trip's 0.1 s and a 0.4 s wait.
    assert granting_bucket(1e5, 1e5).spare_seconds == pytest.approx(0.4)


@dataclass
class BudgetRow:
    """A participant's row as the exchange reads it."""

    max_in_flight: int | None = None
    rate_per_second: float | None = None
    burst: int | None = None
    tokens: float | None = None
    tokens_at: float | None = None
    held_reason: str | None = None
    held_by: str | None = None
    others: int = 0


def test_spare_calls_are_given_only_far_from_the_limits() -> None:
    far = BudgetRow(max_in_flight=100, others=10)
    grant, _ = capacity_grant("p", far, 10, 4, 0.0, spare=50)
    assert (grant.granted, grant.spare) == (4, (100 - 10 - 10 - 4) // 4)
    near = BudgetRow(max_in_flight=20, others=10)
    grant, _ = capacity_grant("p", near, 8, 4, 0.0, spare=50)
    assert (grant.granted, grant.spare) == (2, 0), "no spare while calls wait"
    rate = BudgetRow(rate_per_second=1000.0, burst=1000, tokens=400.0, tokens_at=0.0)
    grant, tokens_left = capacity_grant("p", rate, 0, 10, 0.0, spare=500)
    assert (grant.granted, grant.spare) == (10, (400 - 10) // 4)
    assert tokens_left == 400.0 - 10 - grant.spare
    held = BudgetRow(max_in_flight=100, held_reason="incident", held_by="alice")
    grant, _ = capacity_grant("p", held, 0, 3, 0.0, spare=50)
    assert (grant.granted, grant.spare, grant.held) == (0, 0, True)
