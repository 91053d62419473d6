"""Payloads as JSON, as the CLI (--json) and the dashboard show them: a
well-known type (wrappers, Timestamp, Duration, Struct, an Any inside an Any)
as protobuf's JSON mapping prints it, also when the definition registered
types of its own that do not import it; 64-bit integers as JSON numbers."""

from __future__ import annotations

import json

import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    duration_pb2,
    json_format,
    message,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)

from compensa.orchestrator.dashboard.app import _payload_json
from compensa.orchestrator.shared import payloads
from compensa.v1 import saga_pb2

F = descriptor_pb2.FieldDescriptorProto


def _registered_types() -> descriptor_pb2.FileDescriptorSet:
    """What `register --proto trip.proto` registers for a file that imports nothing."""
    trip = descriptor_pb2.DescriptorProto(name="Trip", field=[
        F(name="traveler", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL),
        F(name="nights", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL),
    ])
    file = descriptor_pb2.FileDescriptorProto(name="trip.proto", package="travel.v1", syntax="proto3",
                                              message_type=[trip])
    return descriptor_pb2.FileDescriptorSet(file=[file])


def _packed(held: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(held)
    return packed


struct = struct_pb2.Struct()
struct.update({"rooms": 2, "names": ["Ada", "Grace"], "breakfast": True})

WELL_KNOWN: dict[str, message.Message] = {
    "StringValue": wrappers_pb2.StringValue(value="book_hotel-1f2e"),
    "Int64Value": wrappers_pb2.Int64Value(value=7),
    "BoolValue": wrappers_pb2.BoolValue(value=True),
    "Timestamp": timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5_000_000),
    "Duration": duration_pb2.Duration(seconds=90),
    "Struct": struct,
    "Any inside Any": _packed(wrappers_pb2.StringValue(value="inner")),
}


@pytest.mark.parametrize("name", WELL_KNOWN)
def test_a_well_known_type_prints_as_protobufs_json_mapping(name: str) -> None:
    payload = _packed(WELL_KNOWN[name])
    expected = json_format.MessageToDict(payload)  # the default pool knows every well-known type
    pool = payloads.build_pool(_registered_types())
    shown = payloads.to_json_dict(payload, pool)
    assert shown == expected
    assert "ChNib29r" not in json.dumps(shown)  # never base64 of the serialized message
    # The dashboard shows the same.
    assert json.loads(_payload_json(payload, pool)) == expected


def test_a_registered_type_beside_them_still_decodes_with_64_bit_integers_as_numbers() -> None:
    pool = payloads.build_pool(_registered_types())
    trip_class = payloads.message_class("travel.v1.Trip", pool)
    payload = _packed(trip_class(traveler="Ada", nights=3))
    assert payloads.to_json_dict(payload, pool) == {
        "@type": "type.googleapis.com/travel.v1.Trip", "traveler": "Ada", "nights": 3,
    }


def test_a_saga_shows_its_64_bit_integers_as_numbers_and_its_payloads_decoded() -> None:
    saga = saga_pb2.Saga(saga_id="trip-2", sequence=12)
    saga.input.Pack(wrappers_pb2.StringValue(value="Atlantis"))
    step = saga.steps.add(name="book_hotel")
    step.output.Pack(_packed(timestamp_pb2.Timestamp(seconds=5)))
    shown = payloads.saga_json_dict(saga, payloads.build_pool(_registered_types()))
    assert shown["sequence"] == 12
    assert shown["input"] == {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "Atlantis"}
    assert shown["steps"][0]["output"]["value"] == {
        "@type": "type.googleapis.com/google.protobuf.Timestamp", "value": "1970-01-01T00:00:05Z",
    }
