"""Status streaming across real `compensa serve` processes on one PostgreSQL database
(issue "Status streaming").

What these prove:
- an event written by one orchestrator process reaches a WatchSaga / WatchSagas
  subscriber connected to another, in order, with no gap and no duplicate;
- when the process a subscriber streams from is SIGKILLed, the stream ends with
  UNAVAILABLE, and resuming on another process from the last sequence / position
  yields exactly the log (compared with a fresh read from 0 afterwards);
- a subscriber that stops reading does not make the server's memory grow with
  the log: it is dropped from the fan-out and, once it reads again, served from
  the log, still in order with no gap;
- `compensa watch ID --json` and `compensa watch --all --after POS --json`
  print contiguous JSON lines.

The participant is a RecordingParticipant served in the test process (the
orchestrators are the processes under test); every step answers at once except
the "long" step of the "relay-long" definition.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from participant_helpers import checkout_input
from processes import COMPENSA, FAST_RECONNECT, ManagedProcess, ProcessSet, vm_rss_kib
from recording_participant import RecordingParticipant, StepBehaviour
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.examples.server import RunningParticipant, start_server
from compensa.orchestrator.client import retry_delay
from compensa.participants.sdk import pack
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

# Several processes and many connections each: one at a time (make test's --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.xdist_group("heavy")]

S = saga_pb2
FINAL = frozenset({S.SAGA_STATE_SUCCEEDED, S.SAGA_STATE_COMPENSATED, S.SAGA_STATE_FAILED})
FINAL_EVENTS = frozenset({S.EVENT_TYPE_SAGA_SUCCEEDED, S.EVENT_TYPE_SAGA_COMPENSATED, S.EVENT_TYPE_SAGA_FAILED})
RECORDER = "recorder"
#: Seconds the "long" step of relay-long works: long enough that a kill lands while it runs.
LONG_STEP_SECONDS = 2.5

_STEP = (
    "    participant: recorder\n"
    "    kind: COMPENSABLE\n"
    "    execute_timeout: 10s\n"
    "    compensate_timeout: 10s\n"
    "    retry: {max_attempts: 4, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 1s}\n"
    "    compensate_retry: {max_attempts: 10, initial_backoff: 100ms, backoff_multiplier: 2, max_backoff: 1s}\n"
)


def _definition(name: str, steps: Sequence[str]) -> str:
    body = "".join(f"  - name: {step}\n{_STEP}" for step in steps)
    return f"name: {name}\ninput_type: compensa.checkout.v1.CheckoutInput\nsteps:\n{body}"


def write_definitions(directory: Path) -> list[Path]:
    """relay (3 quick steps), relay-one (1 quick step) and relay-long (a slow middle step)."""
    paths = []
    for name, steps in (("relay", ("a", "b", "c")), ("relay-one", ("only",)), ("relay-long", ("a", "long", "c"))):
        path = directory / f"{name}.yaml"
        path.write_text(_definition(name, steps))
        paths.append(path)
    return paths


#: Calls the in-process participant works on at once. Each call holds two
#: pooled connections (its barrier transaction, and the recording of the call),
#: so more calls than half the pool at once would wait on each other's
#: connections until the orchestrator's deadline.
PARTICIPANT_CONCURRENCY = 8


class BoundedRecorder(RecordingParticipant):
    """A RecordingParticipant that works on at most PARTICIPANT_CONCURRENCY calls at once."""

    def __init__(self, database_url: str, behaviours: dict[str, StepBehaviour]) -> None:
        engine = create_async_engine(database_url, pool_size=2 * PARTICIPANT_CONCURRENCY, max_overflow=2)
        super().__init__(engine, behaviours)
        self._slots = asyncio.Semaphore(PARTICIPANT_CONCURRENCY)

    async def Execute(self, request, context):  # type: ignore[no-untyped-def]
        async with self._slots:
            return await super().Execute(request, context)

    async def Compensate(self, request, context):  # type: ignore[no-untyped-def]
        async with self._slots:
            return await super().Compensate(request, context)


@dataclass
class Stack:
    processes: ProcessSet
    recorder: RunningParticipant
    orchestrators: list[ManagedProcess]


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path, make_url: Callable[[], str], replicas: int, *, lease_seconds: float = 1.0
) -> AsyncIterator[Stack]:
    """A RecordingParticipant in this process, `replicas` `compensa serve` processes on one database."""
    participant = BoundedRecorder(make_url(), {"long": StepBehaviour(execute_seconds=LONG_STEP_SECONDS)})
    served = await start_server(participant)
    try:
        definitions = write_definitions(tmp_path)
        database = make_url()
        with ProcessSet(tmp_path) as processes:
            orchestrators = [
                processes.orchestrator(
                    database, {RECORDER: served.address}, definitions=definitions,
                    lease_seconds=lease_seconds, name=f"orchestrator-{chr(ord('a') + n)}",
                )
                for n in range(replicas)
            ]
            # One at a time: the first creates the schema and registers the definitions.
            for orchestrator in orchestrators:
                await orchestrator.start_serving()
            yield Stack(processes, served, orchestrators)
    finally:
        await served.stop(0)


def stub_for(channel: grpc.aio.Channel) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


def start_request(definition: str, saga_id: str) -> orchestrator_pb2.StartSagaRequest:
    return orchestrator_pb2.StartSagaRequest(
        saga_id=saga_id, definition_name=definition, input=pack(checkout_input())
    )


async def start_sagas(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, definition: str, prefix: str, count: int, *, parallel: int = 16
) -> list[str]:
    ids = [f"{prefix}-{n:05d}" for n in range(count)]
    gate = asyncio.Semaphore(parallel)

    async def one(saga_id: str) -> None:
        async with gate:
            while True:
                try:
                    response = await stub.StartSaga(start_request(definition, saga_id), timeout=20.0)
                    break
                except grpc.aio.AioRpcError as error:
                    # A replica at its bound of sagas in flight says when to come back.
                    delay = retry_delay(error)
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or delay is None:
                        raise
                await asyncio.sleep(delay)  # ok-sleep: the delay the server asked for
            assert response.created

    await asyncio.gather(*(one(saga_id) for saga_id in ids))
    return ids


async def wait_final(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_ids: Sequence[str], timeout: float = 40.0
) -> dict[str, saga_pb2.Saga]:
    """Polls GetSaga until every saga is final; the sagas as they end."""
    deadline = time.monotonic() + timeout
    done: dict[str, saga_pb2.Saga] = {}
    gate = asyncio.Semaphore(16)

    async def get(saga_id: str) -> saga_pb2.Saga:
        async with gate:
            response = await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=10.0)
            return response.saga

    while True:
        pending = [saga_id for saga_id in saga_ids if saga_id not in done]
        for saga in await asyncio.gather(*(get(saga_id) for saga_id in pending)):
            if saga.state in FINAL:
                done[saga.saga_id] = saga
        if len(done) == len(saga_ids):
            return done
        assert time.monotonic() < deadline, f"{len(saga_ids) - len(done)} sagas not final after {timeout}s"
        await asyncio.sleep(0.1)  # ok-sleep: polling interval, bounded by the deadline


async def watch_saga(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_id: str, after: int = 0, timeout: float = 30.0
) -> list[saga_pb2.SagaEvent]:
    """WatchSaga to its natural end (the saga's final event)."""
    request = orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, after_sequence=after, replay_history=True)
    return [response.event async for response in stub.WatchSaga(request, timeout=timeout)]


