"""WatchSaga and WatchSagas: gap-free, duplicate-free, resumable, across processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from harness import checkout_stack

from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

S = saga_pb2


async def _collect(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_id: str, after: int = 0) -> list[int]:
    return [
        response.event.sequence
        async for response in stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(
            saga_id=saga_id, after_sequence=after, replay_history=True
        ))
    ]


async def test_watch_replays_the_log_and_resumes_from_any_sequence(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        saga_id = await stack.start(card_token="flagged")
        saga = await stack.wait_final(saga_id)
        full = await _collect(stack.stub, saga_id)
        assert full == list(range(1, saga.sequence + 1))
        for after in (1, 4, saga.sequence - 1):
            assert await _collect(stack.stub, saga_id, after) == list(range(after + 1, saga.sequence + 1))


async def test_a_subscriber_that_disconnects_and_resumes_misses_nothing(
    make_postgres_url: Callable[[], str],
) -> None:
    # Slow steps, so the saga is still running when the subscriber drops.
    faults = {kind: FaultPlan(delay_seconds=0.2) for kind in ("inventory", "payment", "shipping")}
    async with checkout_stack(make_postgres_url, faults=faults) as stack:
        saga_id = await stack.start()
        seen: list[int] = []
        call = stack.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True))
        async for response in call:
            seen.append(response.event.sequence)
            if len(seen) == 3:
                call.cancel()
                break
        assert seen == [1, 2, 3]
        seen += await _collect(stack.stub, saga_id, after=seen[-1])
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        assert seen == list(range(1, saga.sequence + 1))


async def test_a_change_made_by_one_orchestrator_reaches_a_watcher_on_another(
    make_postgres_url: Callable[[], str],
) -> None:
    faults = {"payment": FaultPlan(delay_seconds=0.3)}
    async with checkout_stack(make_postgres_url, faults=faults) as stack:
        # A second orchestrator on the same database. Its watchers never
        # re-read on their own, so only LISTEN/NOTIFY can wake them.
        async with stack.another_replica(watch_reread_seconds=3600) as other:
            async with grpc.aio.insecure_channel(other.address) as channel:
                other_stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                saga_id = "cross-1"
                await stack.start(saga_id=saga_id)
                sequences = await asyncio.wait_for(_collect(other_stub, saga_id), 30)
                saga = (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
                assert saga.state == S.SAGA_STATE_SUCCEEDED
                assert sequences == list(range(1, saga.sequence + 1))


async def test_watch_all_sagas_in_log_order_resumable_by_position(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        ids = [await stack.start(saga_id=f"all-{i}", card_token="flagged" if i % 2 else "ok") for i in range(6)]
        finals = {saga_id: await stack.wait_final(saga_id) for saga_id in ids}
        total = sum(saga.sequence for saga in finals.values())
        events: list[saga_pb2.SagaEvent] = []
        call = stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest())
        async for response in call:
            events.append(response.event)
            if len(events) == total:
                call.cancel()
                break
        positions = [event.position for event in events]
        assert positions == sorted(positions) and len(set(positions)) == total
        for saga_id, saga in finals.items():
            assert [e.sequence for e in events if e.saga_id == saga_id] == list(range(1, saga.sequence + 1))
        # Resume from the middle: exactly the rest, nothing twice.
        middle = positions[total // 2 - 1]
        rest: list[int] = []
        call = stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=middle))
        async for response in call:
            rest.append(response.event.position)
            if len(rest) == total - total // 2:
                call.cancel()
                break
        assert rest == positions[total // 2 :]
        # The filter keeps only what was asked for.
        finished: list[saga_pb2.SagaEvent] = []
        call = stack.stub.WatchSagas(
            orchestrator_pb2.WatchSagasRequest(definition_name="checkout", saga_state=S.SAGA_STATE_COMPENSATED)
        )
        async for response in call:
            finished.append(response.event)
            if len(finished) == 3:
                call.cancel()
                break
        assert {e.saga_id for e in finished} == {"all-1", "all-3", "all-5"}
        assert all(e.type == S.EVENT_TYPE_SAGA_COMPENSATED for e in finished)


async def test_watch_bad_input(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _collect(stack.stub, "no-such-saga")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        saga_id = await stack.start()
        saga = await stack.wait_final(saga_id)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _collect(stack.stub, saga_id, after=-1)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=-5)):
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for too_many in (-1, 1001):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in stack.stub.WatchSagas(
                    orchestrator_pb2.WatchSagasRequest(max_events_per_message=too_many)
                ):
                    pass
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_events_per_message must be from 0 to 1000" in (error.value.details() or "")
        for bad_window, max_events, complaint in (
            (Duration(seconds=-1), 10, "batch_window must be from 0 to 1s"),
            (Duration(seconds=2), 10, "batch_window must be from 0 to 1s"),
            (Duration(nanos=100_000_000), 0, "batch_window needs max_events_per_message"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in stack.stub.WatchSagas(
                    orchestrator_pb2.WatchSagasRequest(max_events_per_message=max_events, batch_window=bad_window)
                ):
                    pass
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert complaint in (error.value.details() or "")
        # A sequence beyond the latest is the future: the stream waits.
        received: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for response in stack.stub.WatchSaga(
                orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, after_sequence=saga.sequence + 10), timeout=0.5
            ):
                received.append(response.event.sequence)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert received == []


async def test_watch_from_zero_starts_with_a_snapshot_then_the_events_after_it(
    make_postgres_url: Callable[[], str],
) -> None:
    faults = {kind: FaultPlan(delay_seconds=0.2) for kind in ("inventory", "payment", "shipping")}
    async with checkout_stack(make_postgres_url, faults=faults) as stack:
        saga_id = await stack.start()
        # Wait until the saga is a few events in, so the snapshot is not its start.
        first = stack.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True))
        async for response in first:
            if response.event.sequence == 3:
                first.cancel()
                break
        responses = [
            response async for response in stack.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id))
        ]
        assert responses[0].WhichOneof("update") == "snapshot"
        snapshot = responses[0].snapshot
        assert snapshot.saga_id == saga_id and snapshot.state == S.SAGA_STATE_RUNNING and snapshot.sequence >= 3
        assert all(response.WhichOneof("update") == "event" for response in responses[1:])
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        # The events after the snapshot, every one, ending at the final event.
        assert [r.event.sequence for r in responses[1:]] == list(range(snapshot.sequence + 1, saga.sequence + 1))
        # The snapshot agrees with the log up to its sequence: replaying the
        # log to that point gives the same step states.
        replay = [
            r.event async for r in stack.stub.WatchSaga(
                orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True)
            )
        ]
        step_states = {}
        for event in replay[: snapshot.sequence]:
            if event.step_name:
                step_states[event.step_name] = event.step_state
        assert {step.name: step.state for step in snapshot.steps if step.name in step_states} == step_states
        # A final saga: the snapshot alone, and the stream ends.
        responses = [
            response async for response in stack.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id))
        ]
        assert len(responses) == 1 and responses[0].snapshot.state == S.SAGA_STATE_SUCCEEDED
        assert responses[0].snapshot.sequence == saga.sequence


async def test_watch_all_in_batches_sends_the_same_events_fewer_messages(
    make_postgres_url: Callable[[], str],
) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        ids = [await stack.start(saga_id=f"batch-{i}") for i in range(5)]
        total = sum([(await stack.wait_final(saga_id)).sequence for saga_id in ids])
        singles: list[int] = []
        call = stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest())
        async for response in call:
            assert not response.events
            singles.append(response.event.position)
            if len(singles) == total:
                call.cancel()
                break
        batches: list[list[int]] = []
        call = stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(max_events_per_message=7))
        async for response in call:
            assert not response.HasField("event") and 1 <= len(response.events) <= 7
            batches.append([event.position for event in response.events])
            if sum(map(len, batches)) == total:
                call.cancel()
                break
        assert [position for batch in batches for position in batch] == singles
        assert len(batches) == -(-total // 7)  # the log was there already: full batches, then the rest
        # Live events arrive batched too, and a resumed stream goes on from its cursor.
        call = stack.stub.WatchSagas(
            orchestrator_pb2.WatchSagasRequest(after_position=singles[-1], max_events_per_message=50)
        )
        live_id = await stack.start(saga_id="batch-live")
        live_total = (await stack.wait_final(live_id)).sequence
        live: list[saga_pb2.SagaEvent] = []
        async for response in call:
            live.extend(response.events)
            if len(live) >= live_total:
                call.cancel()
                break
        assert [event.sequence for event in live] == list(range(1, live_total + 1))
        assert {event.saga_id for event in live} == {live_id}


async def test_a_batch_window_gathers_live_events_into_fewer_messages(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        call = stack.stub.WatchSagas(
            orchestrator_pb2.WatchSagasRequest(max_events_per_message=100, batch_window=Duration(seconds=1))
        )
        stream = aiter(call)
        # A first saga, seen through the stream: from then on the stream is live.
        warm_id = await stack.start(saga_id="warm-up")
        warm_total = (await stack.wait_final(warm_id)).sequence
        seen = 0
        while seen < warm_total:
            seen += len((await anext(stream)).events)
        # Then a saga whose four commits are four messages without a window.
        saga_id = await stack.start(saga_id="windowed")
        total = (await stack.wait_final(saga_id)).sequence
        messages: list[list[int]] = []
        while sum(map(len, messages)) < total:
            messages.append([event.sequence for event in (await anext(stream)).events])
        call.cancel()
        assert [sequence for message in messages for sequence in message] == list(range(1, total + 1))
        # The saga runs well within the window after its first event.
        assert len(messages) <= 2, f"no batching within the window: {messages}"
