"""A team's own saga on a running deployment: its own protobuf types, its own
participants, no restart and no generated module on any replica.

Two replicas share one PostgreSQL. The test process never imports the
team's types: the CLI compiles the .proto file, the definition carries the
descriptors, and every replica checks inputs and shows payloads from them.
"""

from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from harness import poll_until
from recording_participant import RecordingParticipant
from test_cli import _compensa_async

from compensa.examples.server import create_participant_engine, start_server
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc

TRIP_PROTO = """
syntax = "proto3";
package travel.v1;
import "google/protobuf/timestamp.proto";
import "travel/v1/money.proto";

message TripInput {
  string destination = 1;
  int32 nights = 2;
  google.protobuf.Timestamp departs = 3;
  Money budget = 4;
}
"""
MONEY_PROTO = """
syntax = "proto3";
package travel.v1;
message Money { string currency = 1; int64 units = 2; }
"""
TRIP_DEFINITION = """
name: trip
description: Book a hotel, then a flight.
input_type: travel.v1.TripInput
steps:
  - name: book_hotel
    participant: hotels
    retry: {max_attempts: 2, initial_backoff: 50ms, max_backoff: 100ms}
  - name: book_flight
    participant: flights
    retry: {max_attempts: 2, initial_backoff: 50ms, max_backoff: 100ms}
"""
TRIP_INPUT = '{"destination": "Lisbon", "nights": 3, "departs": "2027-01-01T10:00:00Z",' \
             ' "budget": {"currency": "EUR", "units": "900"}}'


@dataclass
class Deployment:
    replicas: list[RunningOrchestrator]
    recorders: dict[str, RecordingParticipant]
    addresses: dict[str, str]
    files: Path

    def address(self, replica: int) -> str:
        return self.replicas[replica].address


@pytest.fixture
async def deployment(make_postgres_url: Callable[[], str], tmp_path: Path) -> AsyncIterator[Deployment]:
    """Two replicas that know nothing of trips, and two participants (hotels,
    flights, plus a second hotels service to move to) that no replica was
    told about."""
    (tmp_path / "travel" / "v1").mkdir(parents=True)
    (tmp_path / "travel" / "v1" / "trip.proto").write_text(TRIP_PROTO)
    (tmp_path / "travel" / "v1" / "money.proto").write_text(MONEY_PROTO)
    (tmp_path / "trip.yaml").write_text(TRIP_DEFINITION)
    async with contextlib.AsyncExitStack() as stack:
        recorders: dict[str, RecordingParticipant] = {}
        addresses: dict[str, str] = {}
        for name in ("hotels", "flights", "hotels-new"):
            recorder = RecordingParticipant(create_participant_engine(make_postgres_url()))
            served = await start_server(recorder)
            stack.push_async_callback(served.stop, 0)
            recorders[name], addresses[name] = recorder, served.address
        url = make_postgres_url()
        replicas = []
        for _ in range(2):
            replica = await start_orchestrator(ServerConfig(listen="127.0.0.1:0", database_url=url))
            stack.push_async_callback(replica.stop, 0)
            replicas.append(replica)
        yield Deployment(replicas, recorders, addresses, tmp_path)


