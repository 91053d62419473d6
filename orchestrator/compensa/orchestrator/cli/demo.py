"""`compensa demo`: the checkout saga end to end, in one process.

Starts the three example participants and an orchestrator on embedded SQLite
in a fresh directory, runs a checkout that succeeds and one whose payment is
declined (the payment participant also fails each first attempt, so both sagas
show a retry), prints their timelines and what each participant did, and
checks that the declined checkout was undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import sqlalchemy
from google.protobuf import any_pb2
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.checkout.v1 import checkout_pb2
from compensa.examples import DEFINITIONS_DIR
from compensa.examples.inventory import RESERVATIONS
from compensa.examples.payment import CHARGES, REFUNDS
from compensa.examples.server import start_participant
from compensa.examples.shipping import SHIPMENTS
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.orchestrator.shared import timeline
from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

__all__ = ["CHECKOUT_PARTICIPANTS", "DEFINITIONS_DIR", "run_demo"]

#: The participants DEFINITIONS_DIR/checkout.yaml calls.
CHECKOUT_PARTICIPANTS = ("inventory", "payment", "shipping")

#: Every first charge attempt fails as if the payment service were briefly down.
_PAYMENT_FAULTS = FaultPlan(unavailable_attempts=1)
_SAGA_DEADLINE_SECONDS = 60.0
_CALL_TIMEOUT_SECONDS = 10.0
_FINAL_EVENT_TYPES = frozenset(
    {saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED, saga_pb2.EVENT_TYPE_SAGA_COMPENSATED, saga_pb2.EVENT_TYPE_SAGA_FAILED}
)


@dataclass(frozen=True)
class _Checkout:
    title: str
    saga_id: str
    checkout_input: checkout_pb2.CheckoutInput
    expected_state: saga_pb2.SagaState.ValueType


async def run_demo(workdir: Path | None = None, *, http_listen: str = "127.0.0.1:0", stay: bool = False) -> int:
    """Runs the demo in `workdir` (a fresh temporary directory if None),
    with the dashboard on `http_listen`; with `stay`, keeps the orchestrator
    and the dashboard up after the checkouts until interrupted.

    Returns 0 if the first checkout SUCCEEDED and the declined one was
    COMPENSATED with its stock released and its card not charged, else 1.
    """
    with contextlib.ExitStack() as cleanup:
        if workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="compensa-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        return await _run_demo_in(workdir.resolve(), http_listen, stay)


async def _run_demo_in(workdir: Path, http_listen: str, stay: bool) -> int:
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
        for kind in CHECKOUT_PARTICIPANTS:
            faults = _PAYMENT_FAULTS if kind == "payment" else None
            participant = await start_participant(kind, _sqlite_url(workdir / f"{kind}.db"), faults=faults)
            stack.push_async_callback(participant.stop)
            participant_addresses[kind] = participant.address
            injected = " (answers UNAVAILABLE to every first attempt, to show retries)" if faults else ""
            print(f"participant {kind} listening on {participant.address}{injected}")
        orchestrator = await start_orchestrator(
            ServerConfig(
                listen="127.0.0.1:0",
                database_url=_sqlite_url(workdir / "compensa.db"),
                definition_paths=(DEFINITIONS_DIR / "checkout.yaml",),
                participants=participant_addresses,
                http_listen=http_listen,
            )
        )
        stack.push_async_callback(orchestrator.stop)
        assert orchestrator.dashboard is not None
        print(f"orchestrator listening on {orchestrator.address}")
        # A link only when it stays alive: without --stay the demo ends in seconds.
        if stay:
            print(f"dashboard at {orchestrator.dashboard.url} (up until Ctrl-C)")
        print(flush=True)

        async with grpc.aio.insecure_channel(orchestrator.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            outcomes = [await _run_checkout(stub, checkout) for checkout in checkouts]
        problems = await _summarize(workdir, checkouts, outcomes)
        if stay:
            print(f"the dashboard stays up at {orchestrator.dashboard.url}; press Ctrl-C to end the demo", flush=True)
            await _until_interrupted()
        else:
            print("(`compensa demo --stay`, or `make demo STAY=1`, keeps the orchestrator and its dashboard up"
                  " afterwards, until Ctrl-C)")
    return 1 if problems else 0


async def _summarize(workdir: Path, checkouts: list[_Checkout], outcomes: list[saga_pb2.Saga]) -> list[str]:
    """Prints what each checkout ended as and what its participants did; the problems found."""
    effects = await _read_effects(workdir, [checkout.saga_id for checkout in checkouts])
    print("summary")
    for checkout, saga in zip(checkouts, outcomes, strict=True):
        print(f"  {checkout.title:<36} {saga.saga_id}  {timeline.saga_state_name(saga.state)}")
        print(f"    participants: {effects[saga.saga_id].describe()}")
    print()
    problems = _problems(checkouts, outcomes, effects)
    for problem in problems:
        print(f"demo FAILED: {problem}")
    if not problems:
        print("demo OK: the first checkout succeeded; the declined one released its stock and charged nothing")
    return problems


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()


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
            async for update in stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(
                saga_id=checkout.saga_id, replay_history=True
            )):
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


@dataclass(frozen=True)
class _SagaEffects:
    """What the participants' own tables say one saga did."""

    reservation_statuses: tuple[str, ...]
    charge_statuses: tuple[str, ...]
    refunds: int
    tracking_numbers: tuple[str, ...]

    def describe(self) -> str:
        """One line: reservation and charge statuses, refunds, tracking numbers."""
        return "; ".join(
            [
                "reservations: " + (", ".join(self.reservation_statuses) or "none"),
                "charges: " + (", ".join(self.charge_statuses) or "none"),
                f"refunds: {self.refunds}",
                "shipments: " + (", ".join(self.tracking_numbers) or "none"),
            ]
        )