async def read_log(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, count: int, after: int = 0, timeout: float = 30.0
) -> list[saga_pb2.SagaEvent]:
    """The first `count` events of WatchSagas after `after` (the stream never ends by itself)."""
    events: list[saga_pb2.SagaEvent] = []
    if count == 0:
        return events
    call = stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=after), timeout=timeout)
    async for response in call:
        events.append(response.event)
        if len(events) == count:
            call.cancel()
            break
    return events


def key(event: saga_pb2.SagaEvent) -> tuple[int, str, int, int]:
    return (event.position, event.saga_id, event.sequence, event.type)


def check_global_stream(events: Sequence[saga_pb2.SagaEvent], sagas: dict[str, saga_pb2.Saga]) -> None:
    """Positions strictly increasing; per saga, sequences exactly 1..n with n its final sequence."""
    positions = [event.position for event in events]
    backwards = [(a, b) for a, b in itertools.pairwise(positions) if b <= a]
    assert not backwards, f"positions not strictly increasing: {backwards[:10]}"
    per_saga: dict[str, list[int]] = {}
    for event in events:
        per_saga.setdefault(event.saga_id, []).append(event.sequence)
    assert set(per_saga) == set(sagas), f"sagas seen {len(per_saga)}, started {len(sagas)}"
    wrong = {
        saga_id: sequences
        for saga_id, sequences in per_saga.items()
        if sequences != list(range(1, sagas[saga_id].sequence + 1))
    }
    assert not wrong, f"{len(wrong)} sagas with gaps or duplicates, e.g. {list(wrong.items())[:3]}"


