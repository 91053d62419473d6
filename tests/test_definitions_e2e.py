"""Saga definitions end to end on PostgreSQL: parallel steps, input mapping, compensation
order, pivots, operator actions, versioning and validation over the RPC, with a real
orchestrator and real participant servers on port 0.

Most tests drive one `RecordingParticipant` ("recorder") that serves every step and records
each call it gets with its own timestamps, so ordering and overlap are checked from the
participant's side as well as from the saga's Step.start_time/finish_time.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from harness import FINAL, Stack, checkout_input, poll_until
from recording_participant import COMPENSATE, EXECUTE, RecordedCall, RecordingParticipant, StepBehaviour

from compensa.checkout.v1 import checkout_pb2
from compensa.examples import DEFINITIONS_DIR
from compensa.examples.server import create_participant_engine, start_participant, start_server
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.v1 import definition_pb2, orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

S = saga_pb2
D = definition_pb2
RECORDER = "recorder"
INPUT_TYPE = checkout_pb2.CheckoutInput.DESCRIPTOR.full_name
CHECKOUT_PARALLEL = DEFINITIONS_DIR / "checkout-parallel.yaml"


# --- Building definitions ------------------------------------------------------


def _ms(milliseconds: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(milliseconds)
    return duration


def _retry(max_attempts: int) -> D.RetryPolicy:
    return D.RetryPolicy(
        max_attempts=max_attempts, initial_backoff=_ms(50), backoff_multiplier=2.0, max_backoff=_ms(200)
    )


def _step(
    name: str,
    *,
    after: Sequence[str] | None = None,
    kind: D.StepKind.ValueType = D.STEP_KIND_COMPENSABLE,
    attempts: int = 3,
) -> D.StepDefinition:
    """A step served by the recorder, with fast retries.

    `after=None` depends on the step before (the proto's default), `after=()` on nothing
    (`independent`), otherwise on the steps named.
    """
    step = D.StepDefinition(
        name=name,
        participant=RECORDER,
        kind=kind,
        execute_timeout=_ms(5_000),
        compensate_timeout=_ms(5_000),
        retry=_retry(attempts),
        compensate_retry=_retry(10),
    )
    if after is not None:
        step.depends_on.extend(after)
        step.independent = not after
    return step


def _definition(name: str, *steps: D.StepDefinition) -> D.SagaDefinition:
    return D.SagaDefinition(name=name, input_type=INPUT_TYPE, steps=steps)


# --- The rig -------------------------------------------------------------------


def _nanos(timestamp: timestamp_pb2.Timestamp) -> int:
    return timestamp.ToNanoseconds()


def _saga_step(saga: saga_pb2.Saga, name: str) -> saga_pb2.Step:
    return next(step for step in saga.steps if step.name == name)


def _calls_of(calls: Sequence[RecordedCall], step: str, operation: str) -> list[RecordedCall]:
    return [call for call in calls if call.step_name == step and call.operation == operation]


def _one(calls: Sequence[RecordedCall], step: str, operation: str) -> RecordedCall:
    matching = _calls_of(calls, step, operation)
    assert len(matching) == 1, f"expected one {operation} of {step!r}, got {matching}"
    return matching[0]


def _compensated_steps(calls: Sequence[RecordedCall]) -> list[str]:
    """The steps compensated, in the order their compensations finished."""
    return [call.step_name for call in calls if call.operation == COMPENSATE]


async def _rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """The error `call` (an awaitable RPC) fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


@dataclass
class Rig:
    """An orchestrator on its own PostgreSQL database, with a RecordingParticipant as "recorder"."""

    recorder: RecordingParticipant
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub

    async def register(self, definition: D.SagaDefinition) -> orchestrator_pb2.RegisterDefinitionResponse:
        request = orchestrator_pb2.RegisterDefinitionRequest(definition=definition)
        response: orchestrator_pb2.RegisterDefinitionResponse = await self.stub.RegisterDefinition(request)
        return response

    async def start(self, definition_name: str, *, version: int = 0) -> saga_pb2.Saga:
        request = orchestrator_pb2.StartSagaRequest(
            saga_id=f"saga-{uuid.uuid4().hex[:12]}",
            definition_name=definition_name,
            definition_version=version,
            input=checkout_input(),
        )
        response: orchestrator_pb2.StartSagaResponse = await self.stub.StartSaga(request)
        assert response.created
        return response.saga

    async def saga(self, saga_id: str) -> saga_pb2.Saga:
        response: orchestrator_pb2.GetSagaResponse = await self.stub.GetSaga(
            orchestrator_pb2.GetSagaRequest(saga_id=saga_id)
        )
        return response.saga

    async def wait_final(self, saga_id: str, timeout: float = 20.0) -> saga_pb2.Saga:
        async def final() -> saga_pb2.Saga | None:
            saga = await self.saga(saga_id)
            return saga if saga.state in FINAL else None

        saga: saga_pb2.Saga = await poll_until(final, timeout=timeout)
        return saga

    async def run(self, definition_name: str) -> tuple[saga_pb2.Saga, list[RecordedCall]]:
        """Starts a saga, waits until it ends; the saga and the calls the recorder got."""
        started = await self.start(definition_name)
        saga = await self.wait_final(started.saga_id)
        return saga, await self.recorder.calls(saga.saga_id)

    async def events(self, saga_id: str) -> list[saga_pb2.SagaEvent]:
        return [
            response.event
            async for response in self.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(
                saga_id=saga_id, replay_history=True
            ))
        ]

    async def definitions(self, page_size: int = 50) -> list[list[D.SagaDefinition]]:
        """Every page of ListDefinitions."""
        pages: list[list[D.SagaDefinition]] = []
        token = ""
        while True:
            page = await self.stub.ListDefinitions(
                orchestrator_pb2.ListDefinitionsRequest(page_size=page_size, page_token=token)
            )
            pages.append(list(page.definitions))
            token = page.next_page_token
            if not token:
                return pages


