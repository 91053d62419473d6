"""Hostile input against a real orchestrator on PostgreSQL: malformed, oversized
and poisonous requests, each class with its documented answer.

For every request: the status code is the documented one, its message is
short, no traceback is logged, the server stays SERVING, a rejected request
writes no row, and valid requests sent at the same time all succeed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import sqlalchemy as sa
import yarl
from google.protobuf import duration_pb2, wrappers_pb2
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.orchestrator.definitions import MAX_DEPENDENCY_DEPTH, MAX_STEPS, load_definition_file
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.tokens import completion_token
from compensa.orchestrator.shared.errors import ERROR_DOMAIN, RejectedWrite
from compensa.v1 import definition_pb2, orchestrator_pb2, participant_pb2, participant_pb2_grpc, saga_pb2
from tests.harness import CHECKOUT, Stack, checkout_input, checkout_stack, poll_until

pytestmark = pytest.mark.postgres

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
#: No status message may be longer: gRPC's default metadata limit is 16 KB.
MAX_MESSAGE_CHARS = 1000
SERVICE = "/compensa.v1.OrchestratorService/"
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


class LogRecords(logging.Handler):
    """The orchestrator's log records, for checks that nothing was logged with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [record.getMessage() for record in self.records if record.exc_info or "crashed" in record.getMessage()]


