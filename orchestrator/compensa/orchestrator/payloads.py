"""Payload types: resolving `google.protobuf.Any` type names to message classes.

The orchestrator stores and forwards payloads without decoding them; it only
needs the message types to validate a saga input against its definition and
to turn JSON into a typed message and back. A definition may carry its own
types (a FileDescriptorSet registered with it): they are looked up in a pool
built from that set. Otherwise the types come from imported _pb2 modules.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
from collections.abc import Iterable
from typing import Any

from google.protobuf import any_pb2, descriptor, descriptor_pb2, descriptor_pool, json_format, message, message_factory

from compensa.orchestrator.errors import InvalidArgument, quote
from compensa.v1 import definition_pb2, saga_pb2

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
        raise InvalidArgument(f"input is not a valid {full_name} in JSON: {error}") from error
    packed = any_pb2.Any()
    packed.Pack(parsed)
    return packed


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


def saga_json_dict(saga: saga_pb2.Saga, pool: descriptor_pool.DescriptorPool | None = None) -> dict[str, Any]:
    """A Saga in the proto3 JSON mapping, its input and step outputs decoded
    with `pool` (its definition's types); never fails on a payload of a type
    nobody registered (see `to_json_dict`)."""
    bare = saga_pb2.Saga()
    bare.CopyFrom(saga)
    bare.ClearField("input")
    for step in bare.steps:
        step.ClearField("output")
    result = json_format.MessageToDict(bare, preserving_proto_field_name=True)
    if saga.HasField("input"):
        result["input"] = to_json_dict(saga.input, pool)
    for index, step in enumerate(saga.steps):
        if step.HasField("output"):
            result["steps"][index]["output"] = to_json_dict(step.output, pool)
    return result


def to_json_dict(payload: any_pb2.Any, pool: descriptor_pool.DescriptorPool | None = None) -> dict[str, Any]:
    """An Any as proto3 JSON (with "@type"), decoded with `pool`; a payload of
    a type nobody registered is shown as its type and base64 bytes."""
    try:
        return json_format.MessageToDict(
            payload, preserving_proto_field_name=True, descriptor_pool=pool or descriptor_pool.Default()
        )
    except (TypeError, KeyError, json_format.Error, message.DecodeError):
        return {"@type": payload.type_url, "value": base64.b64encode(payload.value).decode("ascii")}