@asynccontextmanager
async def recording_rig(
    make_url: Callable[[], str], behaviours: Mapping[str, StepBehaviour] | None = None
) -> AsyncIterator[Rig]:
    async with contextlib.AsyncExitStack() as stack:
        recorder = RecordingParticipant(create_participant_engine(make_url()), behaviours)
        served = await start_server(recorder)
        stack.push_async_callback(served.stop, 0)
        orchestrator = await start_orchestrator(
            ServerConfig(listen="127.0.0.1:0", database_url=make_url(), participants={RECORDER: served.address})
        )
        stack.push_async_callback(orchestrator.stop, 0)
        channel = grpc.aio.insecure_channel(orchestrator.address)
        stack.push_async_callback(channel.close)
        yield Rig(recorder=recorder, stub=orchestrator_pb2_grpc.OrchestratorServiceStub(channel))


# --- 1. Parallel execution -----------------------------------------------------


async def test_independent_steps_overlap_and_their_join_waits_for_both(make_postgres_url: Callable[[], str]) -> None:
    slow = StepBehaviour(execute_seconds=0.5)
    async with recording_rig(make_postgres_url, {"left": slow, "right": slow}) as rig:
        await rig.register(
            _definition(
                "fan-in", _step("left", after=()), _step("right", after=()), _step("join", after=["left", "right"])
            )
        )
        saga, calls = await rig.run("fan-in")

    assert saga.state == S.SAGA_STATE_SUCCEEDED, saga.failure_reason
    left, right, join = (_one(calls, name, EXECUTE) for name in ("left", "right", "join"))
    for branch in (left, right):
        assert (branch.finished_at - branch.started_at).total_seconds() >= 0.45
    assert left.overlaps(right), (left, right)
    assert join.started_at >= max(left.finished_at, right.finished_at)

    saga_left, saga_right, saga_join = (_saga_step(saga, name) for name in ("left", "right", "join"))
    assert _nanos(saga_left.start_time) < _nanos(saga_right.finish_time)
    assert _nanos(saga_right.start_time) < _nanos(saga_left.finish_time)
    assert _nanos(saga_join.start_time) >= max(_nanos(saga_left.finish_time), _nanos(saga_right.finish_time))