@dataclass
class Hostile:
    stack: Stack
    log: LogRecords
    url: str

    async def row_counts(self) -> dict[str, int]:
        engine = create_async_engine(self.url)
        try:
            async with engine.connect() as conn:
                return {
                    table: (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()
                    for table in (
                        "compensa_sagas", "compensa_saga_steps", "compensa_saga_events", "compensa_definitions",
                        "compensa_participants",
                    )
                }
        finally:
            await engine.dispose()

    async def serving(self) -> bool:
        health = health_pb2_grpc.HealthStub(self.stack.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(autouse=True)
def _fresh_log(request: pytest.FixtureRequest) -> None:
    if "hostile" in request.fixturenames:
        request.getfixturevalue("hostile").log.records.clear()


@pytest.fixture(scope="module")
async def hostile(make_postgres_url: Callable[[], str]) -> AsyncIterator[Hostile]:
    records = LogRecords()
    compensa_log = logging.getLogger("compensa")
    compensa_log.addHandler(records)
    try:
        async with checkout_stack(make_postgres_url) as stack:
            yield Hostile(stack, records, stack.orchestrator_url)
    finally:
        compensa_log.removeHandler(records)


async def _refused(call: Awaitable[Any] | AsyncIterable[Any]) -> grpc.aio.AioRpcError:
    """The error a call (or the first read of a stream) answers."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        if isinstance(call, AsyncIterable):
            async for _ in call:
                pass
        else:
            await call
    error = raised.value
    assert len(error.details() or "") <= MAX_MESSAGE_CHARS, error.details()
    return error


def _error_info(error: grpc.aio.AioRpcError) -> ErrorInfo:
    """The google.rpc.ErrorInfo of a status, which every error carries."""
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = Status.FromString(details)
    assert status.code == error.code().value[0] and status.message == error.details()
    info = ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN
    return info


def _start(saga_id: str) -> orchestrator_pb2.StartSagaRequest:
    return orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="checkout", input=checkout_input())


def _duration(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _definition(**fields: Any) -> definition_pb2.SagaDefinition:
    definition = load_definition_file(CHECKOUT)
    definition.name = f"hostile-{uuid.uuid4().hex[:8]}"
    for name, value in fields.items():
        setattr(definition, name, value)
    return definition


def _chain(steps: int, *, independent: bool = False) -> definition_pb2.SagaDefinition:
    definition = definition_pb2.SagaDefinition(
        name=f"chain-{uuid.uuid4().hex[:8]}", input_type="compensa.checkout.v1.CheckoutInput"
    )
    for index in range(steps):
        definition.steps.add(name=f"s{index}", participant="inventory", independent=independent)
    return definition


def _requests(hostile: Hostile) -> Iterator[tuple[str, Callable[[], Any], grpc.StatusCode]]:
    """Every class of bad request, with the status it must get."""
    stub = hostile.stack.stub
    nul = "a\x00b"
    # NUL in every string field that reaches the database
    yield "GetSaga NUL", lambda: stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=nul)), INVALID
    yield "GetDefinition NUL", lambda: stub.GetDefinition(orchestrator_pb2.GetDefinitionRequest(name=nul)), INVALID
    yield "ListSagas NUL", lambda: stub.ListSagas(orchestrator_pb2.ListSagasRequest(definition_name=nul)), INVALID
    yield (
        "SummarizeSagas NUL", lambda: stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest(definition_name=nul)),
        INVALID,
    )
    yield "WatchSagas NUL", lambda: stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(definition_name=nul)), INVALID
    yield "WatchSaga NUL", lambda: stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=nul)), INVALID
    yield (
        "CancelSaga reason NUL",
        lambda: stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="x", reason=nul)), INVALID,
    )
    yield (
        "CancelSaga actor 257",
        lambda: stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="x", actor="a" * 257)), INVALID,
    )
    yield (
        "RetrySaga reason NUL", lambda: stub.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id="x", reason=nul)),
        INVALID,
    )
    yield (
        "ResolveSaga note NUL", lambda: stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="x", note=nul)),
        INVALID,
    )
    yield (
        "CompleteStep failure_reason NUL",
        lambda: stub.CompleteStep(orchestrator_pb2.CompleteStepRequest(
            completion_token=completion_token(
                hostile.stack.orchestrator.engine.token_key, "no-such-saga", "charge_card"
            ),
            result=orchestrator_pb2.COMPLETION_RESULT_FAILED, failure_reason=nul,
        )),
        INVALID,
    )
    yield (
        "SetParticipant name NUL",
        lambda: stub.SetParticipant(orchestrator_pb2.SetParticipantRequest(name=nul, address="127.0.0.1:1")), INVALID,
    )
    yield (
        "SetParticipant address of 259 characters",
        lambda: stub.SetParticipant(orchestrator_pb2.SetParticipantRequest(
            name="long", address="h" * 253 + ":50051"
        )),
        INVALID,
    )
    # identifiers are matched in full: no trailing newline slips through
    yield "StartSaga id newline", lambda: stub.StartSaga(_start("checkout\n")), INVALID
    yield "StartSaga id 129", lambda: stub.StartSaga(_start("x" * 129)), INVALID
    yield "GetSaga 1 MB id", lambda: stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="x" * 1_000_000)), NOT_FOUND
    yield "GetSaga id newline", lambda: stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="x\n")), NOT_FOUND
    yield (
        "StartSaga definition newline",
        lambda: stub.StartSaga(orchestrator_pb2.StartSagaRequest(
            saga_id=f"s-{uuid.uuid4().hex}", definition_name="checkout\n", input=checkout_input()
        )),
        NOT_FOUND,
    )
    yield (
        "Register name newline",
        lambda: stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=_definition(name="x\n"))),
        INVALID,
    )
    step_newline = _definition()
    step_newline.steps[0].name = "reserve_stock\n"
    yield (
        "Register step newline",
        lambda: stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=step_newline)), INVALID,
    )
    yield (
        "Register description NUL",
        lambda: stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=_definition(
            description=nul
        ))),
        INVALID,
    )
    # durations, range-checked
    for name, duration in (
        ("nanos -2e9", _duration(0, -2_000_000_000)),
        ("INT64_MIN s", _duration(INT64_MIN)),
        ("INT64_MAX s", _duration(INT64_MAX)),
        ("nanos 2e9", _duration(0, 2_000_000_000)),
        ("mixed signs", _duration(5, -1)),
    ):
        yield (
            f"ListSagas stuck_for {name}",
            lambda duration=duration: stub.ListSagas(orchestrator_pb2.ListSagasRequest(stuck_for=duration)), INVALID,
        )
        yield (
            f"SummarizeSagas stuck_for {name}",
            lambda duration=duration: stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest(stuck_for=duration)),
            INVALID,
        )
        yield (
            f"WatchSagas batch_window {name}",
            lambda duration=duration: stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(
                max_events_per_message=10, batch_window=duration
            )),
            INVALID,
        )
    for name, duration in (("1e12 s", _duration(10**12)), ("nanos 2e9", _duration(1, 2_000_000_000))):
        timed_out = _definition()
        timed_out.steps[0].execute_timeout.CopyFrom(duration)
        yield (
            f"Register execute_timeout {name}",
            lambda timed_out=timed_out: stub.RegisterDefinition(
                orchestrator_pb2.RegisterDefinitionRequest(definition=timed_out)
            ),
            INVALID,
        )
    for multiplier in (float("inf"), float("nan"), 1e300):
        unbounded = _definition()
        unbounded.steps[0].retry.backoff_multiplier = multiplier
        yield (
            f"Register backoff_multiplier {multiplier}",
            lambda unbounded=unbounded: stub.RegisterDefinition(
                orchestrator_pb2.RegisterDefinitionRequest(definition=unbounded)
            ),
            INVALID,
        )
    # page tokens the server did not issue
    for name, token in (
        ("not base64", "!!!"),
        ("JSON object", base64.urlsafe_b64encode(json.dumps({"a": 1}).encode()).decode()),
        ("JSON list of lists", base64.urlsafe_b64encode(json.dumps([[1], [2]]).encode()).decode()),
        ("deep JSON", base64.urlsafe_b64encode(("[" * 100_000 + "]" * 100_000).encode()).decode()),
        ("forged signature", "WzEsImEiXQ.AAAAAAAAAAAAAAAAAAAAAA"),
        ("non-ASCII", "é.é"),
    ):
        yield (
            f"ListSagas token {name}",
            lambda token=token: stub.ListSagas(orchestrator_pb2.ListSagasRequest(page_token=token)), INVALID,
        )
        yield (
            f"ListDefinitions token {name}",
            lambda token=token: stub.ListDefinitions(orchestrator_pb2.ListDefinitionsRequest(page_token=token)),
            INVALID,
        )
    # definitions that would stall the server
    yield (
        "Register 10,000 steps",
        lambda: stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=_chain(10_000))), INVALID,
    )
    yield (
        "Register 10,000 independent steps",
        lambda: stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(
            definition=_chain(10_000, independent=True)
        )),
        INVALID,
    )
    backwards = _chain(1_000)
    for index, step in enumerate(backwards.steps[:-1]):
        step.depends_on.append(f"s{index + 1}")  # each depends on the next
    yield (
        "Register each step depending on the next",
        lambda: stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=backwards)), INVALID,
    )
    yield (
        "Register 3 MB description",
        lambda: stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(
            definition=_definition(description="d" * 3_000_000)
        )),
        INVALID,
    )
    # payloads
    undecodable = checkout_input()
    undecodable.value = b"\xff\xff\xff"
    yield (
        "StartSaga undecodable input",
        lambda: stub.StartSaga(orchestrator_pb2.StartSagaRequest(
            saga_id=f"s-{uuid.uuid4().hex}", definition_name="checkout", input=undecodable
        )),
        INVALID,
    )


async def test_every_bad_request_gets_its_documented_answer_and_writes_nothing(hostile: Hostile) -> None:
    before = await hostile.row_counts()
    failures = []
    reasons = {INVALID: {"INVALID_REQUEST", "INVALID_DEFINITION"}, NOT_FOUND: {"NOT_FOUND"}}
    for name, call, code in _requests(hostile):
        error = await _refused(call())
        if error.code() != code:
            failures.append(f"{name}: {error.code().name} {error.details()[:200]!r}, expected {code.name}")
        elif _error_info(error).reason not in reasons[code]:
            failures.append(f"{name}: reason {_error_info(error).reason}, expected one of {reasons[code]}")
    assert failures == []
    assert await hostile.row_counts() == before
    assert hostile.log.tracebacks() == []
    assert await hostile.serving()


async def test_bad_requests_among_valid_ones_leave_the_valid_ones_alone(hostile: Hostile) -> None:
    stub = hostile.stack.stub
    valid_ids = [f"valid-{uuid.uuid4().hex}" for _ in range(30)]
    bad = [call for _, call, _ in _requests(hostile)]

    async def bad_one(call: Callable[[], Any]) -> None:
        await _refused(call())

    results = await asyncio.gather(
        *(stub.StartSaga(_start(saga_id)) for saga_id in valid_ids), *(bad_one(call) for call in bad)
    )
    assert all(response.created for response in results[: len(valid_ids)])
    for saga_id in valid_ids:
        await hostile.stack.wait_final(saga_id)
    assert hostile.log.tracebacks() == []


async def test_a_write_the_database_refuses_fails_alone(hostile: Hostile) -> None:
    """Values no request validation checked (submitted to the engine directly)
    reach group commits beside 30 valid starts each: only they fail, every
    valid start lands, and no driver of a running saga crashes."""
    engine = hostile.stack.orchestrator.engine
    stub = hostile.stack.stub
    # Sagas that stay RUNNING: their participant never answers, and they retry for long.
    stalled = _definition(name=f"stalled-{uuid.uuid4().hex[:8]}")
    del stalled.steps[1:]
    stalled.steps[0].participant = "127.0.0.1:1"
    stalled.steps[0].retry.CopyFrom(definition_pb2.RetryPolicy(
        max_attempts=1000, initial_backoff=_duration(1), backoff_multiplier=1.0, max_backoff=_duration(1)
    ))
    await stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=stalled))
    checkout = await engine.find_plan("checkout")
    assert checkout is not None
    saga_input = checkout_input().SerializeToString()
    for round in range(6):
        victims = [f"victim-{round}-{index}-{uuid.uuid4().hex[:6]}" for index in range(2)]
        for victim in victims:
            await stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                saga_id=victim, definition_name=stalled.name, input=checkout_input()
            ))
        poison = [
            engine.apply_external(victims[0], machine.CancelRequested(actor="ops", reason="a\x00b")),
            engine.apply_external(victims[1], machine.CancelRequested(actor="a" * 300, reason="")),
            engine.create(checkout, "x" * 129, saga_input, "fingerprint"),
            engine.create(checkout, f"nul\x00{round}", saga_input, "fingerprint"),
        ]
        valid_ids = [f"neighbour-{round}-{index}-{uuid.uuid4().hex[:6]}" for index in range(30)]
        results = await asyncio.gather(
            *poison, *(stub.StartSaga(_start(saga_id)) for saga_id in valid_ids), return_exceptions=True
        )
        refused = [
            result for result in results[len(poison):] if not isinstance(result, orchestrator_pb2.StartSagaResponse)
        ]
        assert refused == []
        assert all(isinstance(result, RejectedWrite) for result in results[: len(poison)]), results[: len(poison)]
        for saga_id in valid_ids:
            saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
            assert saga.saga_id == saga_id
        for victim in victims:
            saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=victim))).saga
            assert saga.state == saga_pb2.SAGA_STATE_RUNNING
    for saga_id in valid_ids:
        await hostile.stack.wait_final(saga_id)
    assert hostile.log.tracebacks() == []


async def test_bytes_that_are_not_the_request_message_get_invalid_argument_logged_once(hostile: Hostile) -> None:
    raw = hostile.stack.channel.unary_unary(SERVICE + "GetSaga")
    stream = hostile.stack.channel.unary_stream(SERVICE + "WatchSagas")
    warnings_before = len(hostile.log.records)
    for _ in range(5):
        assert (await _refused(raw(b"\xff\xff\xff\xff"))).code() == INVALID
        assert (await _refused(stream(b"\x0a\xff"))).code() == INVALID
    logged = hostile.log.records[warnings_before:]
    assert len(logged) <= 2
    assert all(record.exc_info is None for record in logged)
    assert await hostile.serving()


async def test_page_tokens_are_bound_to_their_query(hostile: Hostile) -> None:
    stub = hostile.stack.stub
    for _ in range(3):
        await stub.StartSaga(_start(f"paged-{uuid.uuid4().hex}"))
    first = await stub.ListSagas(orchestrator_pb2.ListSagasRequest(page_size=1))
    assert first.next_page_token
    second = await stub.ListSagas(orchestrator_pb2.ListSagasRequest(page_size=1, page_token=first.next_page_token))
    assert second.sagas[0].saga_id != first.sagas[0].saga_id
    other_filter = orchestrator_pb2.ListSagasRequest(definition_name="checkout", page_token=first.next_page_token)
    assert (await _refused(stub.ListSagas(other_filter))).code() == INVALID
    wrong_list = orchestrator_pb2.ListDefinitionsRequest(page_token=first.next_page_token)
    assert (await _refused(stub.ListDefinitions(wrong_list))).code() == INVALID


async def test_big_sagas_do_not_break_listing(hostile: Hostile) -> None:
    """Five sagas of about 1 MB each: every page fits in a client's default 4 MB."""
    stub = hostile.stack.stub
    big = set()
    for _ in range(5):
        saga_id = f"big-{uuid.uuid4().hex}"
        await stub.StartSaga(orchestrator_pb2.StartSagaRequest(
            saga_id=saga_id, definition_name="checkout", input=checkout_input(shipping_address="x" * 1_000_000)
        ))
        big.add(saga_id)
    seen: set[str] = set()
    request = orchestrator_pb2.ListSagasRequest()
    while True:
        page = await stub.ListSagas(request)
        assert page.ByteSize() < 4 * 1024 * 1024
        seen.update(saga.saga_id for saga in page.sagas)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert big <= seen


async def test_definition_limits_hold_at_the_edge(hostile: Hostile) -> None:
    stub = hostile.stack.stub
    deepest = _chain(MAX_DEPENDENCY_DEPTH)
    registered = await stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=deepest))
    assert registered.created
    too_deep = _chain(MAX_DEPENDENCY_DEPTH + 1)
    error = await _refused(stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=too_deep)))
    assert error.code() == INVALID and "depends_on" in error.details()
    widest = _chain(MAX_STEPS, independent=True)
    assert (await stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=widest))).created
    listed = await stub.ListDefinitions(orchestrator_pb2.ListDefinitionsRequest())
    assert deepest.name in {definition.name for definition in listed.definitions}


