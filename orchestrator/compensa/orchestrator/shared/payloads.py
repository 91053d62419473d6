"""Payload types: resolving `google.protobuf.Any` type names to message classes.

The orchestrator stores and forwards payloads without decoding them; it only
needs the message types to validate a saga input against its definition and
to turn JSON into a typed message and back. A definition may carry its own
types (a FileDescriptorSet registered with it): they are looked up in a pool
built from that set. Otherwise the types come from imported _pb2 modules.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import importlib
import re
from collections.abc import Iterable
from typing import Any

from google.protobuf import (
    any_pb2,
    descriptor,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    json_format,
    message,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)

from compensa.orchestrator.shared.errors import InvalidArgument, quote
from compensa.v1 import definition_pb2, saga_pb2

#: The well-known types, which every pool here knows (imported, they are in the default pool too).
_WELL_KNOWN_FILES = tuple(
    module.DESCRIPTOR
    for module in (any_pb2, duration_pb2, empty_pb2, field_mask_pb2, struct_pb2, timestamp_pb2, wrappers_pb2)
)

#: Proto modules imported by default so their types resolve.
DEFAULT_PROTO_MODULES: tuple[str, ...] = ("compensa.checkout.v1.checkout_pb2",)


def import_proto_modules(modules: Iterable[str]) -> None:
    """Imports generated `_pb2` modules so their message types resolve."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise InvalidArgument(f"proto module {module!r} cannot be imported: {error}") from error


def message_class(full_name: str, pool: descriptor_pool.DescriptorPool | None = None) -> type[message.Message]:
    """The class of the message named `full_name` (e.g. "pkg.v1.Order"), from
    `pool` (a definition's registered types) or else the imported modules."""
    try:
        descriptor = (pool or descriptor_pool.Default()).FindMessageTypeByName(full_name)
    except KeyError:
        raise InvalidArgument(
            f"message type {quote(full_name)} is unknown: register the definition with the .proto file that declares"
            " it (compensa register --proto FILE), or import its _pb2 module on the server (--proto-module)"
        ) from None
    return message_factory.GetMessageClass(descriptor)


def type_name_of(payload: any_pb2.Any) -> str:
    """The full message name an Any holds ("" for an empty Any)."""
    return payload.type_url.rpartition("/")[2]


def pack_json(full_name: str, json_text: str, pool: descriptor_pool.DescriptorPool | None = None) -> any_pb2.Any:
    """Parses proto3 JSON into the message `full_name` and packs it in an Any."""
    cls = message_class(full_name, pool)
    try:
        parsed = json_format.Parse(json_text, cls(), descriptor_pool=pool)
    except json_format.ParseError as error:
        raise InvalidArgument(f"input is not a valid {full_name} in JSON: {_parse_problem(error, pool)}") from None
    packed = any_pb2.Any()
    packed.Pack(parsed)
    return packed


