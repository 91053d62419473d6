"""Durations of definitions: retry backoff arithmetic and conversions to
seconds. The text of a duration is read by the one grammar in
orchestrator.durations, as on the command line."""

from __future__ import annotations

from google.protobuf import duration_pb2

from compensa.orchestrator.shared.durations import InvalidDuration, parse_duration
from compensa.v1 import definition_pb2


def shorthand_to_json(text: str) -> str | None:
    """The proto3 JSON form ("1.5s") of a duration such as "500ms", "1h30m" or "1d"; None if `text` is not one."""
    try:
        return parse_duration(text).ToJsonString()
    except InvalidDuration:
        return None


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
    """The Duration `text` spells (orchestrator.durations.parse_duration); for defaults and tests."""
    return parse_duration(text)