async def test_every_error_carries_a_stable_reason(hostile: Hostile) -> None:
    stub = hostile.stack.stub
    saga_id = f"taken-{uuid.uuid4().hex}"
    await stub.StartSaga(_start(saga_id))
    taken = await _refused(stub.StartSaga(_start(saga_id)))  # another input under the same id
    assert (taken.code(), _error_info(taken).reason) == (grpc.StatusCode.ALREADY_EXISTS, "SAGA_ID_TAKEN")
    no_steps = _definition()
    del no_steps.steps[:]
    invalid = await _refused(stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=no_steps)))
    info = _error_info(invalid)
    assert (invalid.code(), info.reason, info.metadata["field"]) == (INVALID, "INVALID_DEFINITION", "steps")
    missing = await _refused(stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="no-such-saga")))
    assert (missing.code(), _error_info(missing).reason) == (NOT_FOUND, "NOT_FOUND")


class HostileParticipant(participant_pb2_grpc.ParticipantServiceServicer):
    """Answers every Execute with what the test chose: text the database
    cannot store, or an output too large to keep."""

    def __init__(self) -> None:
        self.answers: dict[str, Callable[[grpc.aio.ServicerContext], Awaitable[participant_pb2.ExecuteResponse]]] = {}

    async def Execute(
        self, request: participant_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.ExecuteResponse:
        return await self.answers[request.context.saga_id](context)

    async def Compensate(
        self, request: participant_pb2.CompensateRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.CompensateResponse:
        return participant_pb2.CompensateResponse()


async def test_what_a_participant_answers_cannot_poison_the_log(hostile: Hostile) -> None:
    participant = HostileParticipant()
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])
    participant_pb2_grpc.add_ParticipantServiceServicer_to_server(participant, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        definition = _definition(name=f"answers-{uuid.uuid4().hex[:8]}")
        del definition.steps[1:]
        definition.steps[0].participant = f"127.0.0.1:{port}"
        definition.steps[0].retry.CopyFrom(definition_pb2.RetryPolicy(
            max_attempts=2, initial_backoff=_duration(0, 10_000_000), backoff_multiplier=1.0,
            max_backoff=_duration(0, 10_000_000),
        ))
        stub = hostile.stack.stub
        await stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=definition))

        async def failed_with_nul(context: grpc.aio.ServicerContext) -> participant_pb2.ExecuteResponse:
            return participant_pb2.ExecuteResponse(
                result=participant_pb2.EXECUTE_RESULT_FAILED, failure_reason="no\x00stock " * 2000
            )

        async def unavailable_with_nul(context: grpc.aio.ServicerContext) -> participant_pb2.ExecuteResponse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down\x00now")
            raise AssertionError("unreachable")

        async def huge_output(context: grpc.aio.ServicerContext) -> participant_pb2.ExecuteResponse:
            response = participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_OK)
            response.output.Pack(wrappers_pb2.BytesValue(value=b"x" * (1024 * 1024 + 1)))
            return response

        for answer in (failed_with_nul, unavailable_with_nul, huge_output):
            saga_id = f"answer-{answer.__name__}-{uuid.uuid4().hex[:6]}"
            participant.answers[saga_id] = answer
            await stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                saga_id=saga_id, definition_name=definition.name, input=checkout_input()
            ))
            saga = await hostile.stack.wait_final(saga_id, timeout=20)
            step = saga.steps[0]
            assert "\x00" not in step.last_error and len(step.last_error) <= 4096, (answer.__name__, step.last_error)
            assert not step.HasField("output")
    finally:
        await server.stop(0)
    assert hostile.log.tracebacks() == []


