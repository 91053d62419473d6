"""Typed participant contracts (protos/compensa/v1/contract.proto): the
generated stubs, participants on them end to end, and definitions checked
against stored contracts."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from dashboard_rig import bearer, dashboard_rig
from harness import poll_until
from participant_helpers import StepCall, status_of
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.checkout.v1 import checkout_pb2
from compensa.checkout.v1.participants_compensa import (
    CheckoutSaga,
    InventoryParticipantBase,
    PaymentParticipantBase,
    ShippingParticipantBase,
)
from compensa.orchestrator.cli.demo import DEFINITIONS_DIR
from compensa.orchestrator.definitions import compile_proto_files, definition_fingerprint, load_definition_file
from compensa.orchestrator.store import ContractChange, SagaStore, SqlSagaStore, open_store
from compensa.orchestrator.store.schema import alerts, participant_changes, participant_contracts
from compensa.participants.sdk import Pending, StepFailed
from compensa.testing import SagaTestEnvironment
from compensa.v1 import contract_pb2, definition_pb2, orchestrator_pb2, participant_pb2_grpc, saga_pb2
from compensa.v1.participant_pb2 import StepContext

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
CHECKOUT_CONTRACTS = PROTOS / "compensa" / "checkout" / "v1" / "participants.proto"
BIN = Path(sys.executable).parent
NODE_PARTICIPANT = ROOT / "tests" / "node_participant" / "shipping.js"
#: Where the Node.js participant's npm packages are installed (by `make test`, or here on first use).
NODE_MODULES_CACHE = Path(os.environ.get("COMPENSA_NODE_TEST_MODULES", ROOT / ".venv" / "node-test-modules"))
NODE_PACKAGES = ("@grpc/grpc-js@1", "@grpc/proto-loader@0.8")
COMMAND_TIMEOUT_SECONDS = 180.0

# --- codegen -----------------------------------------------------------------

TRAVEL_COMMON = """
syntax = "proto3";
package travel.common.v1;
import "compensa/v1/contract.proto";
import "google/protobuf/timestamp.proto";
message Money { int64 cents = 1; string currency = 2; }
message Stay { google.protobuf.Timestamp check_in = 1; google.protobuf.Timestamp check_out = 2; }
service ExchangeParticipant {
  rpc Convert(Money) returns (Money) { option (compensa.v1.step) = {kind: STEP_KIND_RETRIABLE}; }
}
"""

TRAVEL_TRIP = """
syntax = "proto3";
package travel.v1;
import "travel/common/v1/common.proto";
import "compensa/v1/contract.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

message TripInput {
  string trip_id = 1;
  travel.common.v1.Money budget = 2;
  message Leg { string origin = 1; string destination = 2; }
  repeated Leg legs = 3;
}
message HotelBooking { string booking_id = 1; travel.common.v1.Stay stay = 2; }
message HotelCancellation { string booking_id = 1; }
message Payment { string payment_id = 1; travel.common.v1.Money paid = 2; }

service HotelParticipant {
  rpc BookHotel(TripInput) returns (HotelBooking) {
    option (compensa.v1.step) = {kind: STEP_KIND_COMPENSABLE undo_output: "travel.v1.HotelCancellation"};
  }
  rpc HoldRoom(TripInput) returns (HotelBooking) {
    option (compensa.v1.step) = {kind: STEP_KIND_COMPENSABLE long_running: true};
  }
}

service PaymentParticipant {
  rpc Pay(TripInput) returns (Payment) {
    option (compensa.v1.step) = {
      kind: STEP_KIND_PIVOT
      needs: {step: "book_hotel", type: "travel.v1.HotelBooking"}
    };
  }
  rpc Notify(TripInput) returns (google.protobuf.Timestamp) {
    option (compensa.v1.step) = {kind: STEP_KIND_RETRIABLE name: "notify-traveller"};
  }
}

service LegParticipant {
  rpc PlanLeg(TripInput.Leg) returns (google.protobuf.StringValue) {
    option (compensa.v1.step) = {kind: STEP_KIND_COMPENSABLE};
  }
}
"""

TRAVEL_PARTICIPANT = """
from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.orchestrator.client import SagaClient
from compensa.participants.sdk import Pending
from compensa.v1.participant_pb2 import StepContext
from travel.common.v1.common_pb2 import Money
from travel.v1.trip_compensa import HotelParticipantBase, PaymentParticipantBase, TripSaga
from travel.v1.trip_pb2 import HotelBooking, HotelCancellation, Payment, TripInput

#: The bookings undone, by reference.
RELEASED: list[str] = []


class Hotel(HotelParticipantBase):
    async def book_hotel(self, conn: AsyncConnection, trip: TripInput, ctx: StepContext) -> HotelBooking:
        return HotelBooking(booking_id=f"{trip.trip_id}/{ctx.attempt}")

    async def undo_book_hotel(
        self, conn: AsyncConnection, trip: TripInput, hotel_booking: HotelBooking, ctx: StepContext
    ) -> HotelCancellation:
        return HotelCancellation(booking_id=hotel_booking.booking_id)

    async def hold_room(
        self, conn: AsyncConnection, trip: TripInput, completion_token: str, ctx: StepContext
    ) -> HotelBooking | Pending:
        return Pending()

    async def undo_hold_room(
        self, conn: AsyncConnection, trip: TripInput, hotel_booking: HotelBooking | None, ctx: StepContext
    ) -> None:
        if hotel_booking is not None:  # None: held, then compensated before anything was booked
            RELEASED.append(hotel_booking.booking_id)


class Pay(PaymentParticipantBase):
    async def pay(
        self, conn: AsyncConnection, trip: TripInput, book_hotel: HotelBooking, ctx: StepContext
    ) -> Payment:
        return Payment(payment_id=book_hotel.booking_id, paid=Money(cents=trip.budget.cents))

    async def notify_traveller(self, conn: AsyncConnection, trip: TripInput, ctx: StepContext) -> Timestamp:
        return Timestamp(seconds=1)


