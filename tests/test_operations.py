"""Long-running steps, durable timeouts, operator actions and stuck sagas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from harness import FINAL, checkout_input, poll_until, scrape
from scripted_participant import ScriptedParticipant, serve_scripted

from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.engine.tokens import completion_token
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

S = saga_pb2

FLOW = """
name: flow
input_type: compensa.checkout.v1.CheckoutInput
{saga_timeout}steps:
  - name: reserve
    participant: scripted
    execute_timeout: 1s
    compensate_timeout: 1s
    compensate_retry: {{max_attempts: 3, initial_backoff: 20ms, backoff_multiplier: 1, max_backoff: 20ms}}
  - name: hold
    participant: scripted
    long_running: true
    execute_timeout: 1s
    step_timeout: {hold_timeout}
    compensate_retry: {{max_attempts: 3, initial_backoff: 20ms, backoff_multiplier: 1, max_backoff: 20ms}}
  - name: finish
    participant: scripted
    kind: PIVOT
    execute_timeout: 1s
"""


@dataclass
class Rig:
    participant: ScriptedParticipant
    address: str
    database_url: str
    definition: Path
    retention_seconds: float | None = None
    metrics_listen: str | None = None
    orchestrator: RunningOrchestrator | None = None
    channel: grpc.aio.Channel | None = None
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub | None = None

    async def start(self) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
        self.orchestrator = await start_orchestrator(
            ServerConfig(
                listen="127.0.0.1:0",
                database_url=self.database_url,
                definition_paths=(self.definition,),
                participants={"scripted": self.address},
                retention_seconds=self.retention_seconds,
                metrics_listen=self.metrics_listen,
            )
        )
        self.channel = grpc.aio.insecure_channel(self.orchestrator.address)
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)
        return self.stub

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.orchestrator is not None:
            await self.orchestrator.stop(0)
        self.orchestrator = self.channel = self.stub = None

    async def saga(self, saga_id: str) -> saga_pb2.Saga:
        assert self.stub is not None
        return (await self.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga

    async def until(
        self, saga_id: str, predicate: Callable[[saga_pb2.Saga], bool], timeout: float = 15
    ) -> saga_pb2.Saga:
        async def check() -> saga_pb2.Saga | None:
            saga = await self.saga(saga_id)
            return saga if predicate(saga) else None

        result: saga_pb2.Saga = await poll_until(check, timeout)
        return result

    async def final(self, saga_id: str, timeout: float = 15) -> saga_pb2.Saga:
        return await self.until(saga_id, lambda saga: saga.state in FINAL, timeout)

    async def events(self, saga_id: str) -> list[saga_pb2.SagaEvent]:
        assert self.stub is not None
        return [r.event async for r in self.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(
            saga_id=saga_id, replay_history=True
        ))]

    async def begin(self, saga_id: str) -> None:
        assert self.stub is not None
        await self.stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="flow", input=checkout_input())
        )


@asynccontextmanager
async def rig(
    tmp_path: Path,
    make_postgres_url: Callable[[], str],
    hold_timeout: str = "30m",
    saga_timeout: str = "",
    retention_seconds: float | None = None,
    metrics_listen: str | None = None,
) -> AsyncIterator[Rig]:
    participant = ScriptedParticipant()
    server, address = await serve_scripted(participant)
    definition = tmp_path / "flow.yaml"
    definition.write_text(
        FLOW.format(hold_timeout=hold_timeout, saga_timeout=f"saga_timeout: {saga_timeout}\n" if saga_timeout else "")
    )
    setup = Rig(participant, address, make_postgres_url(), definition, retention_seconds, metrics_listen)
    await setup.start()
    try:
        yield setup
    finally:
        await setup.stop()
        await server.stop(0)


def _step(saga: saga_pb2.Saga, name: str) -> saga_pb2.Step:
    return next(step for step in saga.steps if step.name == name)


def _waiting(saga: saga_pb2.Saga) -> bool:
    return _step(saga, "hold").state == S.STEP_STATE_WAITING


async def test_long_running_step_waits_without_holding_anything_then_completes(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with rig(tmp_path, make_postgres_url) as r:
        r.participant.script("execute", "hold", "pending")
        await r.begin("long-1")
        await r.until("long-1", _waiting)
        assert r.orchestrator is not None and r.stub is not None
        # Waiting is a row, not a task: the engine drives nothing.
        await poll_until(lambda: not r.orchestrator.engine._driving)  # type: ignore[union-attr]
        token = r.participant.of("execute", "hold")[0].token
        assert token
        output = any_pb2.Any()
        output.Pack(wrappers_pb2.StringValue(value="approved"))
        request = orchestrator_pb2.CompleteStepRequest(
            completion_token=token, result=orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED, output=output
        )
        await r.stub.CompleteStep(request)
        saga = await r.final("long-1")
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        assert _step(saga, "hold").output == output
        # The same report again is fine; a contradicting one is not.
        again = await r.stub.CompleteStep(request)
        assert again.saga.state == S.SAGA_STATE_SUCCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await r.stub.CompleteStep(
                orchestrator_pb2.CompleteStepRequest(
                    completion_token=token, result=orchestrator_pb2.COMPLETION_RESULT_FAILED
                )
            )
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await r.stub.CompleteStep(orchestrator_pb2.CompleteStepRequest(completion_token="!!", result=1))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(r.participant.of("execute", "finish")) == 1
        # Tokens are signed: one made up for another waiting saga is refused
        # and changes nothing.
        r.participant.script("execute", "hold", "pending")
        await r.begin("long-2")
        await r.until("long-2", _waiting)
        signed_elsewhere = completion_token(b"another deployment's key".ljust(32), "long-2", "hold")
        payload, _, mac = token.rpartition(".")
        for forged in (
            signed_elsewhere,
            signed_elsewhere.rpartition(".")[0],  # unsigned
            f"{payload}.{mac[::-1]}",  # long-1's own token, tampered
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await r.stub.CompleteStep(
                    orchestrator_pb2.CompleteStepRequest(
                        completion_token=forged, result=orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED
                    )
                )
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not issued by this deployment" in (error.value.details() or "")
        waiting = (await r.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="long-2"))).saga
        assert _step(waiting, "hold").state == S.STEP_STATE_WAITING


async def test_an_execute_answer_without_a_result_is_a_participant_error_retried_then_failed(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with rig(tmp_path, make_postgres_url) as r:
        # Forgetting to set `result` is not success: retried like a transient error.
        r.participant.script("execute", "reserve", "empty")
        await r.begin("empty-1")
        r.participant.script("execute", "hold", "ok")
        saga = await r.final("empty-1")
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        assert len(r.participant.of("execute", "reserve")) == 2
        retries = [e for e in await r.events("empty-1") if e.type == S.EVENT_TYPE_STEP_RETRY_SCHEDULED]
        assert len(retries) == 1 and "EXECUTE_RESULT_UNSPECIFIED" in retries[0].message
        # Every attempt answered without a result: the step fails saying why,
        # and the saga compensates.
        r.participant.script("execute", "reserve", "empty", "empty", "empty")
        await r.begin("empty-2")
        saga = await r.final("empty-2")
        assert saga.state == S.SAGA_STATE_COMPENSATED
        reserve = _step(saga, "reserve")
        assert reserve.state == S.STEP_STATE_COMPENSATED
        assert "without a result" in reserve.last_error, reserve.last_error
        assert not [call for call in r.participant.of("execute", "hold") if call.saga_id == "empty-2"]


async def test_a_wait_survives_an_orchestrator_restart(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    async with rig(tmp_path, make_postgres_url) as r:
        r.participant.script("execute", "hold", "pending")
        await r.begin("long-2")
        await r.until("long-2", _waiting)
        token = r.participant.of("execute", "hold")[0].token
        await r.stop()
        stub = await r.start()
        await stub.CompleteStep(
            orchestrator_pb2.CompleteStepRequest(
                completion_token=token, result=orchestrator_pb2.COMPLETION_RESULT_FAILED, failure_reason="rejected"
            )
        )
        saga = await r.final("long-2")
        assert saga.state == S.SAGA_STATE_COMPENSATED
        assert "rejected" in saga.failure_reason
        assert [c.step for c in r.participant.of("compensate")] == ["reserve"]


async def test_step_timeout_is_durable_and_fires_once_across_a_restart(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with rig(tmp_path, make_postgres_url, hold_timeout="1500ms") as r:
        r.participant.script("execute", "hold", "pending")
        await r.begin("timeout-1")
        await r.until("timeout-1", _waiting)
        await r.stop()  # nobody runs while the deadline passes
        await r.start()
        saga = await r.final("timeout-1", timeout=20)
        assert saga.state == S.SAGA_STATE_COMPENSATED
        assert saga.failure_reason == "step 'hold' failed: step timed out"
        events = await r.events("timeout-1")
        assert [e.step_name for e in events if e.type == S.EVENT_TYPE_STEP_FAILED] == ["hold"]
        # The step's outcome was unknown, so it was compensated too, in reverse order.
        assert [c.step for c in r.participant.of("compensate")] == ["hold", "reserve"]


async def test_saga_timeout_is_durable_and_compensates_across_a_restart(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    # The whole saga gets 2 s; its long-running step alone would wait 30 minutes.
    async with rig(tmp_path, make_postgres_url, saga_timeout="2s") as r:
        r.participant.script("execute", "hold", "pending")
        await r.begin("saga-timeout-1")
        waiting = await r.until("saga-timeout-1", _waiting)
        token = r.participant.of("execute", "hold")[0].token
        await r.stop()  # nobody runs while the saga's deadline passes
        await r.start()
        saga = await r.final("saga-timeout-1", timeout=20)
        assert saga.state == S.SAGA_STATE_COMPENSATED
        assert saga.failure_reason == "saga timed out"
        assert saga.update_time.ToMilliseconds() >= waiting.create_time.ToMilliseconds() + 2000
        # The waiting step's outcome was unknown: compensated too, in reverse order, once.
        assert [c.step for c in r.participant.of("compensate")] == ["hold", "reserve"]
        assert r.participant.of("execute", "finish") == []
        # The participant's late answer no longer changes anything.
        assert r.stub is not None
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await r.stub.CompleteStep(
                orchestrator_pb2.CompleteStepRequest(
                    completion_token=token, result=orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED
                )
            )
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (await r.saga("saga-timeout-1")).sequence == saga.sequence


async def test_cancel_compensates_what_was_done_and_records_who(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with rig(tmp_path, make_postgres_url) as r:
        assert r.stub is not None
        r.participant.script("execute", "hold", "pending", "pending")
        await r.begin("cancel-1")
        await r.until("cancel-1", _waiting)
        response = await r.stub.CancelSaga(
            orchestrator_pb2.CancelSagaRequest(saga_id="cancel-1", actor="alice", reason="customer changed mind")
        )
        assert response.saga.state in (S.SAGA_STATE_COMPENSATING, S.SAGA_STATE_COMPENSATED)
        saga = await r.final("cancel-1")
        assert saga.state == S.SAGA_STATE_COMPENSATED
        cancel = [e for e in await r.events("cancel-1") if e.type == S.EVENT_TYPE_CANCEL_REQUESTED]
        assert [(e.actor, e.message) for e in cancel] == [("alice", "customer changed mind")]
        assert [c.step for c in r.participant.of("compensate")] == ["hold", "reserve"]
        # Cancelling again is a no-op; unknown and finished sagas are refused.
        again = await r.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="cancel-1"))
        assert again.saga.sequence == saga.sequence
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await r.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="nope"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        await r.begin("cancel-2")
        await r.until("cancel-2", _waiting)
        for call in r.participant.of("execute", "hold"):
            if call.saga_id == "cancel-2":
                await r.stub.CompleteStep(
                    orchestrator_pb2.CompleteStepRequest(
                        completion_token=call.token, result=orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED
                    )
                )
        assert (await r.final("cancel-2")).state == S.SAGA_STATE_SUCCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await r.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="cancel-2"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_failing_compensation_alerts_then_operator_retry_finishes_it(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with rig(tmp_path, make_postgres_url, metrics_listen="127.0.0.1:0") as r:
        assert r.stub is not None and r.orchestrator is not None and r.orchestrator.metrics_port is not None
        r.participant.script("execute", "hold", "fail")
        r.participant.script("compensate", "reserve", "fail", "fail", "fail")
        await r.begin("comp-1")
        saga = await r.final("comp-1")
        assert saga.state == S.SAGA_STATE_FAILED
        assert _step(saga, "reserve").state == S.STEP_STATE_COMPENSATION_FAILED
        events = await r.events("comp-1")
        alerts = [e for e in events if e.type == S.EVENT_TYPE_ALERT_RAISED]
        assert len(alerts) == 1 and "reserve" in alerts[0].message
        # What a person is paged on.
        samples = await scrape(r.orchestrator.metrics_port)
        assert samples[("compensa_alerts_total", frozenset({("definition", "flow"), ("reason", "saga")}))] == 1
        compensate_errors = ("compensa_participant_call_seconds_count",
                             frozenset({
                                 ("participant", "scripted"), ("method", "Compensate"), ("outcome", "INTERNAL")
                             }))
        assert samples[compensate_errors] == 3
        # A person fixed the participant; retry runs the compensation again.
        retried = await r.stub.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id="comp-1", actor="bob"))
        assert retried.saga.state == S.SAGA_STATE_COMPENSATING
        saga = await r.final("comp-1")
        assert saga.state == S.SAGA_STATE_COMPENSATED
        assert len(r.participant.of("compensate", "reserve")) == 4
        retry_events = [e for e in await r.events("comp-1") if e.type == S.EVENT_TYPE_OPERATOR_RETRIED]
        assert [e.actor for e in retry_events] == ["bob"]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await r.stub.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id="comp-1"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# Quotes, a backslash, a newline and non-ASCII text: stored and read back as written.
NOTE = 'released stock by hand: "ação manual" \\ nº 7\nok ✓'


async def test_operator_resolves_a_failed_saga_by_hand(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    async with rig(tmp_path, make_postgres_url) as r:
        assert r.stub is not None
        r.participant.script("execute", "hold", "fail")
        r.participant.script("compensate", "reserve", "fail", "fail", "fail")
        await r.begin("resolve-1")
        assert (await r.final("resolve-1")).state == S.SAGA_STATE_FAILED
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await r.stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="resolve-1", note=" "))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        resolved = await r.stub.ResolveSaga(
            orchestrator_pb2.ResolveSagaRequest(saga_id="resolve-1", actor="carol", note=NOTE)
        )
        assert resolved.saga.resolution_note == NOTE
        assert (await r.saga("resolve-1")).resolution_note == NOTE  # as stored
        resolved_events = [e for e in await r.events("resolve-1") if e.type == S.EVENT_TYPE_OPERATOR_RESOLVED]
        assert [(e.actor, e.message) for e in resolved_events] == [("carol", NOTE)]
        for action in (
            r.stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="resolve-1", note="again")),
            r.stub.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id="resolve-1")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await action
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_stuck_sagas_are_listed(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    async with rig(tmp_path, make_postgres_url) as r:
        assert r.stub is not None
        r.participant.script("execute", "hold", "pending")
        await r.begin("stuck-1")
        await r.until("stuck-1", _waiting)
        await r.begin("done-1")
        for call in r.participant.of("execute", "hold"):
            if call.saga_id == "done-1":
                await r.stub.CompleteStep(
                    orchestrator_pb2.CompleteStepRequest(
                        completion_token=call.token, result=orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED
                    )
                )
        await r.final("done-1")
        stub = r.stub

        async def stuck() -> list[str]:
            page = await stub.ListSagas(
                orchestrator_pb2.ListSagasRequest(stuck_for=duration_pb2.Duration(nanos=300_000_000))
            )
            return [saga.saga_id for saga in page.sagas]

        assert await poll_until(stuck) == ["stuck-1"]


async def test_summary_counts_states_stuck_and_unresolved(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    async with rig(tmp_path, make_postgres_url) as r:
        assert r.stub is not None
        stub = r.stub
        r.participant.script("execute", "hold", "pending")
        await r.begin("waits-1")
        await r.until("waits-1", _waiting)
        r.participant.script("execute", "hold", "fail")
        r.participant.script("compensate", "reserve", "fail", "fail", "fail")
        await r.begin("failed-1")
        assert (await r.final("failed-1")).state == S.SAGA_STATE_FAILED
        r.participant.script("execute", "hold", "fail")
        await r.begin("undone-1")
        assert (await r.final("undone-1")).state == S.SAGA_STATE_COMPENSATED

        async def summary(stuck_seconds: float = 0.3, definition: str = "") -> list[tuple[str, int, int, int, int]]:
            request = orchestrator_pb2.SummarizeSagasRequest(definition_name=definition)
            request.stuck_for.FromNanoseconds(int(stuck_seconds * 1e9))
            response = await stub.SummarizeSagas(request)
            assert response.stuck_for.ToNanoseconds() == int(stuck_seconds * 1e9)
            for entry in response.states:
                assert entry.oldest_update_time.ToNanoseconds() <= response.read_time.ToNanoseconds()
            return [(e.definition_name, e.state, e.count, e.stuck, e.unresolved) for e in response.states]

        expected = [
            ("flow", S.SAGA_STATE_RUNNING, 1, 1, 0),
            ("flow", S.SAGA_STATE_COMPENSATED, 1, 0, 0),
            ("flow", S.SAGA_STATE_FAILED, 1, 0, 1),
        ]
        # The waiting saga is stuck once it has not changed for 0.3 s; not for a day.

        async def as_expected() -> bool:
            return await summary() == expected

        await poll_until(as_expected)
        assert (await summary(86400))[0] == ("flow", S.SAGA_STATE_RUNNING, 1, 0, 0)
        assert await summary(definition="other") == []
        await stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="failed-1", note="refunded by hand"))
        assert (await summary())[2] == ("flow", S.SAGA_STATE_FAILED, 1, 0, 0)
        for bad in (duration_pb2.Duration(seconds=0), duration_pb2.Duration(seconds=-5)):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest(stuck_for=bad))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "stuck_for must be positive" in (error.value.details() or "")
        default = await stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest())
        assert default.stuck_for.ToSeconds() == 600


async def test_retention_deletes_sagas_done_for_good_and_keeps_those_waiting_for_a_person(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with rig(tmp_path, make_postgres_url, retention_seconds=1.0) as r:
        assert r.stub is not None
        stub = r.stub
        r.participant.script("execute", "hold", "fail")
        r.participant.script("compensate", "reserve", "fail", "fail", "fail")
        await r.begin("needs-a-person")
        assert (await r.final("needs-a-person")).state == S.SAGA_STATE_FAILED
        await r.begin("done-1")
        assert (await r.final("done-1")).state == S.SAGA_STATE_SUCCEEDED

        async def gone(saga_id: str) -> bool:
            try:
                await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                return True
            return False

        await poll_until(lambda: gone("done-1"), timeout=15)
        # Unresolved FAILED sagas wait for a person, however old.
        assert (await r.saga("needs-a-person")).state == S.SAGA_STATE_FAILED
        await stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="needs-a-person", note="fixed by hand"))
        await poll_until(lambda: gone("needs-a-person"), timeout=15)
        # Its id is free again: StartSaga is idempotent while a saga is kept.
        await r.begin("done-1")
        assert (await r.final("done-1")).state == S.SAGA_STATE_SUCCEEDED