async def test_a_new_saga_type_and_its_participants_reach_two_running_replicas(deployment: Deployment) -> None:
    files = deployment.files
    register = ("register", str(files / "trip.yaml"), "--proto", str(files / "travel" / "v1" / "trip.proto"),
                "--proto-path", str(files))

    # Participants nobody gave an address: refused before anything is stored.
    refused = await _compensa_async(*register, "--address", deployment.address(0))
    assert refused.returncode == 2, refused.stderr
    assert "FAILED_PRECONDITION" in refused.stderr and "'hotels', 'flights'" in refused.stderr
    assert "compensa participants set" in refused.stderr
    assert "Traceback" not in refused.stderr

    # Addresses are data: set through one replica, stored for both.
    for name in ("hotels", "flights"):
        done = await _compensa_async("participants", "set", name, deployment.addresses[name],
                                     "--address", deployment.address(1))
        assert done.returncode == 0, done.stderr
    listed = await _compensa_async("participants", "--json", "--address", deployment.address(0))
    assert {json.loads(line)["name"]: json.loads(line)["address"] for line in listed.stdout.splitlines()} == {
        "hotels": deployment.addresses["hotels"], "flights": deployment.addresses["flights"],
    }

    registered = await _compensa_async(*register, "--address", deployment.address(0))
    assert registered.returncode == 0, registered.stderr
    assert "trip version 1: registered" in registered.stdout

    # Started on the other replica, from JSON the CLI turns into the registered type.
    started = await _compensa_async("start", "trip", "--saga-id", "trip-1", "--input", TRIP_INPUT, "--wait",
                                    "--address", deployment.address(1))
    assert started.returncode == 0, started.stdout + started.stderr
    calls = await deployment.recorders["hotels"].calls("trip-1")
    assert [(call.step_name, call.outcome) for call in calls] == [("book_hotel", "succeeded")]
    assert [call.step_name for call in await deployment.recorders["flights"].calls("trip-1")] == ["book_flight"]

    # Every --json output decodes the input, on either replica.
    for replica in (0, 1):
        shown = await _compensa_async("get", "trip-1", "--json", "--address", deployment.address(replica))
        assert shown.returncode == 0, shown.stderr
        saga = json.loads(shown.stdout)
        assert saga["state"] == "SAGA_STATE_SUCCEEDED"
        assert saga["input"] == {
            "@type": "type.googleapis.com/travel.v1.TripInput", "destination": "Lisbon", "nights": 3,
            "departs": "2027-01-01T10:00:00Z", "budget": {"currency": "EUR", "units": 900},
        }
        listed = await _compensa_async("list", "--json", "--address", deployment.address(replica))
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout.splitlines()[0])["input"]["destination"] == "Lisbon"

    # An input of the wrong shape is refused by the server from the registered types.
    async with grpc.aio.insecure_channel(deployment.address(0)) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        definition = (await stub.GetDefinition(orchestrator_pb2.GetDefinitionRequest(name="trip"))).definition
        assert [file.name for file in definition.types.file] == [
            "google/protobuf/timestamp.proto", "travel/v1/money.proto", "travel/v1/trip.proto",
        ]
        bad = orchestrator_pb2.StartSagaRequest(saga_id="trip-bad", definition_name="trip")
        bad.input.type_url = "type.googleapis.com/travel.v1.TripInput"
        bad.input.value = b"\x0a\xff"  # a string field that runs off the end
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.StartSaga(bad)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input" in (error.value.details() or "")
    # Nothing here (the servers' process) ever had the type as a module.
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("travel.v1.TripInput")
    assert not any(module.startswith("travel") for module in sys.modules)


async def test_a_changed_address_is_called_by_every_replica_without_a_restart(deployment: Deployment) -> None:
    for name in ("hotels", "flights"):
        assert (await _compensa_async("participants", "set", name, deployment.addresses[name],
                                      "--address", deployment.address(0))).returncode == 0
    files = deployment.files
    assert (await _compensa_async("register", str(files / "trip.yaml"), "--proto",
                                  str(files / "travel" / "v1" / "trip.proto"), "--proto-path", str(files),
                                  "--address", deployment.address(0))).returncode == 0

    moved = await _compensa_async("participants", "set", "hotels", deployment.addresses["hotels-new"],
                                  "--address", deployment.address(0))
    assert moved.returncode == 0, moved.stderr
    attempts = iter(range(1000))
    for replica in (0, 1):

        async def booked_at_the_new_hotel(replica: int = replica) -> bool:
            # A replica reads stored addresses every second; a saga started
            # before that may still go to the old one, so start until one lands.
            saga_id = f"trip-moved-{replica}-{next(attempts)}"
            started = await _compensa_async("start", "trip", "--saga-id", saga_id, "--input", TRIP_INPUT,
                                            "--wait", "--address", deployment.address(replica))
            assert started.returncode == 0, started.stderr
            return bool(await deployment.recorders["hotels-new"].calls(saga_id))

        await poll_until(booked_at_the_new_hotel, timeout=10)


async def test_serve_refuses_a_definition_whose_participant_has_no_address(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text(textwrap.dedent("""
        name: typo
        input_type: compensa.checkout.v1.CheckoutInput
        steps:
          - {name: charge, participant: paymnt}
    """))
    result = await _compensa_async("serve", "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path}/c.db",
                                   "--definitions", str(tmp_path / "typo.yaml"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'paymnt'" in last and "participants set" in last, result.stderr
    assert "Traceback" not in result.stderr