# --- 2. Input mapping ----------------------------------------------------------


async def test_a_step_receives_the_outputs_of_its_ancestors_only(make_postgres_url: Callable[[], str]) -> None:
    # a -> c -> d      (c waits until the other branch has finished, so its outputs exist when d runs)
    # b -> e
    # d, e -> f
    gate = asyncio.Event()
    async with recording_rig(make_postgres_url, {"c": StepBehaviour(gate=gate)}) as rig:
        await rig.register(
            _definition(
                "branches",
                _step("a", after=()),
                _step("b", after=()),
                _step("c", after=["a"]),
                _step("d", after=["c"]),
                _step("e", after=["b"]),
                _step("f", after=["d", "e"]),
            )
        )
        saga_id = (await rig.start("branches")).saga_id

        async def other_branch_done() -> bool:
            return _saga_step(await rig.saga(saga_id), "e").state == S.STEP_STATE_SUCCEEDED

        await poll_until(other_branch_done)
        gate.set()
        saga = await rig.wait_final(saga_id)
        calls = await rig.recorder.calls(saga_id)

    assert saga.state == S.SAGA_STATE_SUCCEEDED, saga.failure_reason
    # The unrelated branch's outputs existed when d ran, so leaving them out was a choice.
    assert _one(calls, "e", EXECUTE).finished_at < _one(calls, "d", EXECUTE).started_at
    assert _one(calls, "e", EXECUTE).finished_at < _one(calls, "c", EXECUTE).finished_at
    received = {call.step_name: set(call.step_output_keys) for call in calls if call.operation == EXECUTE}
    assert received == {
        "a": set(),
        "b": set(),
        "c": {"a"},
        "d": {"a", "c"},
        "e": {"b"},
        "f": {"a", "b", "c", "d", "e"},
    }


# --- 3. Compensation order -----------------------------------------------------


async def test_a_chain_is_compensated_in_reverse_order(make_postgres_url: Callable[[], str]) -> None:
    slow_undo = StepBehaviour(compensate_seconds=0.2)
    behaviours = {"a": slow_undo, "b": slow_undo, "c": StepBehaviour(fail=True)}
    async with recording_rig(make_postgres_url, behaviours) as rig:
        await rig.register(_definition("chain", _step("a"), _step("b"), _step("c")))
        saga, calls = await rig.run("chain")
        events = await rig.events(saga.saga_id)

    assert saga.state == S.SAGA_STATE_COMPENSATED
    assert "'c'" in saga.failure_reason and "declined" in saga.failure_reason
    assert [(step.name, step.state) for step in saga.steps] == [
        ("a", S.STEP_STATE_COMPENSATED),
        ("b", S.STEP_STATE_COMPENSATED),
        ("c", S.STEP_STATE_FAILED),  # a business failure applied nothing: nothing to undo
    ]
    assert _compensated_steps(calls) == ["b", "a"]
    assert _one(calls, "b", COMPENSATE).finished_at <= _one(calls, "a", COMPENSATE).started_at
    order = [(event.type, event.step_name) for event in events]
    assert order.index((S.EVENT_TYPE_STEP_COMPENSATED, "b")) < order.index((S.EVENT_TYPE_STEP_COMPENSATING, "a"))


