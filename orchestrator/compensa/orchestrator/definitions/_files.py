"""Reading definition files (YAML or JSON in the proto3 JSON mapping) into validated definitions."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor, descriptor_pb2, json_format, message

from compensa.orchestrator.definitions._validation import validate_definition
from compensa.orchestrator.shared.durations import InvalidDuration, parse_duration
from compensa.orchestrator.shared.errors import DefinitionError, quote
from compensa.v1 import definition_pb2

DEFINITION_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")
"""The file name endings `load_definitions` picks up in a directory."""

MAX_DEFINITION_FILE_BYTES = 1024 * 1024
"""The largest definition file read."""

_DURATION = "google.protobuf.Duration"
_PARSE_FIELD = re.compile(r"Failed to parse (\w+) field: ")
_PARSE_LOCATION = re.compile(r"\.? at [\w.\[\]\"]+\.*$")


def load_definition_file(
    path: Path, *, types: descriptor_pb2.FileDescriptorSet | None = None
) -> definition_pb2.SagaDefinition:
    """The validated, normalized definition in the YAML or JSON file `path`.

    Raises DefinitionError naming the file (and the step and field, when there is one) if
    the file cannot be read or parsed, has a field the proto does not, sets `version`, or
    fails `validate_definition`. Durations may be written "500ms", "10s", "1.5s", "30m",
    "2h" or "1d"; enum values by their short name (`kind: PIVOT`); and `depends_on: []`
    means "no dependencies" rather than "the previous step": the loader reads it as
    `independent: true`. `types`, when given, become the definition's own message types.
    """
    source = str(path)
    raw = _read(path, source)
    if not isinstance(raw, dict):
        raise DefinitionError(f"must hold one mapping (a SagaDefinition), got {type(raw).__name__}", source=source)
    top = {key: value for key, value in raw.items() if key != "steps"}
    steps = raw.get("steps") or []
    if not isinstance(steps, list):
        raise DefinitionError(f"must be a list of steps, got {type(steps).__name__}", source=source, field="steps")

    definition = definition_pb2.SagaDefinition()
    _parse(_friendly(top, definition.DESCRIPTOR, source, ""), definition, source, "")
    if definition.version != 0:
        raise DefinitionError(
            "leave it unset: the orchestrator numbers versions when it registers a definition,"
            f" got {definition.version}",
            source=source,
            field="version",
        )
    for index, raw_step in enumerate(steps):
        label = _label(raw_step, index)
        if not isinstance(raw_step, dict):
            raise DefinitionError(f"must be a mapping, got {type(raw_step).__name__}", source=source, step=label)
        step = definition.steps.add()
        _parse(_friendly(raw_step, step.DESCRIPTOR, source, label), step, source, label)
        if _lists_no_dependencies(raw_step):
            if _says_not_independent(raw_step):
                raise DefinitionError(
                    "`depends_on: []` makes the step independent; drop `independent: false`",
                    source=source,
                    step=label,
                    field="independent",
                )
            step.independent = True
    if types is not None:
        definition.types.CopyFrom(types)
    return validate_definition(definition, source=source)


def load_definitions(
    paths: Iterable[Path], *, types: descriptor_pb2.FileDescriptorSet | None = None
) -> list[definition_pb2.SagaDefinition]:
    """The definitions in `paths`: files, and directories (their *.yaml, *.yml, *.json, sorted).

    Directories are not searched recursively; a path named twice is read once. Raises
    DefinitionError for the first invalid file, or when two files define the same name.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in DEFINITION_SUFFIXES and p.is_file()))
        else:
            files.append(path)
    definitions: list[definition_pb2.SagaDefinition] = []
    read: set[Path] = set()
    defined_in: dict[str, Path] = {}
    for file in files:
        if file.resolve() in read:
            continue
        read.add(file.resolve())
        definition = load_definition_file(file, types=types)
        if definition.name in defined_in:
            raise DefinitionError(
                f"definition {definition.name!r} is already defined in {defined_in[definition.name]}",
                source=str(file),
                field="name",
            )
        defined_in[definition.name] = file
        definitions.append(definition)
    return definitions


