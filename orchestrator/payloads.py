"""Payload types: resolving `google.protobuf.Any` type names to message classes.

The orchestrator stores and forwards payloads without decoding them; it only
needs the message classes to validate a saga input against its definition and
to turn the CLI's JSON into a typed message.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from google.protobuf import any_pb2, descriptor_pool, json_format, message, message_factory

from orchestrator.errors import InvalidArgument, quote

#: Proto modules imported by default so their types resolve.
DEFAULT_PROTO_MODULES: tuple[str, ...] = ("compensa.checkout.v1.checkout_pb2",)

TYPE_URL_PREFIX = "type.googleapis.com/"


def import_proto_modules(modules: Iterable[str]) -> None:
    """Imports generated `_pb2` modules so their message types resolve."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise InvalidArgument(f"proto module {module!r} cannot be imported: {error}") from error


def message_class(full_name: str) -> type[message.Message]:
    """The generated class of the message named `full_name` (e.g. "pkg.v1.Order")."""
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        raise InvalidArgument(
            f"message type {quote(full_name)} is unknown: import its _pb2 module (--proto-module)"
        ) from None
    return message_factory.GetMessageClass(descriptor)


def type_name_of(payload: any_pb2.Any) -> str:
    """The full message name an Any holds ("" for an empty Any)."""
    return payload.type_url.rpartition("/")[2]


def pack_json(full_name: str, json_text: str) -> any_pb2.Any:
    """Parses proto3 JSON into the message `full_name` and packs it in an Any."""
    cls = message_class(full_name)
    try:
        parsed = json_format.Parse(json_text, cls())
    except json_format.ParseError as error:
        raise InvalidArgument(f"input is not a valid {full_name} in JSON: {error}") from error
    packed = any_pb2.Any()
    packed.Pack(parsed)
    return packed


def unpack(payload: any_pb2.Any, field: str) -> message.Message:
    """Decodes an Any into its message; InvalidArgument naming `field` if its bytes are malformed."""
    cls = message_class(type_name_of(payload))
    decoded = cls()
    try:
        decoded.ParseFromString(payload.value)
    except message.DecodeError as error:
        raise InvalidArgument(
            f"{field}: payload of type {quote(type_name_of(payload))} cannot be decoded: {error}"
        ) from None
    return decoded