async def test_a_diamond_undoes_the_join_first_then_both_branches_in_parallel(
    make_postgres_url: Callable[[], str],
) -> None:
    slow_undo = StepBehaviour(compensate_seconds=0.4)
    behaviours = {"a": slow_undo, "b": slow_undo, "c": slow_undo, "d": StepBehaviour(fail=True)}
    async with recording_rig(make_postgres_url, behaviours) as rig:
        await rig.register(
            _definition("diamond", _step("a", after=()), _step("b", after=()), _step("c", after=["a", "b"]), _step("d"))
        )
        saga, calls = await rig.run("diamond")

    assert saga.state == S.SAGA_STATE_COMPENSATED
    assert {step.name: step.state for step in saga.steps} == {
        "a": S.STEP_STATE_COMPENSATED,
        "b": S.STEP_STATE_COMPENSATED,
        "c": S.STEP_STATE_COMPENSATED,
        "d": S.STEP_STATE_FAILED,
    }
    undo_a, undo_b, undo_c = (_one(calls, name, COMPENSATE) for name in ("a", "b", "c"))
    assert undo_c.finished_at <= min(undo_a.started_at, undo_b.started_at)
    assert undo_a.overlaps(undo_b), (undo_a, undo_b)
    assert _calls_of(calls, "d", COMPENSATE) == []


# --- 4. Pivot semantics --------------------------------------------------------

PIVOTED = _definition(
    "pivoted",
    _step("reserve"),
    _step("hold"),
    _step("ship", kind=D.STEP_KIND_PIVOT),
    _step("notify", kind=D.STEP_KIND_RETRIABLE, attempts=3),
)
FAILS_FOR_GOOD = StepBehaviour(transient_failures=1_000_000)


async def test_a_failing_pivot_compensates_the_steps_before_it(make_postgres_url: Callable[[], str]) -> None:
    async with recording_rig(make_postgres_url, {"ship": StepBehaviour(fail=True)}) as rig:
        await rig.register(PIVOTED)
        saga, calls = await rig.run("pivoted")

    assert saga.state == S.SAGA_STATE_COMPENSATED
    assert [(step.name, step.state) for step in saga.steps] == [
        ("reserve", S.STEP_STATE_COMPENSATED),
        ("hold", S.STEP_STATE_COMPENSATED),
        ("ship", S.STEP_STATE_FAILED),
        ("notify", S.STEP_STATE_PENDING),
    ]
    assert _compensated_steps(calls) == ["hold", "reserve"]
    assert _calls_of(calls, "notify", EXECUTE) == []


async def test_a_retriable_step_after_the_pivot_is_retried_until_it_succeeds(
    make_postgres_url: Callable[[], str],
) -> None:
    async with recording_rig(make_postgres_url, {"notify": StepBehaviour(transient_failures=2)}) as rig:
        await rig.register(PIVOTED)
        saga, calls = await rig.run("pivoted")
        events = await rig.events(saga.saga_id)

    assert saga.state == S.SAGA_STATE_SUCCEEDED, saga.failure_reason
    assert _saga_step(saga, "notify").attempts == 3
    assert [(call.attempt, call.outcome) for call in _calls_of(calls, "notify", EXECUTE)] == [
        (1, "transient"),
        (2, "transient"),
        (3, "succeeded"),
    ]
    retries = [(e.step_name, e.attempt) for e in events if e.type == S.EVENT_TYPE_STEP_RETRY_SCHEDULED]
    assert retries == [("notify", 1), ("notify", 2)]
    assert _compensated_steps(calls) == []


