"""The filter language that selects sagas for a bulk action: one grammar for
the CLI (`compensa bulk start ... --filter`), the API (StartBulkAction's
`filter`) and the dashboard; the server parses it, so every face gets the
same answer.

A filter is `all`, or terms joined by spaces (or `AND`), each FIELD OP VALUE:

    definition=checkout version=2 state=FAILED,RUNNING step=charge
    step_state=COMPENSATION_FAILED reason:"card declined"
    created>=2026-12-07T09:00:00Z updated<2026-12-07T10:00:00Z
    id_prefix=order- id=a1,a2,a3

A VALUE with spaces is quoted ("..." with \\" and \\\\ inside). Every term
must hold; each field appears at most once (list values instead). A filter
that does not parse, names an unknown field, state or operator is
InvalidArgument naming that part.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compensa.orchestrator.definitions import NAME_PATTERN
from compensa.orchestrator.shared.errors import InvalidArgument, quote
from compensa.orchestrator.shared.limits import SAGA_ID_PATTERN, check_text
from compensa.orchestrator.shared.records import ACTIVE_SAGA_STATES, FAILED, RUNNING, SagaState
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.v1 import bulk_pb2, saga_pb2

__all__ = ["ACTIONS", "FIELDS", "MAX_FILTER_CHARS", "SagaSelection", "for_action", "parse_filter"]

#: The longest filter text.
MAX_FILTER_CHARS = 16_384
#: The most ids an `id=` list may name.
MAX_LISTED_IDS = 1000

#: Each field with the operators it takes.
FIELDS: dict[str, tuple[str, ...]] = {
    "definition": ("=",),
    "version": ("=",),
    "state": ("=",),
    "step": ("=",),
    "step_state": ("=",),
    "reason": (":",),
    "created": (">=", "<"),
    "updated": (">=", "<"),
    "id_prefix": ("=",),
    "id": ("=",),
}

#: Where each field (each bound of a time) goes in a SagaSelection.
_ATTRIBUTES = {
    "definition": "definition_name", "version": "definition_version", "state": "states", "step": "step_name",
    "step_state": "step_state", "reason": "reason_contains", "created>=": "created_from", "created<": "created_to",
    "updated>=": "updated_from", "updated<": "updated_to", "id_prefix": "saga_id_prefix", "id": "saga_ids",
}

_TERM = re.compile(
    r"""\s*(?:
        (?P<and>AND)(?=\s|$)
      | (?P<field>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>>=|<=|!=|=|<|>|:)\s*
        (?P<value>"(?:[^"\\]|\\.)*"|[^\s"]+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class SagaSelection:
    """Which sagas a filter selects (every set field must hold); times are
    seconds since the epoch. `in_backoff` and `unresolved` come from the
    action, not the filter (see `for_action`)."""

    definition_name: str = ""
    definition_version: int = 0
    states: frozenset[SagaState] = frozenset()
    step_name: str = ""
    step_state: int = 0
    reason_contains: str = ""
    created_from: float | None = None
    created_to: float | None = None
    updated_from: float | None = None
    updated_to: float | None = None
    saga_id_prefix: str = ""
    saga_ids: tuple[str, ...] = ()
    #: Only sagas with a step waiting out a retry backoff.
    in_backoff: bool = False
    #: Only sagas nobody resolved.
    unresolved: bool = False

    def to_message(self) -> bulk_pb2.SagaFilter:
        """The API's view of it."""
        return bulk_pb2.SagaFilter(
            definition_name=self.definition_name, definition_version=self.definition_version,
            states=sorted(self.states), step_name=self.step_name,  # type: ignore[arg-type]
            step_state=self.step_state,  # type: ignore[arg-type]
            reason_contains=self.reason_contains, created_from=timestamp(self.created_from),
            created_to=timestamp(self.created_to), updated_from=timestamp(self.updated_from),
            updated_to=timestamp(self.updated_to), saga_id_prefix=self.saga_id_prefix, saga_ids=self.saga_ids,
        )


def _state_parser(enum: type, prefix: str, what: str) -> Callable[[str, str], int]:
    names = [name.removeprefix(prefix) for name in enum.keys() if not name.endswith("_UNSPECIFIED")]  # type: ignore[attr-defined]

    def parse(value: str, term: str) -> int:
        name = value.upper().removeprefix(prefix)
        if name not in names:
            raise InvalidArgument(
                f"filter term {quote(term)}: unknown {what} {quote(value)}; known: {', '.join(names)}"
            )
        return int(enum.Value(prefix + name))  # type: ignore[attr-defined]

    return parse


_saga_state = _state_parser(saga_pb2.SagaState, "SAGA_STATE_", "saga state")
_step_state = _state_parser(saga_pb2.StepState, "STEP_STATE_", "step state")


def _time(value: str, term: str) -> float:
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidArgument(
            f"filter term {quote(term)}: {quote(value)} is not an RFC 3339 time with a zone,"
            " such as 2026-12-07T09:00:00Z"
        )
    return moment.timestamp()