# --- property-based variations ----------------------------------------------------------

_EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@_EXAMPLES
@given(saga_id=st.text(max_size=300))
async def test_any_saga_id_gets_a_clean_answer(hostile: Hostile, saga_id: str) -> None:
    stub = hostile.stack.stub
    try:
        response = await stub.StartSaga(_start(saga_id))
        assert response.saga.saga_id == saga_id
    except grpc.aio.AioRpcError as error:
        assert error.code() == INVALID
        assert len(error.details()) <= MAX_MESSAGE_CHARS
    try:
        await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))
    except grpc.aio.AioRpcError as error:
        assert error.code() in (INVALID, NOT_FOUND)
        assert len(error.details()) <= MAX_MESSAGE_CHARS
    assert hostile.log.tracebacks() == []


@_EXAMPLES
@given(
    token=st.one_of(
        st.text(max_size=200), st.binary(max_size=200).map(lambda raw: base64.urlsafe_b64encode(raw).decode())
    )
)
async def test_any_page_token_the_server_did_not_issue_is_invalid(hostile: Hostile, token: str) -> None:
    if not token:
        return
    for call in (
        hostile.stack.stub.ListSagas(orchestrator_pb2.ListSagasRequest(page_token=token)),
        hostile.stack.stub.ListDefinitions(orchestrator_pb2.ListDefinitionsRequest(page_token=token)),
    ):
        assert (await _refused(call)).code() == INVALID
    assert hostile.log.tracebacks() == []