async def test_past_the_pivot_a_failure_raises_an_alert_and_an_operator_retry_finishes_the_saga(
    make_postgres_url: Callable[[], str],
) -> None:
    # notify's first attempt waits at the gate: the saga is running past the pivot while we cancel.
    gate = asyncio.Event()
    failing = StepBehaviour(transient_failures=FAILS_FOR_GOOD.transient_failures, gate=gate)
    async with recording_rig(make_postgres_url, {"notify": failing}) as rig:
        await rig.register(PIVOTED)
        saga_id = (await rig.start("pivoted")).saga_id

        async def past_pivot() -> bool:
            saga = await rig.saga(saga_id)
            return saga.state == S.SAGA_STATE_RUNNING and _saga_step(saga, "ship").state == S.STEP_STATE_SUCCEEDED

        await poll_until(past_pivot)
        refused = await _rpc_error(rig.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id=saga_id)))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot be undone" in (refused.details() or "")
        gate.set()

        failed = await rig.wait_final(saga_id)
        assert failed.state == S.SAGA_STATE_FAILED
        assert "'notify'" in failed.failure_reason
        assert [(step.name, step.state) for step in failed.steps] == [
            ("reserve", S.STEP_STATE_SUCCEEDED),
            ("hold", S.STEP_STATE_SUCCEEDED),
            ("ship", S.STEP_STATE_SUCCEEDED),
            ("notify", S.STEP_STATE_FAILED),
        ]
        events = await rig.events(saga_id)
        types = [event.type for event in events]
        assert S.EVENT_TYPE_ALERT_RAISED in types
        assert "'ship'" in events[types.index(S.EVENT_TYPE_ALERT_RAISED)].message
        assert S.EVENT_TYPE_COMPENSATION_STARTED not in types and S.EVENT_TYPE_CANCEL_REQUESTED not in types
        calls = await rig.recorder.calls(saga_id)
        assert [call.outcome for call in _calls_of(calls, "notify", EXECUTE)] == ["transient"] * 3
        assert _compensated_steps(calls) == []

        rig.recorder.behaviours["notify"] = StepBehaviour()  # the mail server is back
        retried = await rig.stub.RetrySaga(
            orchestrator_pb2.RetrySagaRequest(saga_id=saga_id, actor="ops@example.com", reason="mail server fixed")
        )
        assert retried.saga.state == S.SAGA_STATE_RUNNING
        saga = await rig.wait_final(saga_id)
        events = await rig.events(saga_id)
        calls = await rig.recorder.calls(saga_id)

    assert saga.state == S.SAGA_STATE_SUCCEEDED, saga.failure_reason
    assert [step.state for step in saga.steps] == [S.STEP_STATE_SUCCEEDED] * 4
    operator = [e for e in events if e.type == S.EVENT_TYPE_OPERATOR_RETRIED]
    assert [(e.actor, e.message) for e in operator] == [("ops@example.com", "mail server fixed")]
    assert [call.outcome for call in _calls_of(calls, "notify", EXECUTE)] == ["transient"] * 3 + ["succeeded"]
    assert [call.step_name for call in calls if call.operation == EXECUTE].count("ship") == 1
    assert _compensated_steps(calls) == []


async def test_an_operator_resolves_a_failed_saga_once_and_only_with_a_note(
    make_postgres_url: Callable[[], str],
) -> None:
    async with recording_rig(make_postgres_url, {"notify": FAILS_FOR_GOOD}) as rig:
        await rig.register(PIVOTED)
        saga_id = (await rig.start("pivoted")).saga_id
        assert (await rig.wait_final(saga_id)).state == S.SAGA_STATE_FAILED

        def resolve(note: str) -> Any:
            return rig.stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id=saga_id, actor="alice", note=note))

        no_note = await _rpc_error(resolve(""))
        assert no_note.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "note" in (no_note.details() or "")

        note = "customer notified by phone"
        resolved = await resolve(note)
        assert resolved.saga.state == S.SAGA_STATE_FAILED
        assert resolved.saga.resolution_note == note

        again = await _rpc_error(resolve("second try"))
        assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already resolved" in (again.details() or "")

        stored = await rig.saga(saga_id)
        events = await rig.events(saga_id)

    assert stored.resolution_note == note
    resolutions = [(e.actor, e.message) for e in events if e.type == S.EVENT_TYPE_OPERATOR_RESOLVED]
    assert resolutions == [("alice", note)]


