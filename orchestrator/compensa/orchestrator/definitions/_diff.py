"""What changes between two versions of a definition, as a person reads it."""

from __future__ import annotations

import difflib
import hashlib
import json

from google.protobuf import json_format

from compensa.v1 import definition_pb2


def _lines(definition: definition_pb2.SagaDefinition) -> list[str]:
    body = definition_pb2.SagaDefinition()
    body.CopyFrom(definition)
    body.version = 0  # not content: every version differs in it
    # The message types are compiled descriptors: shown as which files they hold.
    files = sorted(file.name for file in body.types.file)
    body.ClearField("types")
    data = json_format.MessageToDict(body, preserving_proto_field_name=True)
    if files:
        data["types"] = {"files": files, "fingerprint": _types_fingerprint(definition)}
    return json.dumps(data, indent=2, sort_keys=True).splitlines()


def _types_fingerprint(definition: definition_pb2.SagaDefinition) -> str:
    return hashlib.sha256(definition.types.SerializeToString(deterministic=True)).hexdigest()[:12]


def definition_diff(before: definition_pb2.SagaDefinition | None, after: definition_pb2.SagaDefinition) -> str:
    """A unified diff from `before` (version N) to `after`; "" when there is
    no `before` or nothing differs."""
    if before is None:
        return ""
    lines = difflib.unified_diff(
        _lines(before), _lines(after), fromfile=f"{before.name} version {before.version}",
        tofile=f"{after.name} (new)" if not after.version else f"{after.name} version {after.version}", lineterm="",
    )
    return "\n".join(lines)