@_EXAMPLES
@given(seconds=st.integers(INT64_MIN, INT64_MAX), nanos=st.integers(-(2**31), 2**31 - 1))
async def test_any_duration_is_range_checked(hostile: Hostile, seconds: int, nanos: int) -> None:
    duration = _duration(seconds, nanos)
    well_formed = abs(nanos) < 10**9 and not (seconds > 0 > nanos or seconds < 0 < nanos)
    stub = hostile.stack.stub
    try:
        response = await stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest(stuck_for=duration))
        assert well_formed and response.stuck_for == duration
    except grpc.aio.AioRpcError as error:
        assert error.code() == INVALID, error.details()
        assert len(error.details()) <= MAX_MESSAGE_CHARS
    assert hostile.log.tracebacks() == []


@_EXAMPLES
@given(reason=st.text(max_size=5000), actor=st.text(max_size=300))
async def test_any_operator_text_is_stored_or_refused_whole(hostile: Hostile, reason: str, actor: str) -> None:
    stub = hostile.stack.stub
    saga_id = f"cancel-{uuid.uuid4().hex}"
    await stub.StartSaga(_start(saga_id))
    try:
        await stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id=saga_id, reason=reason, actor=actor))
    except grpc.aio.AioRpcError as error:
        assert error.code() in (INVALID, grpc.StatusCode.FAILED_PRECONDITION), error.details()
        assert len(error.details()) <= MAX_MESSAGE_CHARS
    final = await hostile.stack.wait_final(saga_id)
    assert final.state in (saga_pb2.SAGA_STATE_SUCCEEDED, saga_pb2.SAGA_STATE_COMPENSATED)
    assert hostile.log.tracebacks() == []