async def _read_effects(workdir: Path, saga_ids: list[str]) -> dict[str, _SagaEffects]:
    """Each saga's effects, read from the participants' SQLite files after they stopped."""
    inventory = create_async_engine(_sqlite_url(workdir / "inventory.db"))
    payment = create_async_engine(_sqlite_url(workdir / "payment.db"))
    shipping = create_async_engine(_sqlite_url(workdir / "shipping.db"))
    try:
        effects: dict[str, _SagaEffects] = {}
        async with inventory.connect() as stock, payment.connect() as cards, shipping.connect() as parcels:
            for saga_id in saga_ids:
                reservations = await stock.scalars(
                    sqlalchemy.select(RESERVATIONS.c.status).where(RESERVATIONS.c.saga_id == saga_id)
                )
                charges = await cards.scalars(sqlalchemy.select(CHARGES.c.status).where(CHARGES.c.saga_id == saga_id))
                refunds = await cards.scalar(
                    sqlalchemy.select(sqlalchemy.func.count()).select_from(REFUNDS).where(REFUNDS.c.saga_id == saga_id)
                )
                shipments = await parcels.scalars(
                    sqlalchemy.select(SHIPMENTS.c.tracking_number).where(SHIPMENTS.c.saga_id == saga_id)
                )
                effects[saga_id] = _SagaEffects(
                    reservation_statuses=tuple(reservations),
                    charge_statuses=tuple(charges),
                    refunds=refunds or 0,
                    tracking_numbers=tuple(shipments),
                )
        return effects
    finally:
        for engine in (inventory, payment, shipping):
            await engine.dispose()


def _problems(
    checkouts: list[_Checkout], outcomes: list[saga_pb2.Saga], effects: Mapping[str, _SagaEffects]
) -> list[str]:
    problems = [
        f"{checkout.title} ended {timeline.saga_state_name(saga.state)}, "
        f"expected {timeline.saga_state_name(checkout.expected_state)}"
        for checkout, saga in zip(checkouts, outcomes, strict=True)
        if saga.state != checkout.expected_state
    ]
    declined = effects[checkouts[1].saga_id]
    if not declined.reservation_statuses or set(declined.reservation_statuses) != {"released"}:
        problems.append(f"the declined checkout's stock was not released ({declined.describe()})")
    if declined.charge_statuses:
        problems.append(f"the declined checkout's card was charged ({declined.describe()})")
    return problems


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"