async def test_cancel_while_the_pivot_is_in_flight_is_refused(make_postgres_url: Callable[[], str]) -> None:
    # A pivot whose Execute is in flight may have taken effect: compensating the steps
    # before it would leave the order shipped with its stock released.
    gate = asyncio.Event()
    async with recording_rig(make_postgres_url, {"ship": StepBehaviour(gate=gate)}) as rig:
        await rig.register(PIVOTED)
        saga_id = (await rig.start("pivoted")).saga_id

        async def pivot_in_flight() -> bool:
            return _saga_step(await rig.saga(saga_id), "ship").state == S.STEP_STATE_RUNNING

        await poll_until(pivot_in_flight)
        cancel_code = grpc.StatusCode.OK
        try:
            await rig.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id=saga_id, reason="changed my mind"))
        except grpc.aio.AioRpcError as error:
            cancel_code = error.code()
        gate.set()  # the parcel leaves: the pivot's Execute completes at the participant
        saga = await rig.wait_final(saga_id)
        calls = await rig.recorder.calls(saga_id)

    assert [call.outcome for call in _calls_of(calls, "ship", EXECUTE)] == ["succeeded"]
    # What must never happen: the order shipped and the steps before it undone.
    assert _compensated_steps(calls) == []
    assert cancel_code == grpc.StatusCode.FAILED_PRECONDITION
    assert saga.state == S.SAGA_STATE_SUCCEEDED, saga.failure_reason


# --- 5. Versioning -------------------------------------------------------------


async def test_registering_versions_and_a_running_saga_keeps_its_version(make_postgres_url: Callable[[], str]) -> None:
    gate = asyncio.Event()
    async with recording_rig(make_postgres_url, {"first": StepBehaviour(gate=gate)}) as rig:
        v1 = _definition("versioned", _step("first"), _step("second"))
        registered = await rig.register(v1)
        assert registered.created and registered.definition.version == 1
        again = await rig.register(v1)
        assert not again.created and again.definition == registered.definition

        blocked = await rig.start("versioned")
        assert blocked.definition_version == 1

        v2 = _definition("versioned", _step("first"), _step("second"), _step("third"))
        changed = await rig.register(v2)
        assert changed.created and changed.definition.version == 2
        gate.set()

        old = await rig.wait_final(blocked.saga_id)
        assert old.state == S.SAGA_STATE_SUCCEEDED, old.failure_reason
        assert old.definition_version == 1
        assert [step.name for step in old.steps] == ["first", "second"]
        old_calls = await rig.recorder.calls(old.saga_id)
        assert sorted(call.step_name for call in old_calls) == ["first", "second"]

        latest = await rig.wait_final((await rig.start("versioned")).saga_id)
        assert latest.definition_version == 2
        assert [step.name for step in latest.steps] == ["first", "second", "third"]
        pinned = await rig.wait_final((await rig.start("versioned", version=1)).saga_id)
        assert pinned.definition_version == 1
        assert [step.name for step in pinned.steps] == ["first", "second"]

        def get(version: int) -> Any:
            return rig.stub.GetDefinition(orchestrator_pb2.GetDefinitionRequest(name="versioned", version=version))

        assert (await get(1)).definition == registered.definition
        assert (await get(2)).definition == changed.definition
        assert (await get(0)).definition == changed.definition
        assert (await _rpc_error(get(3))).code() == grpc.StatusCode.NOT_FOUND

        others = [await rig.register(_definition(name, _step("only"))) for name in ("alpha", "omega")]
        pages = await rig.definitions(page_size=2)

    stored = changed.definition
    assert [step.name for step in stored.steps] == ["first", "second", "third"]
    assert [step.participant for step in stored.steps] == [RECORDER] * 3
    assert [list(step.depends_on) for step in stored.steps] == [[], ["first"], ["second"]]
    assert stored.steps[2].retry == _retry(3) and stored.steps[2].execute_timeout == _ms(5_000)
    assert [len(page) for page in pages] == [2, 1]
    assert [definition for page in pages for definition in page] == [
        others[0].definition,
        others[1].definition,
        changed.definition,
    ]