async def book(client: SagaClient) -> str:
    run = await TripSaga(client).execute(TripInput(trip_id="t-1"))
    booking = run.book_hotel()
    return booking.booking_id if booking is not None else ""
"""

MYPY_CONFIG = """
[mypy]
strict = True
python_version = 3.11
explicit_package_bases = True
mypy_path = {mypy_path}

[mypy-grpc_health.*,grpc_reflection.*,grpc_tools.*]
ignore_missing_imports = True

[mypy-compensa.v1.*,compensa.checkout.*,travel.v1.trip_pb2,travel.common.v1.common_pb2]
ignore_errors = True

[mypy-google.rpc.*]
follow_untyped_imports = True
"""


def _ruff(directory: Path, *files: str) -> subprocess.CompletedProcess[str]:
    """ruff with the project's rules over `files`, as a user's project would run it."""
    return _run([str(BIN / "ruff"), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), *files], directory)


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT_SECONDS,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )


@pytest.fixture(scope="module")
def travel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The travel contracts, generated with `compensa codegen` into a project directory."""
    project = tmp_path_factory.mktemp("travel")
    protos = project / "protos"
    (protos / "travel" / "common" / "v1").mkdir(parents=True)
    (protos / "travel" / "v1").mkdir(parents=True)
    (protos / "travel" / "common" / "v1" / "common.proto").write_text(TRAVEL_COMMON)
    (protos / "travel" / "v1" / "trip.proto").write_text(TRAVEL_TRIP)
    generated = _run(
        [str(BIN / "compensa"), "codegen", "protos/travel/v1/trip.proto", "protos/travel/common/v1/common.proto",
         "--proto-path", "protos", "--out", "."],
        project,
    )
    assert generated.returncode == 0, generated.stderr
    (project / "mypy.ini").write_text(MYPY_CONFIG.format(
        mypy_path=os.pathsep.join(str(ROOT / root) for root in ("generated", "orchestrator", "participants"))
    ))
    return project


def test_codegen_writes_typed_bases_and_starters(travel: Path) -> None:
    stubs = (travel / "travel" / "v1" / "trip_compensa.py").read_text()
    assert (travel / "travel" / "v1" / "trip_pb2.py").is_file()
    assert (travel / "travel" / "common" / "v1" / "common_pb2.py").is_file()
    # A second file asked for, imported by the first: its own contract, in its own module.
    common = (travel / "travel" / "common" / "v1" / "common_compensa.py").read_text()
    assert "class ExchangeParticipantBase(TypedParticipant):" in common and "class MoneySaga(" in common
    assert "ExchangeParticipant" not in stubs
    for expected in (
        "class HotelParticipantBase(TypedParticipant):",
        "class PaymentParticipantBase(TypedParticipant):",
        "class LegParticipantBase(TypedParticipant):",
        # A pivot needing an earlier output: typed argument, no undo.
        "        book_hotel: travel.v1.trip_pb2.HotelBooking,\n        ctx: StepContext,\n"
        "    ) -> travel.v1.trip_pb2.Payment:",
        # Well-known types, a nested input, an undo with its declared output.
        ") -> google.protobuf.timestamp_pb2.Timestamp:",
        "leg: travel.v1.trip_pb2.TripInput.Leg,",
        "async def undo_book_hotel(",
        # A long-running step's undo: a bare Pending compensated before any report left no output.
        "        hotel_booking: travel.v1.trip_pb2.HotelBooking | None,\n        ctx: StepContext,\n    ) -> None:",
        ") -> travel.v1.trip_pb2.HotelCancellation:",
        # The rpc Notify, whose step is named "notify-traveller".
        '"notify-traveller": TypedStep(',
        "async def notify_traveller(",
        "class TripSaga(",
        "class LegSaga(",
    ):
        assert expected in stubs, f"missing from trip_compensa.py: {expected}"
    assert "async def undo_pay(" not in stubs and "async def undo_notify_traveller(" not in stubs


def test_generated_stubs_and_a_participant_on_them_pass_ruff_and_mypy_strict(travel: Path) -> None:
    (travel / "hotel.py").write_text(textwrap.dedent(TRAVEL_PARTICIPANT))
    checked = _run(
        [str(BIN / "mypy"), "--config-file", "mypy.ini", "hotel.py", "travel/v1/trip_compensa.py",
         "travel/common/v1/common_compensa.py"],
        travel,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    linted = _ruff(travel, "hotel.py", "travel/v1/trip_compensa.py", "travel/common/v1/common_compensa.py")
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_mypy_catches_a_step_returning_the_wrong_type(travel: Path) -> None:
    wrong = TRAVEL_PARTICIPANT.replace(
        "return HotelBooking(booking_id=f\"{trip.trip_id}/{ctx.attempt}\")", "return HotelCancellation()"
    )
    (travel / "wrong.py").write_text(textwrap.dedent(wrong))
    checked = _run([str(BIN / "mypy"), "--config-file", "mypy.ini", "wrong.py"], travel)
    assert checked.returncode != 0
    assert "Incompatible return value type" in checked.stdout, checked.stdout


def test_the_plugin_runs_under_protoc(travel: Path, tmp_path: Path) -> None:
    # compensa/v1/contract.proto from where compensa installed it, as a user finds it.
    include = _run([str(BIN / "compensa"), "codegen", "--include-path"], travel)
    assert include.returncode == 0, include.stderr
    command = [
        sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={travel / 'protos'}",
        f"--proto_path={include.stdout.strip()}", f"--compensa_python_out={tmp_path}", "travel/v1/trip.proto",
    ]
    ran = _run(command, travel)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "travel" / "v1" / "trip_compensa.py").read_text() == (
        travel / "travel" / "v1" / "trip_compensa.py"
    ).read_text()