def check_saga_stream(events: Sequence[saga_pb2.SagaEvent], saga: saga_pb2.Saga) -> None:
    sequences = [event.sequence for event in events]
    assert sequences == list(range(1, saga.sequence + 1)), f"{saga.saga_id}: {sequences}, expected 1..{saga.sequence}"
    assert events[-1].type in FINAL_EVENTS, f"{saga.saga_id}: ends with {S.EventType.Name(events[-1].type)}"


# --- 1. a change written by one process reaches a subscriber of another ---------


async def test_events_written_by_one_process_reach_subscribers_of_another(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """Sagas started (and so driven) by A; WatchSagas and WatchSaga through B
    see every event, in order, no gap, no duplicate."""
    count = 40
    async with stack(tmp_path, make_postgres_url, 2) as rig:
        a, b = rig.orchestrators
        async with (
            grpc.aio.insecure_channel(a.address) as channel_a,
            grpc.aio.insecure_channel(b.address) as channel_b,
        ):
            stub_a, stub_b = stub_for(channel_a), stub_for(channel_b)
            # Subscribed on B before anything is written, so it all arrives live.
            live: list[saga_pb2.SagaEvent] = []
            finals = 0
            all_final = asyncio.Event()
            subscription = stub_b.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=0))

            async def follow() -> None:
                nonlocal finals
                async for response in subscription:
                    live.append(response.event)
                    if response.event.type in FINAL_EVENTS:
                        finals += 1
                        if finals == count:
                            all_final.set()

            follower = asyncio.create_task(follow())
            # A watch on B for each saga, opened right after A acknowledged the start.
            watches: dict[str, asyncio.Task[list[saga_pb2.SagaEvent]]] = {}

            async def start_and_watch(n: int) -> None:
                saga_id = f"cross-{n:03d}"
                await stub_a.StartSaga(start_request("relay", saga_id), timeout=10.0)
                watches[saga_id] = asyncio.create_task(watch_saga(stub_b, saga_id))

            await asyncio.gather(*(start_and_watch(n) for n in range(count)))
            sagas = await wait_final(stub_a, list(watches))
            per_saga = {saga_id: await asyncio.wait_for(task, 30.0) for saga_id, task in watches.items()}
            await asyncio.wait_for(all_final.wait(), 30.0)
            subscription.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

            for saga_id, events in per_saga.items():
                check_saga_stream(events, sagas[saga_id])
            total = sum(saga.sequence for saga in sagas.values())
            assert len(live) == total, f"B's WatchSagas got {len(live)} events, the log has {total}"
            check_global_stream(live, sagas)
            # And it is the log as A reads it.
            assert [key(e) for e in await read_log(stub_a, total)] == [key(e) for e in live]


# --- 2. the process a subscriber streams from is SIGKILLed ----------------------