# --- 6. Validation over the RPC ------------------------------------------------


def _cycle() -> D.SagaDefinition:
    return _definition("invalid", _step("a", after=["c"]), _step("b", after=["a"]), _step("c", after=["b"]))


def _unknown_dependency() -> D.SagaDefinition:
    return _definition("invalid", _step("a"), _step("b", after=["ghost"]))


def _duplicate_step() -> D.SagaDefinition:
    return _definition("invalid", _step("a"), _step("b"), _step("a"))


def _missing_participant() -> D.SagaDefinition:
    definition = _definition("invalid", _step("a"), _step("b"))
    definition.steps[1].participant = ""
    return definition


def _zero_execute_timeout() -> D.SagaDefinition:
    definition = _definition("invalid", _step("a"), _step("b"))
    definition.steps[1].execute_timeout.CopyFrom(_ms(0))
    return definition


def _zero_max_attempts() -> D.SagaDefinition:
    definition = _definition("invalid", _step("a"), _step("b"))
    definition.steps[1].retry.max_attempts = 0
    return definition


def _unknown_input_type() -> D.SagaDefinition:
    definition = _definition("invalid", _step("a"))
    definition.input_type = "compensa.checkout.v1.NoSuchInput"
    return definition


def _compensable_after_pivot() -> D.SagaDefinition:
    return _definition("invalid", _step("a"), _step("p", kind=D.STEP_KIND_PIVOT), _step("c"))


@pytest.fixture(scope="module")
async def validation_rig(make_postgres_url: Callable[[], str]) -> AsyncIterator[Rig]:
    """One rig for every validation case, with one valid definition registered."""
    async with recording_rig(make_postgres_url) as rig:
        await rig.register(_definition("valid", _step("a")))
        yield rig