#: The README tutorial's files, as a reader saves them.
TUTORIAL_FILE = re.compile(r"<!-- tutorial:file (?P<name>\S+) -->\n```\w*\n(?P<body>.*?)```", re.S)


def test_the_tutorial_participant_on_its_contract_passes_ruff_and_mypy_strict(tmp_path: Path) -> None:
    files = {match["name"]: match["body"] for match in TUTORIAL_FILE.finditer((ROOT / "README.md").read_text())}
    for name in ("trip.proto", "travel.py"):
        (tmp_path / name).write_text(files[name])
    generated = _run([str(BIN / "compensa"), "codegen", "trip.proto", "--out", "."], tmp_path)
    assert generated.returncode == 0, generated.stderr
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG.replace("travel.v1.trip_pb2", "trip_pb2").format(
        mypy_path=os.pathsep.join(str(ROOT / root) for root in ("generated", "orchestrator", "participants"))
    ))
    checked = _run([str(BIN / "mypy"), "--config-file", "mypy.ini", "travel.py", "trip_compensa.py"], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    linted = _ruff(tmp_path, "travel.py", "trip_compensa.py")
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_codegen_refuses_a_contract_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "bad.proto").write_text(textwrap.dedent("""
        syntax = "proto3";
        package bad.v1;
        import "compensa/v1/contract.proto";
        message In { string id = 1; }
        service Bad {
          rpc Ok(In) returns (In) { option (compensa.v1.step) = {kind: STEP_KIND_PIVOT}; }
          rpc NoKind(In) returns (In) { option (compensa.v1.step) = {name: "no_kind"}; }
        }
    """))
    ran = _run([str(BIN / "compensa"), "codegen", "bad.proto", "--out", "out"], tmp_path)
    assert ran.returncode == 2
    assert "bad.v1.Bad.NoKind: (compensa.v1.step).kind is required" in ran.stderr


# --- participants on the generated base classes, end to end --------------------


class Inventory(InventoryParticipantBase):
    async def reserve_stock(
        self, conn: AsyncConnection, checkout: checkout_pb2.CheckoutInput, ctx: StepContext
    ) -> checkout_pb2.Reservation:
        return checkout_pb2.Reservation(reservation_id=f"r-{checkout.order_id}", sku=checkout.sku,
                                        quantity=checkout.quantity)

    async def undo_reserve_stock(
        self, conn: AsyncConnection, checkout: checkout_pb2.CheckoutInput, reservation: checkout_pb2.Reservation,
        ctx: StepContext,
    ) -> checkout_pb2.Release:
        return checkout_pb2.Release(reservation_id=reservation.reservation_id)


class Payment(PaymentParticipantBase):
    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        #: The completion tokens of the charges held for review.
        self.held: list[str] = []
        #: What each undo of charge_card received as the charge it undoes.
        self.undone: list[checkout_pb2.Charge | None] = []

    async def charge_card(
        self, conn: AsyncConnection, checkout: checkout_pb2.CheckoutInput, reserve_stock: checkout_pb2.Reservation,
        completion_token: str, ctx: StepContext,
    ) -> checkout_pb2.Charge | Pending:
        if checkout.card_token.startswith("flagged"):
            raise StepFailed("card declined")
        charge = checkout_pb2.Charge(charge_id=f"c-for-{reserve_stock.reservation_id}",
                                     amount_cents=checkout.amount_cents)
        if checkout.card_token.startswith("review"):
            self.held.append(completion_token)
            return Pending(charge)
        if checkout.card_token.startswith("later"):
            # Nothing known yet: the charge arrives with the outcome, if ever.
            self.held.append(completion_token)
            return Pending()
        return charge

    async def undo_charge_card(
        self, conn: AsyncConnection, checkout: checkout_pb2.CheckoutInput, charge: checkout_pb2.Charge | None,
        reserve_stock: checkout_pb2.Reservation, ctx: StepContext,
    ) -> checkout_pb2.Refund:
        self.undone.append(charge)
        return checkout_pb2.Refund(refund_id="refund", charge_id=charge.charge_id if charge is not None else "")


class Shipping(ShippingParticipantBase):
    async def ship_order(
        self, conn: AsyncConnection, checkout: checkout_pb2.CheckoutInput, ctx: StepContext
    ) -> checkout_pb2.Shipment:
        if checkout.shipping_address == "nowhere":
            raise StepFailed("no such address")
        return checkout_pb2.Shipment(tracking_number=f"t-{checkout.order_id}")


class WrongInventory(Inventory):
    async def reserve_stock(  # type: ignore[override]  # the bug under test
        self, conn: AsyncConnection, checkout: checkout_pb2.CheckoutInput, ctx: StepContext
    ) -> checkout_pb2.Charge:
        return checkout_pb2.Charge(charge_id="not a reservation")


class WrongUndoInventory(Inventory):
    async def undo_reserve_stock(  # type: ignore[override]  # the bug under test
        self, conn: AsyncConnection, checkout: checkout_pb2.CheckoutInput, reservation: checkout_pb2.Reservation,
        ctx: StepContext,
    ) -> checkout_pb2.Refund:
        return checkout_pb2.Refund(refund_id="not a release")


def _input(order_id: str, card_token: str = "card-ok", address: str = "x") -> checkout_pb2.CheckoutInput:
    return checkout_pb2.CheckoutInput(
        order_id=order_id, sku="sku-1", quantity=1, amount_cents=500, card_token=card_token, shipping_address=address,
    )


def _checkout_definition() -> definition_pb2.SagaDefinition:
    return load_definition_file(DEFINITIONS_DIR / "checkout.yaml")


def _contract(service: str, proto: Path = CHECKOUT_CONTRACTS, *proto_path: Path) -> contract_pb2.ParticipantContract:
    return contract_pb2.ParticipantContract(
        service=service, types=compile_proto_files([proto], [PROTOS, *proto_path])
    )