def _name(value: str, term: str, what: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidArgument(f"filter term {quote(term)}: {quote(value)} is not a {what} name")
    return value


def _unquoted(value: str) -> str:
    if value.startswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_filter(text: str, *, definition_name: str = "") -> SagaSelection:
    """The selection `text` describes; InvalidArgument naming the part that
    is wrong. An empty filter is refused: selecting every saga must be said
    (`all`). `definition_name`, when the request names the definition
    otherwise (PlanMigration's new definition), is the filter's `definition`
    (a filter naming another is refused)."""
    check_text(text, "filter", max_chars=MAX_FILTER_CHARS)
    if not text.strip():
        raise InvalidArgument("filter is required: say which sagas (e.g. 'definition=checkout state=FAILED'),"
                              " or 'all' for every saga")
    if text.strip() == "all":
        return SagaSelection(definition_name=definition_name)
    values: dict[str, Any] = {}
    seen: set[str] = set()
    position = 0
    while position < len(text):
        if not text[position:].strip():
            break
        match = _TERM.match(text, position)
        if match is None:
            rest = text[position:].strip()
            raise InvalidArgument(
                f"filter does not parse at character {len(text) - len(text[position:].lstrip()) + 1}:"
                f" {quote(rest)}; write FIELD=VALUE terms separated by spaces"
                f" (fields: {', '.join(FIELDS)})"
            )
        position = match.end()
        if match["and"]:
            continue
        field, op, raw = match["field"], match["op"], match["value"]
        term = match.group(0).strip()
        if field not in FIELDS:
            raise InvalidArgument(
                f"filter term {quote(term)}: unknown field {quote(field)}; known: {', '.join(FIELDS)}"
            )
        if op not in FIELDS[field]:
            raise InvalidArgument(
                f"filter term {quote(term)}: {field} takes {' or '.join(FIELDS[field])}, not {op}"
            )
        key = field if field not in ("created", "updated") else f"{field}{op}"
        if key in seen:
            raise InvalidArgument(
                f"filter term {quote(term)}: {field} is given twice; list several values as {field}=A,B"
            )
        seen.add(key)
        value = _unquoted(raw)
        if not value:
            raise InvalidArgument(f"filter term {quote(term)}: the value is empty")
        values[_ATTRIBUTES[key]] = _read(field, value, term)
    if definition_name:
        named = values.setdefault("definition_name", definition_name)
        if named != definition_name:
            raise InvalidArgument(
                f"filter term 'definition={named}': only sagas of {quote(definition_name)} are selected here"
            )
    if values.get("definition_version") and not values.get("definition_name"):
        raise InvalidArgument("filter term 'version': a version needs definition=NAME too")
    return SagaSelection(**values)


def _read(field: str, value: str, term: str) -> Any:
    match field:
        case "definition":
            return _name(value, term, "definition")
        case "version":
            if not value.isdigit() or not 0 < int(value) < 2**31:
                raise InvalidArgument(f"filter term {quote(term)}: version must be a positive number")
            return int(value)
        case "state":
            return frozenset(_saga_state(part, term) for part in value.split(","))
        case "step":
            return _name(value, term, "step")
        case "step_state":
            return _step_state(value, term)
        case "reason":
            return value
        case "created" | "updated":
            return _time(value, term)
        case "id_prefix":
            if not SAGA_ID_PATTERN.fullmatch(value):
                raise InvalidArgument(f"filter term {quote(term)}: a saga id has letters, digits, '.', '_', ':', '-'")
            return value
        case _:  # "id"
            ids = tuple(dict.fromkeys(value.split(",")))
            if len(ids) > MAX_LISTED_IDS:
                raise InvalidArgument(f"filter term 'id': at most {MAX_LISTED_IDS} ids, got {len(ids)}")
            for saga_id in ids:
                if not SAGA_ID_PATTERN.fullmatch(saga_id):
                    raise InvalidArgument(f"filter term 'id': {quote(saga_id)} is not a saga id")
            return ids


#: The bulk actions by the name the CLI and the dashboard give them.
ACTIONS = {
    "cancel": bulk_pb2.BULK_ACTION_KIND_CANCEL,
    "retry": bulk_pb2.BULK_ACTION_KIND_RETRY,
    "resolve": bulk_pb2.BULK_ACTION_KIND_RESOLVE,
    "retry-now": bulk_pb2.BULK_ACTION_KIND_RETRY_NOW,
    "move": bulk_pb2.BULK_ACTION_KIND_MOVE,
}

#: The sagas each action applies to: (saga states, unresolved only, in a backoff only).
_APPLIES_TO: dict[int, tuple[frozenset[SagaState], bool, bool]] = {
    bulk_pb2.BULK_ACTION_KIND_CANCEL: (frozenset({RUNNING}), False, False),
    bulk_pb2.BULK_ACTION_KIND_RETRY: (frozenset({FAILED}), True, False),
    bulk_pb2.BULK_ACTION_KIND_RESOLVE: (frozenset({FAILED}), True, False),
    bulk_pb2.BULK_ACTION_KIND_RETRY_NOW: (ACTIVE_SAGA_STATES, False, True),
    bulk_pb2.BULK_ACTION_KIND_MOVE: (ACTIVE_SAGA_STATES, False, False),
}


def for_action(kind: int, selection: SagaSelection) -> SagaSelection:
    """`selection` narrowed to the sagas action `kind` applies to;
    InvalidArgument when its states leave none."""
    if kind not in _APPLIES_TO:
        raise InvalidArgument(
            "kind must be one of " + ", ".join(bulk_pb2.BulkActionKind.Name(k) for k in _APPLIES_TO)  # type: ignore[arg-type]
        )
    states, unresolved, in_backoff = _APPLIES_TO[kind]
    wanted = states & selection.states if selection.states else states
    if not wanted:
        asked = ", ".join(sorted(saga_pb2.SagaState.Name(s).removeprefix("SAGA_STATE_") for s in selection.states))  # type: ignore[arg-type]
        can = ", ".join(sorted(saga_pb2.SagaState.Name(s).removeprefix("SAGA_STATE_") for s in states))  # type: ignore[arg-type]
        raise InvalidArgument(
            f"filter term 'state={asked}': {bulk_pb2.BulkActionKind.Name(kind).removeprefix('BULK_ACTION_KIND_')}"  # type: ignore[arg-type]
            f" applies only to {can} sagas"
        )
    return dataclasses.replace(selection, states=frozenset(wanted), unresolved=unresolved, in_backoff=in_backoff)