async def test_subscriber_resumes_on_another_process_after_sigkill(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """Subscribers on A (WatchSagas from 0, WatchSaga on a long saga) while
    sagas run on A and B; A is SIGKILLed; both streams end UNAVAILABLE and
    resume on B from the last position / sequence; the concatenations are
    exactly the log read afresh afterwards."""
    async with stack(tmp_path, make_postgres_url, 2) as rig:
        a, b = rig.orchestrators
        async with (
            grpc.aio.insecure_channel(a.address, options=FAST_RECONNECT) as channel_a,
            grpc.aio.insecure_channel(b.address) as channel_b,
        ):
            stub_a, stub_b = stub_for(channel_a), stub_for(channel_b)
            global_events: list[saga_pb2.SagaEvent] = []
            long_events: list[saga_pb2.SagaEvent] = []
            global_error: list[grpc.aio.AioRpcError] = []
            long_error: list[grpc.aio.AioRpcError] = []

            async def consume(call: AsyncIterator[object], into: list[saga_pb2.SagaEvent],
                              errors: list[grpc.aio.AioRpcError]) -> None:
                try:
                    async for response in call:
                        into.append(response.event)  # type: ignore[attr-defined]
                except grpc.aio.AioRpcError as error:
                    errors.append(error)

            global_task = asyncio.create_task(
                consume(stub_a.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=0)),
                        global_events, global_error)
            )
            # The long saga is started through B, so that it keeps running
            # while A is down; its watcher streams from A.
            long_id = f"long-{uuid.uuid4().hex[:8]}"
            await stub_b.StartSaga(start_request("relay-long", long_id), timeout=10.0)
            long_task = asyncio.create_task(
                consume(stub_a.WatchSaga(orchestrator_pb2.WatchSagaRequest(
                    saga_id=long_id, replay_history=True
                )), long_events, long_error)
            )
            # Load on both: A's sagas are taken over by B when A's leases expire.
            ids = [long_id]
            ids += await start_sagas(stub_a, "relay", "on-a", 60)
            ids += await start_sagas(stub_b, "relay", "on-b", 60)
            more_a = asyncio.create_task(start_sagas(stub_a, "relay-long", "long-on-a", 10))
            # Kill A once both streams have delivered something and the long step is running.
            deadline = time.monotonic() + 20.0
            while not (len(global_events) >= 50 and len(long_events) >= 3):
                assert time.monotonic() < deadline, f"streams from A too slow: {len(global_events)}, {len(long_events)}"
                await asyncio.sleep(0.02)  # ok-sleep: polling interval, bounded by the deadline
            ids += await more_a
            a.kill()
            killed_with = (len(global_events), len(long_events))
            await asyncio.wait_for(asyncio.gather(global_task, long_task), 15.0)
            for name, errors in (("WatchSagas", global_error), ("WatchSaga", long_error)):
                assert errors, f"{name} from the killed process ended without an error"
                assert errors[0].code() == grpc.StatusCode.UNAVAILABLE, (
                    f"{name} ended with {errors[0].code().name}: {errors[0].details()}"
                )
            assert long_events[-1].type not in FINAL_EVENTS, (
                "the long saga ended before the kill; the test proved little"
            )

            # Resume on B from where each stream stopped.
            resumed_long = await watch_saga(stub_b, long_id, after=long_events[-1].sequence)
            long_events += resumed_long
            sagas = await wait_final(stub_b, ids)
            total = sum(saga.sequence for saga in sagas.values())
            last_position = global_events[-1].position if global_events else 0
            global_events += await read_log(stub_b, total - len(global_events), after=last_position)

            # Fresh reads from 0 afterwards, on B: the whole log.
            fresh_global = await read_log(stub_b, total)
            fresh_long = await watch_saga(stub_b, long_id)
            print(f"\nkilled A after {killed_with[0]} WatchSagas / {killed_with[1]} WatchSaga events; "
                  f"resumed with {len(global_events) - killed_with[0]} / {len(resumed_long)}; log {total} events")
            assert [key(e) for e in global_events] == [key(e) for e in fresh_global]
            check_global_stream(global_events, sagas)
            assert [key(e) for e in long_events] == [key(e) for e in fresh_long]
            check_saga_stream(long_events, sagas[long_id])
            assert sagas[long_id].state == S.SAGA_STATE_SUCCEEDED


# --- 3. a subscriber that stops reading --------------------------------------------


#: The slow subscriber's channel: no BDP probing, so gRPC's receive window stays
#: at its initial 64 KiB and the server's stream blocks soon after the reader
#: stops (with probing the window grows to megabytes, and the whole run could
#: sit in the transport instead of exercising the per-subscriber buffer).
SLOW_READER_OPTIONS = (("grpc.http2.bdp_probe", 0),)
SLOW_SAGAS = 1600
#: Warm-up sagas before the baseline RSS: the process's steady-state memory
#: (connection pools, caches, arenas grown by concurrent drivers) is then in it.
WARMUP_SAGAS = 150
#: Allowed RSS growth while the subscriber does not read. What it may hold: its
#: buffer of 1,000 events (a few hundred KiB as Python objects) and the HTTP/2
#: windows (64 KiB client receive + the server's write buffers), plus allocator
#: noise from 1,600 sagas run meanwhile. Holding the backlog instead (~6,400
#: events as protobufs and Python objects, a few KiB each with the grpc write
#: path) would cost tens of MiB; 24 MiB separates the two.
RSS_GROWTH_LIMIT_KIB = 24 * 1024