@pytest.mark.parametrize(
    ("build", "fragments"),
    [
        pytest.param(_cycle, ["step 'a'", "field 'depends_on'", "cycle"], id="cycle"),
        pytest.param(_unknown_dependency, ["step 'b'", "field 'depends_on'", "'ghost'"], id="unknown-dependency"),
        pytest.param(_duplicate_step, ["step 'a'", "field 'name'", "unique"], id="duplicate-step"),
        pytest.param(_missing_participant, ["step 'b'", "field 'participant'"], id="missing-participant"),
        pytest.param(_zero_execute_timeout, ["step 'b'", "field 'execute_timeout'", "positive"], id="zero-timeout"),
        pytest.param(_zero_max_attempts, ["step 'b'", "field 'retry.max_attempts'"], id="zero-max-attempts"),
        pytest.param(_unknown_input_type, ["field 'input_type'", "NoSuchInput"], id="unknown-input-type"),
        pytest.param(_compensable_after_pivot, ["step 'c'", "field 'kind'", "RETRIABLE"], id="compensable-after-pivot"),
    ],
)
async def test_an_invalid_definition_is_refused_naming_step_and_field_and_nothing_is_stored(
    validation_rig: Rig, build: Callable[[], D.SagaDefinition], fragments: list[str]
) -> None:
    before = await validation_rig.definitions()

    refused = await _rpc_error(validation_rig.register(build()))

    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    assert await validation_rig.definitions() == before
    missing = await _rpc_error(
        validation_rig.stub.GetDefinition(orchestrator_pb2.GetDefinitionRequest(name="invalid"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


# --- 7. checkout-parallel with the example participants ------------------------


@asynccontextmanager
async def parallel_checkout_stack(make_url: Callable[[], str]) -> AsyncIterator[Stack]:
    """inventory, fraud, payment and shipping, each on its own database, and an orchestrator
    running checkout-parallel.yaml."""
    async with contextlib.AsyncExitStack() as exits:
        participants = {}
        for kind in ("inventory", "fraud", "payment", "shipping"):
            participants[kind] = await start_participant(kind, make_url())
            exits.push_async_callback(participants[kind].stop, 0)
        orchestrator_url = make_url()
        orchestrator = await start_orchestrator(
            ServerConfig(
                listen="127.0.0.1:0",
                database_url=orchestrator_url,
                definition_paths=(CHECKOUT_PARALLEL,),
                participants={kind: running.address for kind, running in participants.items()},
            )
        )
        exits.push_async_callback(orchestrator.stop, 0)
        channel = grpc.aio.insecure_channel(orchestrator.address)
        exits.push_async_callback(channel.close)
        yield Stack(
            orchestrator=orchestrator,
            participants=participants,
            stub=orchestrator_pb2_grpc.OrchestratorServiceStub(channel),
            channel=channel,
            orchestrator_url=orchestrator_url,
        )


async def test_checkout_parallel_succeeds_with_the_example_participants(make_postgres_url: Callable[[], str]) -> None:
    async with parallel_checkout_stack(make_postgres_url) as stack:
        saga_id = await stack.start(definition="checkout-parallel")
        saga = await stack.wait_final(saga_id)
        reservations = await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)
        checks = await stack.rows("fraud", "fraud_checks", saga_id=saga_id)
        charges = await stack.rows("payment", "payment_charges", saga_id=saga_id)
        shipments = await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)

    assert saga.state == S.SAGA_STATE_SUCCEEDED, saga.failure_reason
    assert [(step.name, step.state) for step in saga.steps] == [
        ("reserve_stock", S.STEP_STATE_SUCCEEDED),
        ("fraud_check", S.STEP_STATE_SUCCEEDED),
        ("charge_card", S.STEP_STATE_SUCCEEDED),
        ("ship_order", S.STEP_STATE_SUCCEEDED),
    ]
    branches = [_saga_step(saga, name) for name in ("reserve_stock", "fraud_check")]
    assert _nanos(_saga_step(saga, "charge_card").start_time) >= max(_nanos(s.finish_time) for s in branches)
    assert [row.status for row in reservations] == ["reserved"]
    assert [row.status for row in checks] == ["cleared"]
    assert [row.status for row in charges] == ["charged"]
    assert len(shipments) == 1


@pytest.mark.parametrize(
    ("card_token", "failed_step", "compensated", "pending"),
    [
        pytest.param("flagged-card", "charge_card", ["reserve_stock", "fraud_check"], ["ship_order"], id="declined"),
        pytest.param(
            "stolen-card", "fraud_check", ["reserve_stock"], ["charge_card", "ship_order"], id="fraud-suspected"
        ),
    ],
)
async def test_checkout_parallel_failure_compensates_the_parallel_branches(
    make_postgres_url: Callable[[], str], card_token: str, failed_step: str, compensated: list[str], pending: list[str]
) -> None:
    async with parallel_checkout_stack(make_postgres_url) as stack:
        saga_id = await stack.start(definition="checkout-parallel", card_token=card_token)
        saga = await stack.wait_final(saga_id)
        reservations = await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)
        checks = await stack.rows("fraud", "fraud_checks", saga_id=saga_id)
        charges = await stack.rows("payment", "payment_charges", saga_id=saga_id)
        shipments = await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)

    assert saga.state == S.SAGA_STATE_COMPENSATED, saga.failure_reason
    expected = {name: S.STEP_STATE_COMPENSATED for name in compensated}
    expected |= {name: S.STEP_STATE_PENDING for name in pending}
    expected[failed_step] = S.STEP_STATE_FAILED
    assert {step.name: step.state for step in saga.steps} == expected
    # The stock is reserved and then released; when the fraud check fails first, the
    # reservation may instead be compensated before it ran (the barrier then blocks it).
    released = [row.status for row in reservations]
    assert released == ["released"] or (failed_step == "fraud_check" and released == [])
    assert [row.status for row in checks] == (["voided"] if "fraud_check" in compensated else [])
    assert charges == [] and shipments == []
