"""The one duration grammar of Compensa: what the command line (`--stuck 10m`),
definition files (`step_timeout: 1h30m`) and the dashboard accept.

A duration is one or more parts, each a decimal number and a unit: ms, s, m,
h or d, in any case ("250ms", "1.5s", "10m", "1h30m", "2d"). A leading "-"
makes it negative, for the callers' own checks to refuse with the name of the
field that must be positive. proto3 JSON ("0.500s", "-1s") is the case of one
part in seconds. A duration is exact to the nanosecond (a finer one is refused,
not rounded away) and within google.protobuf.Duration's range.

This is a shared low layer: it imports neither the command line nor the
definitions.
"""

from __future__ import annotations

import re
from fractions import Fraction

from google.protobuf import duration_pb2

from compensa.orchestrator.shared.errors import quote

__all__ = ["DURATION_EXAMPLES", "MAX_DURATION_SECONDS", "InvalidDuration", "parse_duration"]

#: google.protobuf.Duration's range: about 10,000 years either way.
MAX_DURATION_SECONDS = 315_576_000_000
#: What a duration looks like, for messages that ask for one.
DURATION_EXAMPLES = "30s, 10m, 1h30m, 250ms"

_NUMBER = r"\d+(?:\.\d+)?"
_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_PARTS = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_NANOS_PER_SECOND = 10**9
_NANOS_PER_UNIT = {
    "ms": 10**6,
    "s": _NANOS_PER_SECOND,
    "m": 60 * _NANOS_PER_SECOND,
    "h": 3600 * _NANOS_PER_SECOND,
    "d": 86400 * _NANOS_PER_SECOND,
}


class InvalidDuration(ValueError):
    """Text that is not a duration; the message quotes it and says what to write."""


def parse_duration(text: str) -> duration_pb2.Duration:
    """The Duration `text` spells in the grammar above; InvalidDuration if it spells none."""
    compact = text.strip().lower()
    magnitude = compact.removeprefix("-")
    if not _PARTS.fullmatch(magnitude):
        hint = "a number needs a unit, e.g." if re.fullmatch(_NUMBER, magnitude) else "use e.g."
        raise InvalidDuration(f"invalid duration {quote(text)}; {hint} {DURATION_EXAMPLES}")
    try:
        nanos = sum(
            (Fraction(amount) * _NANOS_PER_UNIT[unit] for amount, unit in _PART.findall(magnitude)), Fraction(0)
        )
    except ValueError:  # more digits than Python converts (thousands): out of any range
        raise InvalidDuration(f"invalid duration {quote(text)}: far too many digits") from None
    if nanos > MAX_DURATION_SECONDS * _NANOS_PER_SECOND:
        raise InvalidDuration(
            f"invalid duration {quote(text)}: beyond the longest, {MAX_DURATION_SECONDS}s (about 10,000 years)"
        )
    if nanos.denominator != 1:
        raise InvalidDuration(f"invalid duration {quote(text)}: finer than a nanosecond")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(-int(nanos) if compact.startswith("-") else int(nanos))
    return duration