async def test_slow_subscriber_does_not_grow_memory_and_catches_up(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with stack(tmp_path, make_postgres_url, 1) as rig:
        (orchestrator,) = rig.orchestrators
        assert orchestrator.pid is not None
        async with (
            grpc.aio.insecure_channel(orchestrator.address) as channel,
            grpc.aio.insecure_channel(orchestrator.address, options=SLOW_READER_OPTIONS) as slow_channel,
        ):
            stub = stub_for(channel)
            warm = await start_sagas(stub, "relay-one", "warm", WARMUP_SAGAS, parallel=32)
            warm_sagas = await wait_final(stub, warm)
            head = (await read_log(stub, sum(s.sequence for s in warm_sagas.values())))[-1].position
            rss_before = vm_rss_kib(orchestrator.pid)

            slow = stub_for(slow_channel).WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=head))
            first_task = asyncio.create_task(slow.read())
            t0 = time.monotonic()
            ids = await start_sagas(stub, "relay-one", "slow", SLOW_SAGAS, parallel=32)
            first = await asyncio.wait_for(first_task, 10.0)
            assert isinstance(first, orchestrator_pb2.WatchSagasResponse)
            sagas = await wait_final(stub, ids, timeout=60.0)
            ran = time.monotonic() - t0
            rss_after = vm_rss_kib(orchestrator.pid)
            total = sum(saga.sequence for saga in sagas.values())
            growth = rss_after - rss_before
            print(f"\n{SLOW_SAGAS} sagas, {total} events in {ran:.1f}s; RSS {rss_before} -> {rss_after} KiB "
                  f"(+{growth} KiB) with a subscriber that read 1 event")
            assert total > 4 * 1000, "too few events to overflow the subscriber's buffer"
            assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew {growth} KiB while a subscriber did not read"

            # Reading again: every event, in order, no gap (served from the log on catch-up).
            events = [first.event]
            deadline = time.monotonic() + 30.0
            while len(events) < total:
                response = await asyncio.wait_for(slow.read(), max(0.1, deadline - time.monotonic()))
                assert response is not grpc.aio.EOF, "stream ended"
                events.append(response.event)
            slow.cancel()
            check_global_stream(events, sagas)
            assert [key(e) for e in events] == [key(e) for e in await read_log(stub, total, after=head)]


# --- the CLI against a process --------------------------------------------------------


async def run_cli(args: Sequence[str], *, lines: int | None = None, timeout: float = 20.0) -> list[dict[str, object]]:
    """Runs `compensa ARGS`; its JSON lines. With `lines`, stops it after that
    many (for streams that never end); without, it must exit 0 by itself."""
    process = await asyncio.create_subprocess_exec(
        str(COMPENSA), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    out: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(timeout):
            while lines is None or len(out) < lines:
                line = await process.stdout.readline()
                if not line:
                    break
                out.append(json.loads(line))
            if lines is None:
                code = await process.wait()
                stderr = (await process.stderr.read()).decode()
                assert code == 0, f"compensa {' '.join(args)} exited {code}: {stderr}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return out


async def test_cli_watch_prints_contiguous_json_lines(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with stack(tmp_path, make_postgres_url, 2) as rig:
        a, b = rig.orchestrators
        async with grpc.aio.insecure_channel(a.address) as channel:
            stub = stub_for(channel)
            first = await start_sagas(stub, "relay", "cli-first", 5)
            first_log = await read_log(stub, sum(s.sequence for s in (await wait_final(stub, first)).values()))
            after = first_log[len(first_log) // 2].position
            # `watch ID` on B of a saga that runs on A: it ends by itself at the final event.
            long_id = "cli-long"
            await stub.StartSaga(start_request("relay-long", long_id), timeout=10.0)
            one = await run_cli(["watch", long_id, "--json", "--address", b.address], timeout=30.0)
            more = await start_sagas(stub, "relay", "cli-more", 5)
            sagas = await wait_final(stub, [*first, long_id, *more])
            total = sum(saga.sequence for saga in sagas.values())
            expected = [e for e in await read_log(stub, total) if e.position > after]
            every = await run_cli(
                ["watch", "--all", "--after", str(after), "--json", "--address", b.address], lines=len(expected)
            )
        assert [int(str(line["sequence"])) for line in one] == list(range(1, sagas[long_id].sequence + 1))
        assert {line["saga_id"] for line in one} == {long_id}
        assert one[-1]["type"] == "EVENT_TYPE_SAGA_SUCCEEDED"
        positions = [int(str(line["position"])) for line in every]
        assert positions == [e.position for e in expected], "watch --all --after is not the log after POS"
        assert positions[0] > after and all(b > a for a, b in itertools.pairwise(positions))
        assert [(line["saga_id"], int(str(line["sequence"]))) for line in every] == [
            (e.saga_id, e.sequence) for e in expected
        ]
