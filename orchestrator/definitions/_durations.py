"""Durations: the shorthand definition files accept, and conversions to seconds."""

from __future__ import annotations

import re
from decimal import Decimal

from google.protobuf import duration_pb2

from compensa.v1 import definition_pb2

_SHORTHAND = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600), "d": Decimal(86400)}


def shorthand_to_json(text: str) -> str | None:
    """The proto3 JSON form ("1.5s") of a shorthand such as "500ms", "30m" or "1d"; None if `text` is not one."""
    match = _SHORTHAND.fullmatch(text.strip())
    if match is None:
        return None
    seconds = Decimal(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return f"{seconds.normalize():f}s"


def duration_seconds(duration: duration_pb2.Duration) -> float:
    """The length of `duration` in seconds (negative durations stay negative)."""
    return duration.seconds + duration.nanos / 1e9


def backoff_seconds(policy: definition_pb2.RetryPolicy, attempt: int) -> float:
    """The delay after failed attempt `attempt` (1-based) under `policy`.

    min(initial_backoff * backoff_multiplier ** (attempt - 1), max_backoff).
    `policy` must be normalized (see `validate_definition`); `attempt` must be at least 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    initial = duration_seconds(policy.initial_backoff)
    maximum = duration_seconds(policy.max_backoff)
    try:
        delay = initial * policy.backoff_multiplier ** (attempt - 1)
    except OverflowError:
        return maximum
    return min(delay, maximum)


def retry_waited_seconds(policy: definition_pb2.RetryPolicy, attempts: int) -> float:
    """The waits `policy` schedules after failed attempts 1..`attempts`, added up.

    Constant time once the backoff reaches max_backoff, so a policy of
    thousands of attempts costs nothing to ask about.
    """
    maximum = duration_seconds(policy.max_backoff)
    total = 0.0
    for attempt in range(1, attempts + 1):
        delay = backoff_seconds(policy, attempt)
        if delay >= maximum:
            return total + maximum * (attempts - attempt + 1)
        total += delay
    return total


def duration_text(duration: duration_pb2.Duration) -> str:
    """`duration` as proto3 JSON ("-1s", "0.500s"), for messages."""
    return duration.ToJsonString()


def duration_of(text: str) -> duration_pb2.Duration:
    """A Duration from proto3 JSON or shorthand; for defaults and tests."""
    duration = duration_pb2.Duration()
    duration.FromJsonString(shorthand_to_json(text) or text)
    return duration
