"""`compensa demo`: the checkout saga end to end, in one process.

Starts the three example participants and an orchestrator on embedded SQLite
in a fresh directory, runs a checkout that succeeds and one whose payment is
declined, prints their timelines and what each participant did, and checks
that the declined checkout was undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import typing
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import sqlalchemy
from compensa.checkout.v1 import checkout_pb2
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2
from google.protobuf import any_pb2

from orchestrator import timeline
from orchestrator.config import ServerConfig
from orchestrator.server import start_orchestrator
from participants.server import PARTICIPANT_KINDS, start_participant

__all__ = ["DEFINITIONS_DIR", "run_demo"]

#: The example definitions shipped with the repository.
DEFINITIONS_DIR = Path(__file__).resolve().parents[1] / "definitions"

_SAGA_DEADLINE_SECONDS = 60.0
_CALL_TIMEOUT_SECONDS = 10.0
_FINAL_EVENT_TYPES = frozenset(
    {saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED, saga_pb2.EVENT_TYPE_SAGA_COMPENSATED, saga_pb2.EVENT_TYPE_SAGA_FAILED}
)
_STATUS_COLUMNS = ("status", "state")


@dataclass(frozen=True)
class _Checkout:
    title: str
    saga_id: str
    checkout_input: checkout_pb2.CheckoutInput
    expected_state: saga_pb2.SagaState.ValueType


async def run_demo(workdir: Path | None = None) -> int:
    """Runs the demo in `workdir` (a fresh temporary directory if None).

    Returns 0 if the first checkout SUCCEEDED and the declined one was
    COMPENSATED with its stock released and its card not charged, else 1.
    """
    with contextlib.ExitStack() as cleanup:
        if workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="compensa-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        return await _run_demo_in(workdir)


async def _run_demo_in(workdir: Path) -> int:
    run_id = uuid.uuid4().hex[:8]
    checkouts = [
        _Checkout(
            title="checkout that succeeds",
            saga_id=f"demo-{run_id}-ok",
            checkout_input=_checkout_input(f"order-{run_id}-1", card_token="card-ok"),
            expected_state=saga_pb2.SAGA_STATE_SUCCEEDED,
        ),
        _Checkout(
            title="checkout whose payment is declined",
            saga_id=f"demo-{run_id}-declined",
            checkout_input=_checkout_input(f"order-{run_id}-2", card_token="flagged-card"),
            expected_state=saga_pb2.SAGA_STATE_COMPENSATED,
        ),
    ]
    async with contextlib.AsyncExitStack() as stack:
        participant_addresses: dict[str, str] = {}
        for kind in PARTICIPANT_KINDS:
            participant = await start_participant(kind, _sqlite_url(workdir / f"{kind}.db"))
            stack.push_async_callback(participant.stop)
            participant_addresses[kind] = participant.address
            print(f"participant {kind} listening on {participant.address}")
        orchestrator = await start_orchestrator(
            ServerConfig(
                listen="127.0.0.1:0",
                database_url=_sqlite_url(workdir / "compensa.db"),
                definition_paths=(DEFINITIONS_DIR / "checkout.yaml",),
                participants=participant_addresses,
            )
        )
        stack.push_async_callback(orchestrator.stop)
        print(f"orchestrator listening on {orchestrator.address}\n")

        async with grpc.aio.insecure_channel(orchestrator.address) as channel:
            # grpc ships no type hints, so the stub's overload on the channel type cannot pick the async one.
            stub = typing.cast(
                "orchestrator_pb2_grpc.OrchestratorServiceAsyncStub", orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            )
            outcomes = [await _run_checkout(stub, checkout) for checkout in checkouts]

    print("summary")
    for checkout, saga in zip(checkouts, outcomes):
        print(f"  {checkout.title:<36} {saga.saga_id}  {timeline.saga_state_name(saga.state)}")
    print()
    _print_participant_effects(workdir)
    problems = _problems(checkouts, outcomes)
    for problem in problems:
        print(f"demo FAILED: {problem}")
    if not problems:
        print("demo OK: the first checkout succeeded; the declined one released its stock and charged nothing")
    return 1 if problems else 0


def _checkout_input(order_id: str, *, card_token: str) -> checkout_pb2.CheckoutInput:
    return checkout_pb2.CheckoutInput(
        order_id=order_id,
        sku="sku-widget",
        quantity=2,
        amount_cents=4_200,
        card_token=card_token,
        shipping_address="1 Saga Street, Springfield",
    )


async def _run_checkout(stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub, checkout: _Checkout) -> saga_pb2.Saga:
    print(f"== {checkout.title}: saga {checkout.saga_id}")
    saga_input = any_pb2.Any()
    saga_input.Pack(checkout.checkout_input)
    await stub.StartSaga(
        orchestrator_pb2.StartSagaRequest(saga_id=checkout.saga_id, definition_name="checkout", input=saga_input),
        timeout=_CALL_TIMEOUT_SECONDS,
    )
    try:
        async with asyncio.timeout(_SAGA_DEADLINE_SECONDS):
            async for update in stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=checkout.saga_id)):
                print(timeline.format_event(update.event))
                if update.event.type in _FINAL_EVENT_TYPES:
                    break
    except TimeoutError:
        print(f"  (no final event within {_SAGA_DEADLINE_SECONDS:g}s)")
    answer: orchestrator_pb2.GetSagaResponse = await stub.GetSaga(
        orchestrator_pb2.GetSagaRequest(saga_id=checkout.saga_id), timeout=_CALL_TIMEOUT_SECONDS
    )
    saga = answer.saga
    print(timeline.format_saga(saga))
    print()
    return saga


def _problems(checkouts: list[_Checkout], outcomes: list[saga_pb2.Saga]) -> list[str]:
    problems = [
        f"{checkout.title} ended {timeline.saga_state_name(saga.state)}, "
        f"expected {timeline.saga_state_name(checkout.expected_state)}"
        for checkout, saga in zip(checkouts, outcomes)
        if saga.state != checkout.expected_state
    ]
    declined = {step.name: step.state for step in outcomes[1].steps}
    if declined.get("reserve_stock") != saga_pb2.STEP_STATE_COMPENSATED:
        problems.append("the declined checkout's stock reservation was not released")
    if declined.get("charge_card") in (saga_pb2.STEP_STATE_SUCCEEDED, saga_pb2.STEP_STATE_COMPENSATED):
        problems.append("the declined checkout's card was charged")
    return problems


def _print_participant_effects(workdir: Path) -> None:
    print("participant effects")
    for kind in PARTICIPANT_KINDS:
        for table, counts in _table_summaries(workdir / f"{kind}.db").items():
            described = ", ".join(f"{value}: {count}" for value, count in counts.items()) or "empty"
            print(f"  {kind:<10} {table:<20} {described}")
    print()


def _table_summaries(database: Path) -> dict[str, Mapping[str, int]]:
    """Rows per table, broken down by the table's status column if it has one."""
    engine = sqlalchemy.create_engine(f"sqlite:///{database}")
    try:
        metadata = sqlalchemy.MetaData()
        metadata.reflect(engine)
        summaries: dict[str, Mapping[str, int]] = {}
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                status = next((table.c[name] for name in _STATUS_COLUMNS if name in table.c), None)
                if status is None:
                    total = connection.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(table)).scalar_one()
                    summaries[table.name] = {"rows": total}
                else:
                    rows = connection.execute(
                        sqlalchemy.select(status, sqlalchemy.func.count()).group_by(status).order_by(status)
                    )
                    summaries[table.name] = {str(value): count for value, count in rows}
        return summaries
    finally:
        engine.dispose()


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"