_UNKNOWN_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "([^"]*)" at "([^"]*)"')


def _parse_problem(error: json_format.ParseError, pool: descriptor_pool.DescriptorPool | None) -> str:
    """json_format's complaint in one line; an unknown field is named with its
    message's fields (the .proto's names) and the one closest to it."""
    text = str(error)
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown is None:
        return " ".join(text.split())
    type_name, given, where = unknown.groups()
    try:
        fields = [known.name for known in (pool or descriptor_pool.Default()).FindMessageTypeByName(type_name).fields]
    except KeyError:
        fields = []
    close = difflib.get_close_matches(given, fields, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = f" (its fields: {', '.join(fields)})" if fields else ""
    return f"{where} has no field {quote(given)}{hint}{listed}"


def unpack(
    payload: any_pb2.Any, pool: descriptor_pool.DescriptorPool | None = None, *, field: str
) -> message.Message:
    """Decodes an Any into its message; InvalidArgument naming `field` if its bytes are malformed."""
    cls = message_class(type_name_of(payload), pool)
    decoded = cls()
    try:
        decoded.ParseFromString(payload.value)
    except message.DecodeError as error:
        raise InvalidArgument(
            f"{field}: payload of type {quote(type_name_of(payload))} cannot be decoded: {error}"
        ) from None
    return decoded


def pool_of(definition: definition_pb2.SagaDefinition) -> descriptor_pool.DescriptorPool:
    """The types a definition was registered with, or the imported modules'
    when it carries none. Pools are built once per distinct set of types."""
    if not definition.types.file:
        return descriptor_pool.Default()
    key = hashlib.sha256(definition.types.SerializeToString(deterministic=True)).digest()
    pool = _pools.get(key)
    if pool is None:
        pool = build_pool(definition.types)
        if len(_pools) >= _MAX_POOLS:
            _pools.pop(next(iter(_pools)))
        _pools[key] = pool
    return pool


_pools: dict[bytes, descriptor_pool.DescriptorPool] = {}
_MAX_POOLS = 256


def build_pool(types: descriptor_pb2.FileDescriptorSet) -> descriptor_pool.DescriptorPool:
    """A pool of the files in `types`; an import missing from the set is taken
    from the imported modules (e.g. the well-known types). InvalidArgument
    if the files do not form a complete, consistent schema."""
    pool = descriptor_pool.DescriptorPool()
    pending = {file.name: file for file in types.file}
    added: set[str] = set()
    known = descriptor_pool.Default()
    while pending:
        progress = False
        for name, file in list(pending.items()):
            missing = [dependency for dependency in file.dependency if dependency not in added]
            for dependency in missing:
                if dependency in pending:
                    continue
                try:
                    found = known.FindFileByName(dependency)
                except KeyError:
                    raise InvalidArgument(
                        f"types: {name} imports {dependency}, which is neither in the set nor a type the server"
                        " knows: include it (protoc --include_imports)"
                    ) from None
                _add_with_imports(pool, found, added)
            if all(dependency in added for dependency in file.dependency):
                try:
                    pool.Add(file)
                except (TypeError, ValueError) as error:
                    raise InvalidArgument(f"types: {name} is not a valid file descriptor: {error}") from None
                added.add(name)
                del pending[name]
                progress = True
        if not progress:
            raise InvalidArgument(f"types: the imports of {', '.join(sorted(pending))} form a cycle")
    # A payload may be a well-known type no registered file imports (a step
    # that returns a StringValue): JSON shows it as protobuf's mapping does.
    for well_known in _WELL_KNOWN_FILES:
        if well_known.name not in added:
            _add_with_imports(pool, well_known, added)
    return pool


def _add_with_imports(
    pool: descriptor_pool.DescriptorPool, file: descriptor.FileDescriptor, added: set[str]
) -> None:
    """Adds a file the server knows to `pool`, after its own imports."""
    for dependency in file.dependencies:
        if dependency.name not in added:
            _add_with_imports(pool, dependency, added)
    imported = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(imported)
    pool.Add(imported)
    added.add(file.name)


_INT64_TYPES = frozenset({
    descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
})
#: Messages whose JSON is not an object of their fields (or holds no int64 field to turn).
_SPECIAL_JSON = frozenset(
    f"{file.package}.{name}" for file in _WELL_KNOWN_FILES for name in file.message_types_by_name
)


def int64_as_numbers(
    shown: dict[str, Any], message_type: descriptor.Descriptor, pool: descriptor_pool.DescriptorPool | None = None
) -> dict[str, Any]:
    """`shown` (the JSON mapping of a `message_type`, with the proto's field
    names) with its 64-bit integers as JSON numbers instead of strings, for
    people and tools such as jq; in place, and returned. Payloads in Anys
    are turned too when `pool` (or the default pool) knows their type."""
    for field in message_type.fields:
        if field.name not in shown:
            continue
        value = shown[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            shown[field.name] = {key: _turned(item, value_field, pool) for key, item in value.items()}
        elif field.is_repeated:
            shown[field.name] = [_turned(item, field, pool) for item in value]
        else:
            shown[field.name] = _turned(value, field, pool)
    return shown


def _turned(value: Any, field: descriptor.FieldDescriptor, pool: descriptor_pool.DescriptorPool | None) -> Any:
    if field.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    if field.message_type is None or not isinstance(value, dict):
        return value
    if field.message_type.full_name == "google.protobuf.Any":
        return _any_as_numbers(value, pool)
    if field.message_type.full_name in _SPECIAL_JSON:
        return value
    return int64_as_numbers(value, field.message_type, pool)


def _any_as_numbers(shown: dict[str, Any], pool: descriptor_pool.DescriptorPool | None) -> dict[str, Any]:
    """An Any's JSON with the 64-bit integers of the message it holds as numbers (when its type is known)."""
    held = str(shown.get("@type", "")).rpartition("/")[2]
    if held in _SPECIAL_JSON:
        return shown
    try:
        held_type = (pool or descriptor_pool.Default()).FindMessageTypeByName(held)
    except KeyError:
        return shown
    return int64_as_numbers(shown, held_type, pool)


def saga_json_dict(saga: saga_pb2.Saga, pool: descriptor_pool.DescriptorPool | None = None) -> dict[str, Any]:
    """A Saga in the proto3 JSON mapping, its input and step outputs decoded
    with `pool` (its definition's types); never fails on a payload of a type
    nobody registered (see `to_json_dict`)."""
    bare = saga_pb2.Saga()
    bare.CopyFrom(saga)
    bare.ClearField("input")
    for step in bare.steps:
        step.ClearField("output")
    result = int64_as_numbers(json_format.MessageToDict(bare, preserving_proto_field_name=True), bare.DESCRIPTOR)
    if saga.HasField("input"):
        result["input"] = to_json_dict(saga.input, pool)
    for index, step in enumerate(saga.steps):
        if step.HasField("output"):
            result["steps"][index]["output"] = to_json_dict(step.output, pool)
    return result


def to_json_dict(payload: any_pb2.Any, pool: descriptor_pool.DescriptorPool | None = None) -> dict[str, Any]:
    """An Any as proto3 JSON (with "@type"), decoded with `pool`, its 64-bit
    integers as numbers (`int64_as_numbers`); a payload of a type nobody
    registered is shown as its type and base64 bytes."""
    try:
        return _any_as_numbers(json_format.MessageToDict(
            payload, preserving_proto_field_name=True, descriptor_pool=pool or descriptor_pool.Default()
        ), pool)
    except (TypeError, KeyError, json_format.Error, message.DecodeError):
        return {"@type": payload.type_url, "value": base64.b64encode(payload.value).decode("ascii")}