def _read(path: Path, source: str) -> object:
    if path.suffix not in DEFINITION_SUFFIXES:
        raise DefinitionError(f"a definition file must end in {', '.join(DEFINITION_SUFFIXES)}", source=source)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_DEFINITION_FILE_BYTES + 1)
        if len(raw) > MAX_DEFINITION_FILE_BYTES:
            raise DefinitionError(f"is larger than {MAX_DEFINITION_FILE_BYTES} bytes, the limit", source=source)
        text = raw.decode("utf-8")
    except OSError as error:
        raise DefinitionError(f"cannot be read: {error.strerror or error}", source=source) from None
    except UnicodeDecodeError as error:
        raise DefinitionError(f"cannot be read: not UTF-8 text (byte {error.start})", source=source) from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise DefinitionError(f"is not valid {path.suffix[1:].upper()}: {error}", source=source) from None
    except RecursionError:
        raise DefinitionError("is nested too deeply to be a definition", source=source) from None


def _label(raw_step: object, index: int) -> str:
    name = raw_step.get("name") if isinstance(raw_step, dict) else None
    return name if isinstance(name, str) and name else f"#{index + 1}"


def _lists_no_dependencies(raw_step: Mapping[str, Any]) -> bool:
    return any(key in raw_step and raw_step[key] == [] for key in ("depends_on", "dependsOn"))


def _says_not_independent(raw_step: Mapping[str, Any]) -> bool:
    return "independent" in raw_step and raw_step["independent"] is False


def _parse(value: dict[str, Any], target: message.Message, source: str, step: str) -> None:
    try:
        json_format.ParseDict(value, target)
    except RecursionError:
        raise DefinitionError("is nested too deeply to be a definition", source=source, step=step) from None
    except json_format.ParseError as error:
        field = ".".join(_PARSE_FIELD.findall(str(error)))
        problem = _PARSE_LOCATION.sub("", _PARSE_FIELD.sub("", str(error))).rstrip(".")
        raise DefinitionError(problem, source=source, step=step, field=field) from None


def _friendly(
    value: dict[str, Any], message_type: descriptor.Descriptor, source: str, step: str, prefix: str = ""
) -> dict[str, Any]:
    """`value` with durations (orchestrator.durations) and enum short names rewritten into proto3 JSON;
    unknown fields rejected."""
    result: dict[str, Any] = {}
    for key, item in value.items():
        field = message_type.fields_by_name.get(key) or message_type.fields_by_camelcase_name.get(key)
        if field is None:
            known = ", ".join(f.name for f in message_type.fields)
            raise DefinitionError(
                f"unknown field {quote(str(key))}; {message_type.name} has: {known}",
                source=source, step=step, field=f"{prefix}{key}",
            )
        path = f"{prefix}{field.name}"
        if field.is_repeated and isinstance(item, list):
            result[key] = [_friendly_value(field, element, source, step, path) for element in item]
        else:
            result[key] = _friendly_value(field, item, source, step, path)
    return result


def _friendly_value(field: descriptor.FieldDescriptor, value: Any, source: str, step: str, path: str) -> Any:
    if field.message_type is not None and field.message_type.full_name == _DURATION:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise DefinitionError(
                f"a duration needs a unit, e.g. '{value}s' or '{value}ms', got {value}",
                source=source, step=step, field=path,
            )
        if isinstance(value, str):
            try:
                return parse_duration(value).ToJsonString()
            except InvalidDuration as error:
                raise DefinitionError(str(error), source=source, step=step, field=path) from None
        return value
    if field.message_type is not None and isinstance(value, dict):
        return _friendly(value, field.message_type, source, step, f"{path}.")
    if field.enum_type is not None and isinstance(value, str):
        return _enum_name(field.enum_type, value, source, step, path)
    return value


def _enum_name(enum: descriptor.EnumDescriptor, value: str, source: str, step: str, path: str) -> str:
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    for candidate in (value, prefix + value.upper()):
        if candidate in enum.values_by_name:
            return candidate
    choices = ", ".join(v.name.removeprefix(prefix) for v in enum.values if v.number != 0)
    raise DefinitionError(
        f"unknown {enum.name} {quote(value)}; one of: {choices}", source=source, step=step, field=path
    )