_NAMES = st.one_of(st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True), st.text(max_size=70))


@_EXAMPLES
@given(data=st.data())
async def test_any_definition_gets_a_clean_answer(hostile: Hostile, data: st.DataObject) -> None:
    """Random names and dependency graphs (unknown steps, cycles, self-loops,
    duplicates): registered, or refused with INVALID_ARGUMENT, never worse."""
    names = data.draw(st.lists(_NAMES, min_size=1, max_size=40))
    definition = definition_pb2.SagaDefinition(
        name=data.draw(_NAMES), input_type="compensa.checkout.v1.CheckoutInput",
        description=data.draw(st.text(max_size=100)),
    )
    for name in names:
        step = definition.steps.add(name=name, participant="inventory")
        step.depends_on.extend(data.draw(st.lists(st.sampled_from(names), max_size=3)))
        step.kind = data.draw(st.sampled_from(list(definition_pb2.StepKind.values())))
    try:
        await hostile.stack.stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=definition))
    except grpc.aio.AioRpcError as error:
        assert error.code() == INVALID, error.details()
        assert len(error.details()) <= MAX_MESSAGE_CHARS
        assert _error_info(error).reason == "INVALID_DEFINITION"
    assert hostile.log.tracebacks() == []


async def test_server_still_serving_after_all(hostile: Hostile) -> None:
    assert await poll_until(hostile.serving)
    assert hostile.log.tracebacks() == []


