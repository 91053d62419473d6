"""A definition's concurrency key: a path to a scalar field of its input
("input.customer_id"), checked against the input type when the definition
is registered and read from each saga's input when it starts."""

from __future__ import annotations

import hashlib
from typing import Any

from google.protobuf import message

#: Every concurrency key path starts with this.
KEY_ROOT = "input"
#: The most sagas of one key a definition may let run at once.
MAX_RUNNING_PER_KEY = 1000
#: Key values longer than this are stored as their SHA-256 (the column's size).
MAX_KEY_CHARS = 255


def key_path_problem(path: str, input_type: Any) -> str | None:
    """What is wrong with `path` as a key of `input_type` (a message
    Descriptor, of either protobuf implementation), or None."""
    root, _, rest = path.partition(".")
    if root != KEY_ROOT or not rest:
        return f"must be a field of the input, as input.FIELD[.FIELD...], got {path!r}"
    message_type = input_type
    names = rest.split(".")
    for position, name in enumerate(names):
        field = message_type.fields_by_name.get(name)
        walked = ".".join([KEY_ROOT, *names[: position + 1]])
        if field is None:
            return f"{walked!r}: {message_type.full_name} has no field {name!r}"
        if field.is_repeated:
            return f"{walked!r} is a repeated field; a key is one value"
        nested = field.message_type
        last = position == len(names) - 1
        if last and nested is not None:
            return f"{walked!r} is a message ({nested.full_name}); a key is a scalar field"
        if not last:
            if nested is None:
                return f"{walked!r} is not a message, so it has no field {names[position + 1]!r}"
            message_type = nested
    return None


def key_value(path: str, saga_input: message.Message) -> str:
    """The value of a valid key `path` in `saga_input`, as text."""
    value: object = saga_input
    for name in path.split(".")[1:]:
        value = getattr(value, name)
    text = str(value)
    if len(text) > MAX_KEY_CHARS:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text
