"""Saved saga histories and the check of one: `compensa get --history`
writes the file, `compensa replay` and compensa.testing check histories.

A history file is JSON: the saga's id, definition, state and events written
out for people to read, and under "history" the SagaHistory message's exact
bytes (base64), which is all replay reads. The bytes, not the JSON mapping,
because a saga's payloads are of the participants' own message types, which
whoever replays the file may not have imported, and replay must see the
payloads exactly as they were stored.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from compensa.orchestrator.api.views import saga_message
from compensa.orchestrator.engine.replay import Divergence, replay_history, saga_differences
from compensa.orchestrator.shared.errors import InvalidArgument
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.v1 import definition_pb2, orchestrator_pb2

__all__ = ["HISTORY_FORMAT", "HistoryCheck", "check_history", "history_file_text", "read_history_file"]

#: The "format" of a history file; a later format would get another name.
HISTORY_FORMAT = "compensa.v1.SagaHistory/1"


@dataclass(frozen=True)
class HistoryCheck:
    """What replaying one history found: where the definition would have
    decided otherwise, and (replayed under the saga's own version) how the
    rebuilt saga differs from the stored one. Both empty: it replays."""

    saga_id: str
    definition_version: int
    events: int
    divergence: Divergence | None
    differences: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.divergence is None and not self.differences

    def summary(self) -> str:
        """One line, then a line per difference."""
        head = f"saga {self.saga_id} ({self.events} events, version {self.definition_version})"
        if self.divergence is not None:
            return f"{head}: diverges at event {self.divergence.sequence}: {self.divergence.reason}"
        if self.differences:
            return f"{head}: replays its log but ends elsewhere:\n" + "\n".join(
                f"  {difference}" for difference in self.differences
            )
        return f"{head}: replays to where it is"


def check_history(
    history: orchestrator_pb2.SagaHistory,
    definition: definition_pb2.SagaDefinition | None = None,
    *,
    renames: Mapping[str, str] | None = None,
) -> HistoryCheck:
    """Replays `history` under `definition` (validated and normalized; by
    default its own version). Under its own version the rebuilt saga must
    also equal the stored one; under another, only the decisions count."""
    outcome = replay_history(history, definition, renames=renames)
    differences: list[str] = []
    if definition is None and outcome.divergence is None and outcome.saga is not None:
        differences = saga_differences(history.saga, saga_message(outcome.saga, outcome.plan))
    return HistoryCheck(
        history.saga.saga_id, history.saga.definition_version, len(history.events), outcome.divergence,
        tuple(differences),
    )


def history_file_text(history: orchestrator_pb2.SagaHistory) -> str:
    """The history file of `history` (see the module docstring)."""
    saga = history.saga
    return json.dumps(
        {
            "format": HISTORY_FORMAT,
            "saga_id": saga.saga_id,
            "definition": saga.definition_name,
            "definition_version": saga.definition_version,
            "state": saga_state_name(saga.state),
            "events": [
                json_format.MessageToDict(event, preserving_proto_field_name=True) for event in history.events
            ],
            "history": base64.b64encode(history.SerializeToString(deterministic=True)).decode("ascii"),
        },
        indent=1,
    )


def read_history_file(path: Path) -> orchestrator_pb2.SagaHistory:
    """The history in the file `path` wrote by `compensa get --history`;
    InvalidArgument naming the file if it is not one."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"{path}: not a history file (compensa get ID --history): {error}") from None
    if not isinstance(content, dict) or content.get("format") != HISTORY_FORMAT:
        raise InvalidArgument(
            f"{path}: not a history file: it must be the JSON `compensa get ID --history` writes,"
            f' with "format": "{HISTORY_FORMAT}"'
        )
    history = orchestrator_pb2.SagaHistory()
    try:
        history.ParseFromString(base64.b64decode(str(content.get("history", "")), validate=True))
    except (binascii.Error, DecodeError, ValueError) as error:
        raise InvalidArgument(f'{path}: its "history" is not a base64 SagaHistory: {error}') from None
    if not history.events or not history.definition.steps:
        raise InvalidArgument(f'{path}: its "history" holds no events or no definition')
    return history