CHECKOUT_SERVICES = {
    "inventory": "compensa.checkout.v1.InventoryParticipant",
    "payment": "compensa.checkout.v1.PaymentParticipant",
    "shipping": "compensa.checkout.v1.ShippingParticipant",
}


async def _set_contract(
    env: SagaTestEnvironment, name: str, contract: contract_pb2.ParticipantContract
) -> orchestrator_pb2.SetParticipantResponse:
    response: orchestrator_pb2.SetParticipantResponse = await env.client.stub.SetParticipant(
        orchestrator_pb2.SetParticipantRequest(
            name=name, address=env.participants[name].address, contract=contract, actor="test"
        )
    )
    return response


@pytest.fixture
async def typed_env() -> AsyncIterator[SagaTestEnvironment]:
    async with SagaTestEnvironment.start(
        participants={"inventory": Inventory, "payment": Payment, "shipping": Shipping}
    ) as env:
        for name, service in CHECKOUT_SERVICES.items():
            stored = await _set_contract(env, name, _contract(service))
            assert stored.participant.contract_service == service
        yield env


async def test_typed_participants_run_a_saga_and_its_compensation(typed_env: SagaTestEnvironment) -> None:
    await typed_env.register(_checkout_definition())
    run = await CheckoutSaga(typed_env.client).execute(_input("typed-1"))
    assert run.succeeded, run.saga
    reservation = run.reserve_stock()
    charge = run.charge_card()
    shipment = run.ship_order()
    assert reservation is not None and reservation.reservation_id == "r-typed-1"
    assert charge is not None and charge.charge_id == "c-for-r-typed-1"
    assert shipment is not None and shipment.tracking_number == "t-typed-1"

    declined = await CheckoutSaga(typed_env.client).execute(_input("typed-2", card_token="flagged-1"))
    assert declined.state == saga_pb2.SAGA_STATE_COMPENSATED, declined.saga
    assert declined.charge_card() is None


async def test_a_typed_long_running_step_reports_later(typed_env: SagaTestEnvironment) -> None:
    await typed_env.register(_checkout_definition())
    started = await CheckoutSaga(typed_env.client).start(_input("held-1", card_token="review-1"))
    payment = typed_env.participant("payment")
    assert isinstance(payment, Payment)
    await poll_until(lambda: payment.held, timeout=COMMAND_TIMEOUT_SECONDS)
    settled = checkout_pb2.Charge(charge_id="settled", amount_cents=500)
    await typed_env.client.complete_step(payment.held[0], output=settled)
    run = await CheckoutSaga(typed_env.client).result(started.saga_id)
    assert run.succeeded, run.saga
    assert run.charge_card() == settled


async def _held_payment(env: SagaTestEnvironment, count: int) -> Payment:
    payment = env.participant("payment")
    assert isinstance(payment, Payment)
    await poll_until(lambda: len(payment.held) >= count, timeout=COMMAND_TIMEOUT_SECONDS)
    return payment


async def _compensated_or_stuck(env: SagaTestEnvironment, saga_id: str) -> saga_pb2.Saga:
    """The saga once compensated, or once a compensation failed (retried forever otherwise)."""
    async def settled() -> saga_pb2.Saga | None:
        saga = await env.client.get(saga_id)
        stuck = any(
            step.state == saga_pb2.STEP_STATE_COMPENSATING and step.compensate_attempts for step in saga.steps
        )
        return saga if stuck or saga.state == saga_pb2.SAGA_STATE_COMPENSATED else None

    found: saga_pb2.Saga = await poll_until(settled, timeout=COMMAND_TIMEOUT_SECONDS)
    return found


async def test_a_long_running_step_pending_with_no_output_is_undone_with_none(
    typed_env: SagaTestEnvironment,
) -> None:
    await typed_env.register(_checkout_definition())
    started = await CheckoutSaga(typed_env.client).start(_input("later-1", card_token="later-1"))
    payment = await _held_payment(typed_env, 1)
    await typed_env.client.cancel(started.saga_id, reason="changed my mind")
    saga = await _compensated_or_stuck(typed_env, started.saga_id)
    assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED, [(step.name, step.last_error) for step in saga.steps]
    assert payment.undone == [None]


async def test_a_long_running_step_pending_with_no_output_is_undone_with_the_output_it_completed_with(
    typed_env: SagaTestEnvironment,
) -> None:
    await typed_env.register(_checkout_definition())
    started = await CheckoutSaga(typed_env.client).start(_input("later-2", card_token="later-2", address="nowhere"))
    payment = await _held_payment(typed_env, 1)
    settled = checkout_pb2.Charge(charge_id="settled-later", amount_cents=500)
    await typed_env.client.complete_step(payment.held[0], output=settled)
    saga = await _compensated_or_stuck(typed_env, started.saga_id)
    # ship_order failed
    assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED, [(step.name, step.last_error) for step in saga.steps]
    assert payment.undone == [settled]


async def test_a_step_returning_the_wrong_type_is_reported_by_name() -> None:
    async with SagaTestEnvironment.start(
        participants={"inventory": WrongInventory, "payment": Payment, "shipping": Shipping},
        definitions=[_checkout_definition()],
    ) as env:
        run = await CheckoutSaga(env.client).execute(_input("wrong-1"))
    assert run.state == saga_pb2.SAGA_STATE_COMPENSATED
    step = next(step for step in run.saga.steps if step.name == "reserve_stock")
    assert (
        "step 'reserve_stock' (WrongInventory.reserve_stock) returned a compensa.checkout.v1.Charge;"
        " its contract compensa.checkout.v1.InventoryParticipant says compensa.checkout.v1.Reservation"
    ) in step.last_error, step.last_error