# --- the dashboard: the same limits over HTTP ---------------------------------------------

_HTTP_REFUSALS: dict[str, tuple[str, str, dict[str, str] | None, set[int]]] = {
    # name: (method, path and query, form, statuses allowed)
    "saga id with NUL": ("GET", "/sagas/a%00b", None, {400}),
    "saga id of 100,000 characters": ("GET", "/sagas/" + "x" * 100_000, None, {400, 404, 414}),
    "definition filter with NUL": ("GET", "/?definition=a%00b", None, {400}),
    "search with NUL": ("GET", "/?q=a%00b", None, {400}),
    "stuck beyond bounds": ("GET", "/?stuck=99999999999999999999999d", None, {400}),
    "stuck of a huge quote": ("GET", "/?stuck=" + "y" * 5000, None, {400}),
    "live after a superscript digit": ("GET", "/live?after=%C2%B2", None, {400}),
    "live after beyond int64": ("GET", "/live?after=" + "9" * 30, None, {400}),
    "cancel reason with NUL": ("POST", "/sagas/{saga}/cancel", {"reason": "a\x00b"}, {400}),
    "cancel reason of 5,000 characters": ("POST", "/sagas/{saga}/cancel", {"reason": "r" * 5000}, {400}),
    "cancel of a saga id with NUL": ("POST", "/sagas/a%00b/cancel", {"reason": "why"}, {400}),
}


async def test_the_dashboard_answers_hostile_requests_with_client_errors(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    from dashboard_rig import TOKENS, dashboard_rig

    records = LogRecords()
    logging.getLogger("compensa").addHandler(records)
    try:
        async with dashboard_rig(tmp_path, make_postgres_url) as rig:
            await rig.failed_for_a_person("dash-target")
            headers = {"Authorization": f"Bearer {TOKENS['operator']}", "Accept": "application/json"}
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
                page = await session.get(rig.url + "/sagas/dash-target", headers={"Accept": "text/html"})
                form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', await page.text())
                assert form_token is not None
                sequence = (await rig.saga("dash-target")).sequence
                failures = []
                for name, (method, target, form, allowed) in _HTTP_REFUSALS.items():
                    url = rig.url + target.replace("{saga}", "dash-target")
                    data = {**form, "form_token": form_token.group(1)} if form is not None else None
                    async with session.request(
                        method, yarl.URL(url, encoded=True), data=data, allow_redirects=False
                    ) as answer:
                        body = await answer.text()
                        if answer.status not in allowed or len(body) > 2 * MAX_MESSAGE_CHARS:
                            failures.append(f"{name}: {answer.status} {body[:200]!r}")
                assert failures == []
            saga = await rig.saga("dash-target")
            assert saga.state == saga_pb2.SAGA_STATE_FAILED and saga.sequence == sequence
        assert records.tracebacks() == []
    finally:
        logging.getLogger("compensa").removeHandler(records)