async def test_an_undo_returning_the_wrong_type_is_reported_by_name() -> None:
    async with SagaTestEnvironment.start(
        participants={"inventory": WrongUndoInventory, "payment": Payment, "shipping": Shipping},
        definitions=[_checkout_definition()],
    ) as env:
        started = await CheckoutSaga(env.client).start(_input("wrong-undo-1", card_token="flagged-1"))

        async def undo_failed() -> saga_pb2.Step | None:
            saga = await env.client.get(started.saga_id)
            step = next(step for step in saga.steps if step.name == "reserve_stock")
            return step if step.compensate_attempts else None

        step = await poll_until(undo_failed, timeout=COMMAND_TIMEOUT_SECONDS)
    assert (
        "step 'reserve_stock' (WrongUndoInventory.undo_reserve_stock) returned a compensa.checkout.v1.Refund;"
        " its contract compensa.checkout.v1.InventoryParticipant says compensa.checkout.v1.Release"
    ) in step.last_error, step.last_error


async def test_a_call_the_contract_does_not_fit_is_refused_by_the_participant(
    typed_env: SagaTestEnvironment,
) -> None:
    # Calls an orchestrator sends for a definition no contract was checked against.
    undeclared = StepCall.new("ship_parcel")
    async with grpc.aio.insecure_channel(typed_env.participants["inventory"].address) as channel:
        inventory = participant_pb2_grpc.ParticipantServiceStub(channel)
        code, details = await status_of(inventory.Execute(undeclared.execute()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == (
        "step 'ship_parcel' is not in the contract compensa.checkout.v1.InventoryParticipant (its steps:"
        " reserve_stock); check the definition's step names and participants"
    )
    without_reservation = StepCall.new("charge_card")
    charge = StepCall.new("charge_card")
    with_reservation = charge.execute()
    with_reservation.step_outputs["reserve_stock"].Pack(checkout_pb2.Reservation(reservation_id="r-1"))
    async with grpc.aio.insecure_channel(typed_env.participants["payment"].address) as channel:
        payment = participant_pb2_grpc.ParticipantServiceStub(channel)
        code, details = await status_of(payment.Execute(without_reservation.execute()))
        charged = await payment.Execute(with_reservation)
        undo_code, undo_details = await status_of(payment.Compensate(charge.compensate(execute_output=charged.output)))
    missing = (
        "step 'charge_card' needs the output of step 'reserve_stock' (contract"
        " compensa.checkout.v1.PaymentParticipant), and the call has none: in the definition, 'charge_card' must"
        " depend on 'reserve_stock'"
    )
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, missing)
    assert (undo_code, undo_details) == (grpc.StatusCode.FAILED_PRECONDITION, missing)


# --- definitions checked against stored contracts ----------------------------------


async def _refused_registration(env: SagaTestEnvironment, definition: definition_pb2.SagaDefinition) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.register(definition)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    return refused.value.details() or ""


def _step(definition: definition_pb2.SagaDefinition, name: str) -> definition_pb2.StepDefinition:
    return next(step for step in definition.steps if step.name == name)


async def test_a_step_the_contract_does_not_declare_is_refused(typed_env: SagaTestEnvironment) -> None:
    definition = _checkout_definition()
    _step(definition, "ship_order").name = "ship_parcel"
    details = await _refused_registration(typed_env, definition)
    assert (
        "definition 'checkout' step 'ship_parcel': participant 'shipping' (compensa.checkout.v1.ShippingParticipant)"
        " has no step 'ship_parcel'; its steps are 'ship_order'"
    ) in details


async def test_another_input_type_is_refused(typed_env: SagaTestEnvironment) -> None:
    definition = _checkout_definition()
    definition.input_type = "compensa.checkout.v1.Reservation"
    details = await _refused_registration(typed_env, definition)
    assert (
        "definition 'checkout' step 'reserve_stock': participant 'inventory'"
        " (compensa.checkout.v1.InventoryParticipant) accepts a saga input of type compensa.checkout.v1.CheckoutInput;"
        " the definition's input_type is"
        " compensa.checkout.v1.Reservation"
    ) in details


async def test_another_kind_is_refused(typed_env: SagaTestEnvironment) -> None:
    definition = _checkout_definition()
    _step(definition, "ship_order").kind = definition_pb2.STEP_KIND_COMPENSABLE
    # A compensable last step: no pivot any more, which the pivot rule allows.
    details = await _refused_registration(typed_env, definition)
    assert (
        "definition 'checkout' step 'ship_order': participant 'shipping' (compensa.checkout.v1.ShippingParticipant)"
        " is pivot in the contract; the definition says compensable"
    ) in details


async def test_a_needed_output_the_step_does_not_depend_on_is_refused(typed_env: SagaTestEnvironment) -> None:
    definition = _checkout_definition()
    charge = _step(definition, "charge_card")
    charge.independent = True
    del charge.depends_on[:]
    # The pivot still comes after every other step.
    _step(definition, "ship_order").depends_on[:] = ["reserve_stock", "charge_card"]
    details = await _refused_registration(typed_env, definition)
    assert (
        "definition 'checkout' step 'charge_card': participant 'payment' (compensa.checkout.v1.PaymentParticipant)"
        " needs the output of step 'reserve_stock' (a compensa.checkout.v1.Reservation), and the definition does"
        " not make it depend on 'reserve_stock'"
    ) in details


async def test_a_long_running_contract_step_needs_a_long_running_definition_step(
    typed_env: SagaTestEnvironment,
) -> None:
    definition = _checkout_definition()
    _step(definition, "charge_card").long_running = False
    details = await _refused_registration(typed_env, definition)
    assert (
        "definition 'checkout' step 'charge_card': participant 'payment' (compensa.checkout.v1.PaymentParticipant)"
        " is long-running in the contract (it may answer Pending); the definition's step must say long_running: true"
    ) in details


OTHER_INVENTORY = """
syntax = "proto3";
package other.v1;
import "compensa/checkout/v1/checkout.proto";
import "compensa/v1/contract.proto";
service OtherInventory {
  rpc ReserveStock(compensa.checkout.v1.CheckoutInput) returns (compensa.checkout.v1.Shipment) {
    option (compensa.v1.step) = {kind: STEP_KIND_COMPENSABLE};
  }
}
"""


async def test_a_contract_change_that_breaks_a_registered_definition_is_refused(
    typed_env: SagaTestEnvironment, tmp_path: Path
) -> None:
    await typed_env.register(_checkout_definition())
    # reserve_stock would output a Shipment, where charge_card needs a Reservation.
    (tmp_path / "other.proto").write_text(OTHER_INVENTORY)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _set_contract(typed_env, "inventory", _contract("other.v1.OtherInventory", tmp_path / "other.proto"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        "definition 'checkout' step 'charge_card': participant 'payment' (compensa.checkout.v1.PaymentParticipant)"
        " needs a compensa.checkout.v1.Reservation from step 'reserve_stock', whose contract says it outputs a"
        " compensa.checkout.v1.Shipment"
    ) in (refused.value.details() or "")
    assert "; to store the contract anyway, breaking them, set it with --force" in (refused.value.details() or "")
    listed: orchestrator_pb2.ListParticipantsResponse = await typed_env.client.stub.ListParticipants(
        orchestrator_pb2.ListParticipantsRequest()
    )
    kept = {participant.name: participant.contract_service for participant in listed.participants}
    assert kept["inventory"] == CHECKOUT_SERVICES["inventory"], "a refused contract changes nothing"

    # Forced from the CLI, as an operator does it: stored.
    forced = await _compensa_command(
        "--address", typed_env.address, "participants", "set", "inventory", typed_env.participants["inventory"].address,
        "--proto", str(tmp_path / "other.proto"), "--proto-path", str(PROTOS), "--force", "--actor", "night shift",
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip().endswith("(contract other.v1.OtherInventory)"), forced.stdout


async def test_participants_without_a_contract_are_not_checked() -> None:
    async with SagaTestEnvironment.start(
        participants={"inventory": Inventory, "payment": Payment, "shipping": Shipping},
    ) as env:
        definition = _checkout_definition()
        _step(definition, "ship_order").name = "ship_parcel"
        registered = await env.register(definition)
        assert registered.version == 1


async def test_a_cleared_contract_is_no_longer_checked(typed_env: SagaTestEnvironment) -> None:
    cleared: orchestrator_pb2.SetParticipantResponse = await typed_env.client.stub.SetParticipant(
        orchestrator_pb2.SetParticipantRequest(
            name="shipping", address=typed_env.participants["shipping"].address, clear_contract=True
        )
    )
    assert cleared.participant.contract_service == ""
    definition = _checkout_definition()
    _step(definition, "ship_order").name = "ship_parcel"
    assert (await typed_env.register(definition)).version == 1



async def _forced_records(url: str) -> tuple[list[Any], list[Any], list[Any]]:
    """The participant change log, the alert log and the stored contracts."""
    store = open_store(url)
    assert isinstance(store, SqlSagaStore)
    try:
        async with store.engine.connect() as conn:
            changes = (await conn.execute(sa.select(participant_changes))).all()
            logged = (await conn.execute(sa.select(alerts))).all()
            contracts = (await conn.execute(sa.select(participant_contracts.c.name))).all()
    finally:
        await store.close()
    return list(changes), list(logged), list(contracts)


async def test_a_breaking_contract_is_stored_only_when_an_operator_forces_it_and_is_then_alerted(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    url = make_postgres_url()
    # The rig's definition "board" has the steps reserve, notify and charge on "scripted".
    async with dashboard_rig(tmp_path, make_postgres_url, database_url=url) as rig:
        address = rig.orchestrator.engine.client.address_of("scripted")
        breaking = orchestrator_pb2.SetParticipantRequest(
            name="scripted", address=address, contract=_contract(CHECKOUT_SERVICES["inventory"]), force=True,
            actor="incident 42",
        )
        denied = await _refusal(rig.stub.SetParticipant(breaking, metadata=bearer("starter")))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (denied.details() or "").startswith("SetParticipant needs role operator"), denied.details()

        unforced = orchestrator_pb2.SetParticipantRequest()
        unforced.CopyFrom(breaking)
        unforced.force = False
        refused = await _refusal(rig.stub.SetParticipant(unforced, metadata=bearer("operator")))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "definition 'board' step 'reserve': participant 'scripted' (compensa.checkout.v1.InventoryParticipant)"
            " has no step 'reserve'; its steps are 'reserve_stock'"
        ) in (refused.details() or "")
        assert (refused.details() or "").endswith(
            "; to store the contract anyway, breaking them, set it with --force (SetParticipantRequest.force)"
        ), refused.details()

        without_contract = orchestrator_pb2.SetParticipantRequest(name="scripted", address=address, force=True)
        pointless = await _refusal(rig.stub.SetParticipant(without_contract, metadata=bearer("operator")))
        assert pointless.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "give contract or contract_from_reflection with it" in (pointless.details() or "")
        assert await _forced_records(url) == ([], [], []), "a refused change writes nothing"

        stored = await rig.stub.SetParticipant(breaking, metadata=bearer("operator"))
        assert stored.participant.contract_service == CHECKOUT_SERVICES["inventory"]
        watch = rig.stub.WatchAlerts(orchestrator_pb2.WatchAlertsRequest(), metadata=bearer("reader"))
        alert = (await watch.read()).alert
        watch.cancel()

    assert alert.kind == orchestrator_pb2.ALERT_KIND_PARTICIPANT_CONTRACT_FORCED
    assert (alert.participant, alert.address) == ("scripted", address)
    assert alert.message.startswith(
        "participant 'scripted': contract compensa.checkout.v1.InventoryParticipant stored by"
        ' token:alice as "incident 42" with force, though it breaks definition \'board\' (steps \'reserve\','
        " 'notify', 'charge'): definition 'board' step 'reserve': participant 'scripted'"
    ), alert.message
    assert "step 'charge': participant 'scripted' (compensa.checkout.v1.InventoryParticipant) has no step" in (
        alert.message
    )
    changes, logged, contracts = await _forced_records(url)
    assert [(row.participant, row.changed_by, row.change) for row in changes] == [
        ("scripted", 'token:alice as "incident 42"', alert.message)
    ]
    assert [(row.kind, row.message) for row in logged] == [("PARTICIPANT_CONTRACT_FORCED", alert.message)]
    assert [row.name for row in contracts] == ["scripted"]


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


# --- a contract read from the participant's server reflection ------------------------------


async def _reflect(
    env: SagaTestEnvironment, name: str, address: str = "", service: str = ""
) -> orchestrator_pb2.SetParticipantResponse:
    response: orchestrator_pb2.SetParticipantResponse = await env.client.stub.SetParticipant(
        orchestrator_pb2.SetParticipantRequest(
            name=name, address=address or env.participants[name].address, actor="test",
            contract_from_reflection=orchestrator_pb2.ContractFromReflection(service=service),
        )
    )
    return response


async def test_a_contract_is_read_from_the_participants_reflection() -> None:
    async with SagaTestEnvironment.start(
        participants={"inventory": Inventory, "payment": Payment, "shipping": Shipping}
    ) as env:
        # Through the API: the participant lists its own contract service only,
        # though its .proto file declares all three.
        for name in ("inventory", "payment"):
            stored = await _reflect(env, name)
            assert stored.participant.contract_service == CHECKOUT_SERVICES[name]
        # Through the CLI, as an operator sets it.
        ran = await _compensa_command(
            "--address", env.address, "participants", "set", "shipping", env.participants["shipping"].address,
            "--contract-from-reflection",
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip().endswith(f"(contract {CHECKOUT_SERVICES['shipping']})"), ran.stdout
        # The contracts read so are checked as those given with --proto.
        assert (await env.register(_checkout_definition())).version == 1
        definition = _checkout_definition()
        _step(definition, "ship_order").name = "ship_parcel"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await env.register(definition)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ship_parcel" in (refused.value.details() or "")


async def test_a_participant_with_no_contract_in_its_reflection_is_refused() -> None:
    from compensa.examples.shipping import ShippingParticipant

    async with SagaTestEnvironment.start(
        participants={"inventory": Inventory, "payment": Payment, "shipping": ShippingParticipant}
    ) as env:
        with pytest.raises(grpc.aio.AioRpcError) as untyped:
            await _reflect(env, "shipping")
        assert untyped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lists not one contract service through server reflection (contract services: none)" in (
            untyped.value.details() or ""
        ), untyped.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _reflect(env, "inventory", service="compensa.checkout.v1.PaymentParticipant")
        assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no contract service 'compensa.checkout.v1.PaymentParticipant'" in (unknown.value.details() or "")
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        with pytest.raises(grpc.aio.AioRpcError) as unreachable:
            await _reflect(env, "payment", address=f"127.0.0.1:{port}")
        assert unreachable.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "through server reflection: UNAVAILABLE" in (unreachable.value.details() or "")
        listed: orchestrator_pb2.ListParticipantsResponse = await env.client.stub.ListParticipants(
            orchestrator_pb2.ListParticipantsRequest()
        )
        kept = {entry.name: (entry.address, entry.contract_service) for entry in listed.participants}
        assert kept["payment"] == (env.participants["payment"].address, ""), "a refused change changes nothing"


# --- a contract check and the write it allows are one transaction ---------------------------


class _Refused(Exception):
    pass


_RACED = definition_pb2.SagaDefinition(
    name="raced", input_type="compensa.checkout.v1.CheckoutInput",
    steps=[definition_pb2.StepDefinition(name="reserve_stock", participant="inventory")],
)


@pytest.fixture
async def contract_store(make_postgres_url: Callable[[], str]) -> AsyncIterator[SagaStore]:
    """A PostgreSQL store where "inventory" has the contract b"old"."""
    store = open_store(make_postgres_url())
    await store.ensure_schema()
    await store.set_participant(
        "inventory", "127.0.0.1:1", updated_by="test", now=1.0, contract=ContractChange("inv.v1.Old", b"old")
    )
    try:
        yield store
    finally:
        await store.close()


async def _waits_or_ends(store: SagaStore, racing: asyncio.Task[Any]) -> None:
    """Until `racing` has ended or waits for a lock of this database's."""
    assert isinstance(store, SqlSagaStore)
    waiting = sa.text(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
    )

    async def waits() -> bool:
        async with store.engine.connect() as conn:
            return bool((await conn.execute(waiting)).scalar_one())

    await poll_until(lambda: racing.done() or waits())


async def test_a_contract_changed_while_a_definition_is_checked_is_checked_against_it(
    contract_store: SagaStore,
) -> None:
    async def refuse_any_definition(definitions: Sequence[definition_pb2.SagaDefinition], _: Any) -> None:
        if definitions:
            raise _Refused(f"the new contract breaks {[definition.name for definition in definitions]}")

    change: asyncio.Task[Any] | None = None

    async def check_definition(contracts: Mapping[str, bytes]) -> None:
        nonlocal change
        assert contracts == {"inventory": b"old"}
        # The operator changes the contract while the definition is being checked.
        change = asyncio.create_task(contract_store.set_participant(
            "inventory", "127.0.0.1:1", updated_by="test", now=2.0,
            contract=ContractChange("inv.v1.New", b"new", refuse_any_definition),
        ))
        await _waits_or_ends(contract_store, change)

    stored, created = await contract_store.register_definition(
        _RACED, definition_fingerprint(_RACED), 2.0, check=check_definition
    )
    assert created and stored.version == 1
    assert change is not None
    with pytest.raises(_Refused, match="breaks \\['raced'\\]"):
        await change  # checked against the definition just registered, not before it
    assert await contract_store.participant_contracts() == {"inventory": b"old"}


async def test_a_definition_registered_while_a_contract_is_checked_is_checked_against_it(
    contract_store: SagaStore,
) -> None:
    async def refuse_the_new_contract(contracts: Mapping[str, bytes]) -> None:
        if contracts.get("inventory") == b"new":
            raise _Refused("the definition does not fit the new contract")

    registration: asyncio.Task[Any] | None = None

    async def check_contract(definitions: Sequence[definition_pb2.SagaDefinition], _: Any) -> None:
        nonlocal registration
        assert not definitions
        # A definition is registered while the contract change is being checked.
        registration = asyncio.create_task(contract_store.register_definition(
            _RACED, definition_fingerprint(_RACED), 2.0, check=refuse_the_new_contract
        ))
        await _waits_or_ends(contract_store, registration)

    await contract_store.set_participant(
        "inventory", "127.0.0.1:1", updated_by="test", now=2.0,
        contract=ContractChange("inv.v1.New", b"new", check_contract),
    )
    assert registration is not None
    with pytest.raises(_Refused, match="does not fit the new contract"):
        await registration
    assert await contract_store.get_definition("raced") is None
    assert await contract_store.participant_contracts() == {"inventory": b"new"}


# --- a participant in Node.js on the generic wire, its contract stored and checked --------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _node_modules() -> tuple[str, Path]:
    """node, and the node_modules holding @grpc/grpc-js and @grpc/proto-loader
    (installed into NODE_MODULES_CACHE if they are not there yet). Without
    node or npm: a loud skip, or a failure under CI=true."""
    node, npm = shutil.which("node"), shutil.which("npm")
    modules = NODE_MODULES_CACHE / "node_modules"
    installed = all((modules / package.rpartition("@")[0]).is_dir() for package in NODE_PACKAGES)
    if node is None or (npm is None and not installed):
        verdict = "FAILS (CI=true)" if _in_ci() else "is SKIPPED (under CI=true it fails)"
        message = (
            f"Node.js 20+ and npm are not installed: the Node.js participant test {verdict};"
            " install them (apt-get install nodejs npm)"
        )
        if _in_ci():
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    if not installed:
        assert npm is not None
        result = subprocess.run(
            [npm, "install", "--prefix", str(NODE_MODULES_CACHE), "--no-audit", "--no-fund", *NODE_PACKAGES],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False,
        )
        assert result.returncode == 0, f"npm install failed:\n{result.stdout}{result.stderr}"
    return node, modules


async def _compensa_command(*arguments: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the orchestrator it talks to runs on this event loop.
    return await asyncio.to_thread(_run, [str(BIN / "compensa"), *arguments], ROOT)


async def test_a_node_participant_with_a_stored_contract_runs_beside_typed_ones() -> None:
    node, modules = _node_modules()
    async with SagaTestEnvironment.start(participants={"inventory": Inventory, "payment": Payment}) as env:
        for name in ("inventory", "payment"):
            await _set_contract(env, name, _contract(CHECKOUT_SERVICES[name]))
        shipping = await asyncio.create_subprocess_exec(
            node, str(NODE_PARTICIPANT), str(PROTOS), env={**os.environ, "NODE_PATH": str(modules)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert shipping.stdout is not None
            first_line = (await asyncio.wait_for(shipping.stdout.readline(), COMMAND_TIMEOUT_SECONDS)).decode()
            assert first_line.startswith("listening "), first_line
            address = f"127.0.0.1:{first_line.split()[1]}"
            stored = await _compensa_command(
                "--address", env.address, "participants", "set", "shipping", address,
                "--proto", str(CHECKOUT_CONTRACTS), "--proto-path", str(PROTOS),
                "--service", CHECKOUT_SERVICES["shipping"],
            )
            assert stored.returncode == 0, stored.stderr
            assert f"shipping -> {address} (contract {CHECKOUT_SERVICES['shipping']})" in stored.stdout

            # The Node participant's contract is checked as a Python one's.
            mismatched = _checkout_definition()
            _step(mismatched, "ship_order").kind = definition_pb2.STEP_KIND_COMPENSABLE
            details = await _refused_registration(env, mismatched)
            assert "step 'ship_order': participant 'shipping' (compensa.checkout.v1.ShippingParticipant) is pivot" in (
                details
            )

            await env.register(_checkout_definition())
            run = await CheckoutSaga(env.client).execute(_input("node-1"))
            assert run.succeeded, run.saga
            shipment = run.ship_order()
            assert shipment is not None and shipment.tracking_number == "node-node-1"
        finally:
            shipping.terminate()
            await shipping.wait()


async def test_a_contract_that_is_not_one_is_refused_and_changes_nothing(typed_env: SagaTestEnvironment) -> None:
    no_service = _contract("", PROTOS / "compensa" / "checkout" / "v1" / "checkout.proto")
    broken = _contract(CHECKOUT_SERVICES["shipping"])
    del broken.types.file[:-1]  # its imports gone: the types its options name are unknown
    for contract, expected in (
        (no_service, "participant 'shipping': the contract's files declare not one contract service"),
        (contract_pb2.ParticipantContract(), "participant 'shipping': the contract has no files"),
        (broken, "undo_output 'compensa.checkout.v1.Release' is not a message declared in the contract's file"),
        (_contract("compensa.checkout.v1.Nope"), "declare no contract service 'compensa.checkout.v1.Nope'"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _set_contract(typed_env, "shipping", contract)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert expected in (refused.value.details() or "")
    listed: orchestrator_pb2.ListParticipantsResponse = await typed_env.client.stub.ListParticipants(
        orchestrator_pb2.ListParticipantsRequest()
    )
    kept = {participant.name: participant.contract_service for participant in listed.participants}
    assert kept["shipping"] == CHECKOUT_SERVICES["shipping"]

